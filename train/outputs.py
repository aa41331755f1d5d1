"""The run directory: who may write into it, the metrics log, the loss curve, samples and the summary.

    <output-dir>/
        config.json      the resolved TrainConfig
        metrics.jsonl    one JSON object per line: training steps and evaluations, by "step"
        checkpoints/     train.checkpoint's step directories
        adapter/ model/  the product (train.methods)
        loss.png         train and val loss against step (when matplotlib is installed)
        summary.json     what the run did, also printed at the end

A directory holding another run is refused unless the run resumes it (--resume) or replaces it
(--overwrite, which deletes only the names above).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from models.checkpoint import Loaded
from train.checkpoint import TrainerState, full_trainable_state, load_trainable_state
from train.config import TrainConfig
from train.data import Datasets
from train.distributed import Parallel, barrier
from train.errors import RunError
from train.evaluate import sample_generations
from train.methods import Method

OWNED = ("checkpoints", "adapter", "model", "metrics.jsonl", "config.json", "loss.png", "summary.json")


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """The output directory, after refusing one that holds another run (nothing is written yet)."""
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {out} is a file")
    taken = [name for name in OWNED if (out / name).exists()]
    if taken and cfg.run.resume is None and not cfg.run.overwrite:
        raise RunError(f"--output-dir {out} already holds a run ({', '.join(taken)}): pass --resume to continue it or --overwrite to replace it")
    return out


def make_output_dir(cfg: TrainConfig, out: Path) -> None:
    """Create the directory; with --overwrite first delete what an earlier run left in it."""
    if cfg.run.overwrite:
        for name in OWNED:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"--output-dir {out}: cannot create it ({err.strerror or err})") from None


class MetricsLog:
    """metrics.jsonl: appended one line per step or evaluation, cut back to a checkpoint on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Drop lines written after `step` by an interrupted run, so the log reads as one run.

        A line cut short by a kill is dropped too; the file is replaced atomically, so a second kill
        during this rewrite leaves either the old log or the new one.
        """
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            keep = [line for line in lines if (at := _step_of(line)) is not None and at <= step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)

    def rows(self) -> list[dict]:
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return [json.loads(line) for line in lines if line]


def _step_of(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def plot_losses(rows: Sequence[dict], out_png: Path) -> bool:
    """Train and val loss against step as a PNG; False when matplotlib is not installed."""
    try:  # optional: the plot is a convenience, the numbers are in metrics.jsonl
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak: allocated CUDA memory, or the resident set's high-water mark on a CPU (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(status["VmHWM"].split()[0]) / 1024


def print_start(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, total_steps: int,
                parallel: Parallel, data_summary: str, trainable: str | None) -> None:
    """What is about to run, on stderr: method, model, device, layout, steps, data, trainable parameters."""
    b, k, n = cfg.data.batch_size, cfg.optim.grad_accum, parallel.world_size
    layout = f", {n} processes ({parallel.mode}), global batch {b} x {k} x {n} = {b * k * n} rows" if n > 1 else ""
    print(f"{cfg.run.method} on {cfg.run.model} ({device}, {'bf16 autocast' if amp_dtype else 'float32'}{layout}); "
          f"{total_steps} steps", file=sys.stderr)
    print(data_summary, file=sys.stderr)
    if trainable:  # not under FSDP2: sharded parameters would be counted 1/world
        print(trainable, file=sys.stderr)


def save_product(method: Method, loaded: Loaded, cfg: TrainConfig, out: Path, parallel: Parallel,
                 best: Path | None, compute: torch.dtype) -> Path:
    """Rank 0 writes the adapter or model (every rank calls this). A sharded model is first rebuilt whole
    on the CPU from the gathered tensors, so the files are the same Hugging Face / PEFT files one
    process would write."""
    product = out / method.product
    tensors = full_trainable_state(loaded.model, parallel.is_main) if parallel.fsdp else {}
    if parallel.is_main:
        if parallel.fsdp:
            loaded = method.build(cfg, cfg.run.model, torch.device("cpu"), compute)
            load_trainable_state(loaded.model, tensors, best or out)
        product = method.save(loaded, cfg, out, cfg.run.model)
    barrier(parallel)
    return product


def show_samples(title: str, model, data: Datasets, tokenizer, device: torch.device, amp_dtype: torch.dtype | None,
                 show: bool) -> None:
    """A few greedy generations on validation prompts, printed when `show` (every rank generates: a
    sharded model needs them all)."""
    samples = sample_generations(model, data, tokenizer, device, amp_dtype)
    if samples and show:
        print_samples(title, *samples)


def print_samples(title: str, prompts: Sequence[str], generated: Sequence[str], references: Sequence[str]) -> None:
    print(f"\n{title}")
    for prompt, pred, ref in zip(prompts, generated, references):
        print(f"  prompt:    {prompt.strip()[:100]}\n  generated: {pred[:120]}\n  reference: {ref[:120]}\n")


def summary(method: str, state: TrainerState, device: torch.device, parallel: Parallel, product: Path,
            wall_s: float) -> dict:
    """What the run did, for summary.json (peak memory: this process's; wall_s: since the process started)."""
    best, elapsed = state.best_val_loss, max(state.elapsed_s, 1e-9)
    return {
        "method": method, "steps": state.step, "skipped_steps": state.skipped_steps,
        "first_val_loss": state.first_val_loss, "best_val_loss": best, "best_step": state.best_step,
        "best_perplexity": math.exp(best) if best is not None and best < 50 else None,
        **{f"best_{k}": v for k, v in state.best_metrics.items() if k != "perplexity"},
        "time_s": round(state.elapsed_s, 1), "wall_time_s": round(wall_s, 1),
        "tokens_seen": state.tokens_seen, "input_tokens_seen": state.input_tokens_seen,
        "target_tokens_per_s": round(state.tokens_seen / elapsed, 1),
        "input_tokens_per_s": round(state.input_tokens_seen / elapsed, 1),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        "processes": parallel.world_size, "sharding": parallel.mode, "output": str(product),
    }


def write_summary(out: Path, summary: dict) -> None:
    """summary.json, the loss curve, and both printed as a table."""
    plotted = plot_losses(MetricsLog(out / "metrics.jsonl").rows(), out / "loss.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [(k.replace("_", " "), v) for k, v in summary.items() if v is not None]
    if plotted:
        rows.append(("loss curve", str(out / "loss.png")))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in rows))
