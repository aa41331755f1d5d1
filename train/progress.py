"""What a person watching a run sees while it trains: a bar on a terminal, plain lines everywhere else.

Under nohup, a job scheduler, CI or `> log` there is no terminal and tqdm turns itself off, so a run
would print nothing between its start and its end. There, a plain line goes to stderr every
`log_every` steps (default: about 20 lines per run) and at least once a minute, with step/total, loss,
lr, gradient norm, throughput, elapsed time and ETA. Every evaluation gets a line of its own, on a
terminal too (the bar's postfix shows only the last one). Throughput is stated both ways: tokens
processed (every real input token) and target tokens (those that carry loss).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

MIN_LINE_EVERY_S = 60.0


def clock(seconds: float) -> str:
    """1:02:03 or 2:03."""
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


def metric_text(metrics: dict) -> str:
    """'val_loss 2.5760, perplexity 13.14, bleu 4.7035' from an evaluation's metrics."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, float):
            parts.append(f"{key} {value}")
        else:
            parts.append(f"{key} {value:.4f}")
    return ", ".join(parts)


class Progress:
    """The bar (on a terminal) or plain lines (elsewhere) for steps initial+1 .. total; `show`: this rank prints."""

    def __init__(self, total: int, initial: int, desc: str, show: bool = True, log_every: int | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.initial, self.show = total, initial, show
        self.terminal = show and self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.stream,
                        disable=not self.terminal)
        self.every = log_every or max(1, total // 20)
        self.started = self.last_line = time.monotonic()

    def step(self, step: int, loss: float, lr: float, grad_norm: float, input_tps: float, target_tps: float,
             elapsed_s: float) -> None:
        """One optimizer step done; `elapsed_s`: the run's training time so far (across resumes)."""
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{input_tps:,.0f}", target_tok_s=f"{target_tps:,.0f}")
        now = time.monotonic()
        due = step % self.every == 0 or step == self.total or now - self.last_line >= MIN_LINE_EVERY_S
        if self.show and not self.terminal and due:
            eta = (now - self.started) / max(step - self.initial, 1) * (self.total - step)
            self._line(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  grad norm {grad_norm:.3f}  "
                       f"{input_tps:,.0f} tokens/s ({target_tps:,.0f} target tokens/s)  elapsed {clock(elapsed_s)}  "
                       f"eta {clock(eta)}")
            self.last_line = now

    def evaluation(self, step: int, metrics: dict) -> None:
        """An evaluation's every metric, one line."""
        if self.show:
            self._line(f"step {step}/{self.total}  eval: {metric_text(metrics)}")
        if "val_loss" in metrics:
            self.bar.set_postfix(val=f"{metrics['val_loss']:.3f}", refresh=False)

    def say(self, message: str) -> None:
        if self.show:
            self._line(message)

    def _line(self, text: str) -> None:
        if self.terminal:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()
