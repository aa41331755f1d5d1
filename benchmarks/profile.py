"""Where a LoRA step's time goes, before and after models.attention, and what `--compile` does, in one process.

    OMP_NUM_THREADS=2 python -m benchmarks.profile [--shape smollm2-135m] [--repeat 3] [--steps 3] [--json PATH]
        [--no-compile]

A random model of --shape (SmolLM2-135M's by default) trains with our LoRA step (train.loop.train_step, r 16 on
q,k,v,o, dropout 0.05, bf16 autocast) at 2 x 512 tokens, as benchmarks/vs_hf.py runs it, with each attention
path of `ATTENTION`: SDPA's CPU kernel (models.attention switched off), models.attention as one [T, T] block (its
first version) and in blocks of query positions (the current code).

1. Profile: torch.profiler around one step (after three warm-up steps) per path; each op's self CPU time
   goes to one bucket (matmuls, attention, elementwise, other; `BUCKETS` lists the ops).
2. Attention A/B: one model steps --repeat rounds of --steps steps with each attention path in turn; the best
   step of each (other processes only add time) and the median.
3. Compile: two copies of the model with the same weights, one eager and one with every block compiled
   (`Decoder.compile_blocks`, what `train.run --compile` does), take steps alternately. The compiled copy's first
   step holds the compile time (the second, a recompile if any); after that, --repeat rounds of --steps steps
   each give each side's steady-state step time: the best step (the machine is shared and other processes only
   add time; the median is kept too), and the break-even is the number of steps after which compiling has paid.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.vs_hf import SHAPES, build_model, machine, ours_config, ours_trainer, synthetic_rows, versions
from models import attention

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH = 512, 2
# self-CPU time of these ops is the bucket's; anything else is "other". The decoder's only batched matmuls and
# softmaxes are attention's (models.attention); the loss's softmax is aten::_log_softmax.
BUCKETS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::addmv", "aten::mv", "aten::_weight_int4pack_mm", "mkldnn"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::bmm", "aten::baddbmm",
                  "aten::_softmax", "aten::_softmax_backward_data", "_GroupedCausalAttention"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::copy_", "aten::to", "aten::_to_copy",
                    "aten::silu", "aten::sigmoid", "aten::exp", "aten::neg", "aten::cat", "aten::rsqrt", "aten::pow",
                    "aten::mean", "aten::sum", "aten::where", "aten::fill_", "aten::zero_", "aten::clone",
                    "aten::_log_softmax", "aten::sqrt", "aten::lerp", "aten::addcmul",
                    "aten::addcdiv", "aten::_foreach", "aten::maximum", "aten::masked_fill", "aten::index"),
}


def bucket(name: str) -> str:
    """The bucket of one profiler op name."""
    for kind, keys in BUCKETS.items():
        if any(name.startswith(k) or (k in name and not k.startswith("aten::")) for k in keys):
            return kind
    return "other"


class Trainer:
    """One model and optimizer stepping on the shared synthetic rows."""

    def __init__(self, model_dir: Path, vocab: int, compile_blocks: bool) -> None:
        torch.manual_seed(0)
        self.model, self.opt, self.sched = ours_trainer(ours_config("lora+compile" if compile_blocks else "lora", False),
                                                        model_dir, torch.device("cpu"))
        self.rows = synthetic_rows(vocab, BATCH * 64, SEQ)
        self.n = 0

    def step(self) -> float:
        """One optimizer step on the next rows; its wall time in s."""
        from train.loop import train_step

        i = self.n % (len(self.rows) // BATCH)
        x = self.rows[i * BATCH : (i + 1) * BATCH]
        self.n += 1
        t0 = time.perf_counter()
        train_step(self.model, self.opt, self.sched, [{"input_ids": x, "labels": x}], torch.device("cpu"),
                   torch.bfloat16, 1.0)
        return time.perf_counter() - t0


def profile_step(trainer: Trainer) -> dict:
    """{"step_ms", "buckets_ms": {bucket: ms}, "top": [(op, ms)]} of one step under torch.profiler (after 3 warm-ups)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        trainer.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = trainer.step()
    per_op: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        per_op[e.key] += e.self_cpu_time_total / 1e3
    buckets: dict[str, float] = defaultdict(float)
    for name, ms in per_op.items():
        buckets[bucket(name)] += ms
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    return {"step_ms": 1e3 * wall, "buckets_ms": {k: buckets.get(k, 0.0) for k in (*BUCKETS, "other")},
            "top": [[k, v] for k, v in top]}


