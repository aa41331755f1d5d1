"""Experiment trackers: TensorBoard and Weights & Biases, fed the same records as metrics.jsonl.

    --report-to tensorboard          event files in <output-dir>/tensorboard (torch.utils.tensorboard)
    --report-to wandb                the wandb client, if installed (WANDB_MODE=offline works without network)
    --report-to tensorboard,wandb    both; none (the default): neither

metrics.jsonl stays the source of truth. A tracker never makes a run fail: a missing package, or a
tracker that raises, is one warning line and the run goes on without it. Scalars are logged under
"train/<name>" for steps and "eval/<name>" for evaluations, at the optimizer step.
"""
from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRACKERS = ("none", "tensorboard", "wandb")


class Trackers:
    """The trackers `names` asks for, writing under `out`; `warn` prints a line for the user."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any], warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.sinks: dict[str, Any] = {}
        atexit.register(self.close)  # a run that ends in an error still flushes what it logged
        for name in dict.fromkeys(n for n in names if n != "none"):
            try:
                self.sinks[name] = _open(name, out, config)
            except Exception as err:  # an optional package missing or broken: the run goes on without it
                warn(f"--report-to {name}: not used ({type(err).__name__}: {err})")

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: its numbers, as train/* (a step) or eval/* (an evaluation) scalars."""
        step = record.get("step", 0)
        prefix = "eval" if "val_loss" in record else "train"
        scalars = {f"{prefix}/{k}": float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, sink in list(self.sinks.items()):
            try:
                _write(name, sink, scalars, step)
            except Exception as err:
                self.warn(f"--report-to {name}: stopped ({type(err).__name__}: {err})")
                del self.sinks[name]

    def close(self) -> None:
        for name, sink in self.sinks.items():
            try:
                sink.close() if name == "tensorboard" else sink.finish()
            except Exception as err:
                self.warn(f"--report-to {name}: could not close ({type(err).__name__}: {err})")
        self.sinks = {}


def _open(name: str, out: Path, config: dict[str, Any]) -> Any:
    # Imported here, and only when asked for: both are optional packages (extras), and heavy.
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(out / "tensorboard"))
    import wandb

    return wandb.init(project="ftkit", dir=str(out), config=config, name=out.name)


def _write(name: str, sink: Any, scalars: dict[str, float], step: int) -> None:
    if name == "tensorboard":
        for key, value in scalars.items():
            sink.add_scalar(key, value, step)
    else:
        sink.log(scalars, step=step)
