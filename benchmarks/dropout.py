"""LoRA dropout masks before and after lora.dropout, measured in one run on one machine.

    OMP_NUM_THREADS=2 python -m benchmarks.dropout [--repeat 3] [--steps 4] [--json PATH]

before: a bool mask from `bernoulli_` (what nn.Dropout draws, the previous path); after: lora.dropout's
keep_mask (16-bit draws from NumPy's SFC64, seeded by torch). Two measurements:
1. one mask of the input shape of SmolLM2-135M's adapted linears at 2 x 512 tokens: median of 50 draws;
2. our LoRA training step (train.loop.train_step, r 16 on q,k,v,o, dropout 0.05, bf16 autocast) on a random
   model of SmolLM2-135M's shape at 2 x 512 tokens: the two mask paths alternate in one process, step
   times are the median over --repeat rounds of --steps steps each (after one warm-up step per round).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.vs_hf import SHAPES, build_model, machine, ours_config, ours_trainer, synthetic_rows, versions
from lora import lowrank
from lora.dropout import keep_mask

ROOT = Path(__file__).resolve().parents[1]
SHAPE, SEQ, BATCH, P = "smollm2-135m", 512, 2, 0.05


def bernoulli_mask(shape, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """The previous path: one bernoulli_ draw per element, nn.Dropout's scale."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p), 1.0 / (1.0 - p)


PATHS = {"before (bernoulli_)": bernoulli_mask, "after (lora.dropout)": keep_mask}


def mask_ms(draw, shape, reps: int = 50) -> float:
    draw(shape, P, torch.device("cpu"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        draw(shape, P, torch.device("cpu"))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def step_times(model_dir: Path, vocab: int, repeat: int, steps: int) -> dict[str, list[float]]:
    from train.loop import train_step

    cfg = ours_config("lora", False)
    cfg.lora.dropout = P
    device = torch.device("cpu")
    model, opt, sched = ours_trainer(cfg, model_dir, device)
    rows = synthetic_rows(vocab, BATCH * (steps + 1), SEQ)
    out: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(repeat):
        for name, draw in PATHS.items():  # alternate, so drift hits both alike
            lowrank.keep_mask = draw
            times = []
            for step in range(steps + 1):
                x = rows[step * BATCH : (step + 1) * BATCH]
                t0 = time.perf_counter()
                train_step(model, opt, sched, [{"input_ids": x, "labels": x}], device, torch.bfloat16, 1.0)
                times.append(time.perf_counter() - t0)
            out[name].append(statistics.median(times[1:]))
    lowrank.keep_mask = keep_mask
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dropout", description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "dropout.json")
    args = ap.parse_args(argv)
    shape = SHAPES[SHAPE]
    size = (BATCH, SEQ, shape["hidden_size"])  # the input of q, k, v and o alike (9 heads x 64 = 576)
    masks = {name: mask_ms(draw, size) for name, draw in PATHS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", shape)
        steps = step_times(model_dir, shape["vocab_size"], args.repeat, args.steps)
    tokens = BATCH * SEQ
    result = {
        "command": "python -m benchmarks.dropout" + ("" if args.repeat == 3 else f" --repeat {args.repeat}"),
        "shape": SHAPE, "seq": SEQ, "batch": BATCH, "p": P, "machine": machine(), "versions": versions(),
        "mask_ms": masks,
        "step_s": {name: statistics.median(ts) for name, ts in steps.items()},
        "step_s_all": steps,
        "tokens_per_s": {name: tokens / statistics.median(ts) for name, ts in steps.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("mask_ms", "step_s", "tokens_per_s")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