# name -> (models.attention.applies, models.attention.BLOCK) while that path runs; the last is the current code
ATTENTION = {"SDPA (before models.attention)": (lambda q, k: False, attention.BLOCK),
             "models.attention, one [T, T] block": (attention.applies, None),
             f"models.attention, blocks of {attention.BLOCK} (now)": (attention.applies, attention.BLOCK)}
NOW = list(ATTENTION)[-1]


@contextmanager
def attention_path(name: str):
    """Run the decoder's attention as ATTENTION[name] inside (patched where the decoder looks it up)."""
    attention.applies, attention.BLOCK = ATTENTION[name]
    try:
        yield
    finally:
        attention.applies, attention.BLOCK = ATTENTION[NOW]


def attention_ab(trainer: Trainer, repeat: int, steps: int) -> dict:
    """Step times with each attention path in turn (patched where the decoder looks it up): best, median, all."""
    out: dict[str, list[float]] = {name: [] for name in ATTENTION}
    for _ in range(repeat):
        for name in ATTENTION:
            with attention_path(name):
                trainer.step()  # first step after a switch untimed
                out[name] += [trainer.step() for _ in range(steps)]
    best = {k: min(v) for k, v in out.items()}
    return {"best_step_s": best, "median_step_s": {k: statistics.median(v) for k, v in out.items()}, "steps_s": out,
            "tokens_per_s": {k: BATCH * SEQ / v for k, v in best.items()}}


def compile_ab(model_dir: Path, vocab: int, repeat: int, steps: int) -> dict:
    """Eager vs compiled blocks, alternating: first-step times, steady-state medians, break-even steps."""
    eager, compiled = Trainer(model_dir, vocab, False), Trainer(model_dir, vocab, True)
    first = {"eager": eager.step(), "compiled": compiled.step()}  # the compiled one compiles here
    second = {"eager": eager.step(), "compiled": compiled.step()}  # a recompile would show here
    all_steps: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeat):
        for name, t in (("eager", eager), ("compiled", compiled)):
            all_steps[name] += [t.step() for _ in range(steps)]
    # Other processes only add time: the best step is the quiet-machine estimate, the median is kept beside it.
    best = {k: min(v) for k, v in all_steps.items()}
    overhead = first["compiled"] + second["compiled"] - 2 * best["compiled"]
    saved = best["eager"] - best["compiled"]
    return {"first_step_s": first, "second_step_s": second, "best_step_s": best,
            "median_step_s": {k: statistics.median(v) for k, v in all_steps.items()}, "steps_s": all_steps,
            "compile_overhead_s": overhead, "break_even_steps": overhead / saved if saved > 0 else None,
            "tokens_per_s": {k: BATCH * SEQ / v for k, v in best.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="only the profile")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "profile.json")
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    flags = [f"--shape {args.shape}" if args.shape != "smollm2-135m" else "",
             f"--repeat {args.repeat}" if args.repeat != 3 else "", f"--steps {args.steps}" if args.steps != 3 else "",
             "--no-compile" if args.no_compile else ""]
    result = {"command": " ".join(["python -m benchmarks.profile", *filter(None, flags)]), "shape": args.shape,
              "seq": SEQ, "batch": BATCH, "machine": machine(), "versions": versions()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", shape)
        trainer = Trainer(model_dir, shape["vocab_size"], False)
        result["profile"] = {}
        for name in ATTENTION:
            with attention_path(name):
                result["profile"][name] = profile_step(trainer)
        print(json.dumps(result["profile"], indent=1), flush=True)
        result["attention"] = attention_ab(trainer, args.repeat, args.steps)
        print(json.dumps(result["attention"], indent=1), flush=True)
        del trainer
        if not args.no_compile:
            result["compile"] = compile_ab(model_dir, shape["vocab_size"], args.repeat, args.steps)
            print(json.dumps(result["compile"], indent=1), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
