"""`python -m demo`: the built-in example, QLoRA by default, with no download.

    python -m demo                                  # QLoRA on the demo base and task, into runs/qlora
    python -m demo --method lora --max-steps 60     # any train.run flag

It is `python -m train.run` with the demo filled in where the command line leaves a setting out: the
base model (demo.base, built on first use and cached) and the task (a function signature -> the first
line of its docstring, from the standard library on this machine), plus run settings suited to a
tiny model learning in a few minutes on a CPU.
"""
from __future__ import annotations

import sys

from demo.base import ensure_demo_base, ensure_demo_data
from train import distributed as dist
from train.config import TrainConfig
from train.distributed import Parallel
from train.run import main

# (section, field, value) used by a run on the demo data where the user left the field at its default.
DEMO_RUN_DEFAULTS = [
    ("data", "val_fraction", 0.1),
    ("data", "seq_len", 96),
    ("data", "batch_size", 16),
    ("optim", "max_steps", 150),
    ("optim", "warmup_ratio", 0.05),
    ("eval", "eval_every", 30),
    ("eval", "task", "generation"),
    ("checkpoint", "save_every", 50),
]


def use_demo(cfg: TrainConfig, parallel: Parallel) -> None:
    """Fill in the demo's base, data and run settings where `cfg` has none; rank 0 builds the base (once,
    cached) while any other ranks wait."""
    if not parallel.is_main:
        dist.barrier(parallel)
    if cfg.run.model is None:
        cfg.run.model = str(ensure_demo_base())
    if cfg.data.data is None:
        cfg.data.data = str(ensure_demo_data())
        defaults = TrainConfig()
        for section, key, value in DEMO_RUN_DEFAULTS:
            if getattr(getattr(cfg, section), key) == getattr(getattr(defaults, section), key):
                setattr(getattr(cfg, section), key, value)
        if cfg.optim.lr == cfg.method.lr and cfg.method.demo_lr is not None:
            cfg.optim.lr = cfg.method.demo_lr
    if parallel.is_main:
        dist.barrier(parallel)


def demo_main(argv: list[str] | None = None) -> int:
    """train.run's command line with the demo filled in; --method defaults to qlora here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = any(a in ("--method", "--config") or a.startswith(("--method=", "--config=")) for a in argv)
    return main(argv if chosen else ["--method", "qlora", *argv], prepare=use_demo)


if __name__ == "__main__":
    sys.exit(demo_main())
