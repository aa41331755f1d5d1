"""Prefix and prompt tuning on the real shipped model, starting from random virtual tokens or from real ones.

    python -m benchmarks.virtual_init [--steps 30] [--json benchmarks/results/virtual_init.json]

The demo task (240 questions, 10% held out), SmolLM2-135M-Instruct from the shipped GGUF, each method's
default lr, --prefix-init-text / --prompt-init-text at their default (text) or '' (PEFT's random N(0,1)).
Prints held-out loss of the untouched base, of the adapted model at step 0, and at the end.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from demo.base import demo_chat_records, shipped_model
from train import run as run_mod
from train.config import parse_args
from train.loop import evaluate_loss


def measure(method: str, init: str, steps: int, root: Path) -> dict:
    data = root / "task.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in demo_chat_records()[::10][:240]))
    flag = f"--{method}-init-text"
    extra = [flag, ""] if init == "random" else []
    cfg = parse_args(["--method", method, "--model", str(shipped_model()), "--data", str(data), "--val-fraction", "0.1",
                      "--seq-len", "96", "--batch-size", "4", "--max-steps", str(steps), "--eval-every", str(steps),
                      "--save-every", "0", "--output-dir", str(root / f"{method}-{init}"), *extra])
    run = run_mod.setup(cfg)
    virtual, run.model.virtual_tokens = run.model.virtual_tokens, None
    base = evaluate_loss(run.model, run.val_batches, run.device, run.amp_dtype)
    run.model.virtual_tokens = virtual
    start = evaluate_loss(run.model, run.val_batches, run.device, run.amp_dtype)
    run_mod.fit(run)
    end = run_mod.finish(run)["best_val_loss"]
    return {"method": method, "init": init, "steps": steps, "lr": cfg.optim.lr, "base": base, "start": start, "end": end}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("prefix", "prompt"):
            for init in ("random", "text"):
                rows.append(measure(method, init, args.steps, Path(tmp)))
    print("| method | init | lr | base | step 0 | after |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['init']} | {r['lr']:g} | {r['base']:.3f} | {r['start']:.3f} | {r['end']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
