"""How this trainer's step time and peak memory grow with sequence length and with model size.

    OMP_NUM_THREADS=2 python -m benchmarks.scaling [--quick] [--method lora] [--device cpu|cuda]
        [--json benchmarks/results/scaling.json] [--png benchmarks/results/scaling.png]

Two sweeps, every point a fresh process running `benchmarks.vs_hf`'s "ours" worker (train.methods
.Method.build + train.loop.train_step, bf16 autocast, AdamW), so each peak is its own:

1. sequence length 256, 512, 1024, 2048 on one shape (the --quick 33M Llama), with and without
   activation checkpointing (per decoder block, recomputed in backward);
2. model size at one sequence length: a 7M, the 33M and the SmolLM2-135M shape (and without --quick
   the Qwen2.5-0.5B shape too), without activation checkpointing.

Seconds per step are the mean of the steps after the warm-up; peak memory is VmHWM minus the
resident set after imports on the CPU, torch.cuda.max_memory_allocated on a GPU. Writes the points
as JSON and a PNG with four panels (time and memory against length, time and memory against size).
--quick (batch 1, 1 warm-up + 2 timed steps, sizes up to 135M) takes about 1-2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import vs_hf

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192, "tie_word_embeddings": True}
SIZE_SHAPES = {"small-7m": SMALL, "quick-33m": vs_hf.QUICK, "smollm2-135m": vs_hf.SMOLLM2_135M,
               "qwen2.5-0.5b": vs_hf.QWEN25_05B}
SEQS = (256, 512, 1024, 2048)


def point(model: Path, shape: dict, method: str, seq: int, batch: int, steps: int, warmup: int, ckpt: bool,
          device: str, out: Path) -> dict:
    """One fresh-process run of the ours worker; the row it returns, or {"error": ...}."""
    opts = argparse.Namespace(seq=seq, batch=batch, steps=steps, warmup=warmup, device=device,
                              grad_checkpointing=ckpt)
    r = vs_hf.spawn("ours", method, model, out, opts, shape["vocab_size"])
    r.update(seq=seq, batch=batch, grad_checkpointing=ckpt)
    if "error" not in r:
        r["step_s_mean"] = sum(r["step_s"]) / len(r["step_s"])
    return r


def plot(doc: dict, png: Path) -> None:
    """Four panels: step time and peak memory against length (checkpointing on/off) and against size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for ckpt, style in ((False, "o-"), (True, "s--")):
        pts = [p for p in doc["seq_sweep"] if p["grad_checkpointing"] == ckpt and "error" not in p]
        label = "activation checkpointing" if ckpt else "no checkpointing"
        ax[0][0].plot([p["seq"] for p in pts], [p["step_s_mean"] for p in pts], style, label=label)
        ax[0][1].plot([p["seq"] for p in pts], [p["peak_mem_mib"] for p in pts], style, label=label)
    for a, what in ((ax[0][0], "seconds per step"), (ax[0][1], "peak memory, MiB")):
        a.set_xscale("log", base=2)
        a.set_xlabel(f"sequence length (batch {doc['seq_batch']}, {doc['seq_shape']} shape)")
        a.set_ylabel(what)
        a.grid(True, alpha=0.3)
        a.legend()
    pts = [p for p in doc["size_sweep"] if "error" not in p]
    params = [p["params"] / 1e6 for p in pts]
    ax[1][0].plot(params, [p["step_s_mean"] for p in pts], "o-")
    ax[1][1].plot(params, [p["peak_mem_mib"] for p in pts], "o-")
    for a, what in ((ax[1][0], "seconds per step"), (ax[1][1], "peak memory, MiB")):
        a.set_xscale("log")
        a.set_xlabel(f"parameters, millions (seq {doc['size_seq']}, batch {doc['size_batch']})")
        a.set_ylabel(what)
        a.grid(True, alpha=0.3)
        for p, x in zip(pts, params):
            a.annotate(p["shape_name"], (x, p["step_s_mean"] if a is ax[1][0] else p["peak_mem_mib"]), fontsize=8)
    fig.suptitle(f"this trainer, --method {doc['method']}, bf16 autocast, {doc['device']}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1, 1+2 steps, sizes up to 135M (1-2 min on 2 cores)")
    p.add_argument("--method", default="lora", choices=("lora", "qlora", "full"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/scaling.json"))
    p.add_argument("--png", default=str(ROOT / "benchmarks/results/scaling.png"))
    args = p.parse_args(argv)
    from tqdm import tqdm

    batch, steps, warmup = (1, 2, 1) if args.quick else (2, 3, 2)
    size_seq = 512
    sizes = [n for n in SIZE_SHAPES if not (args.quick and n == "qwen2.5-0.5b")]
    jobs = [("seq", "quick-33m", seq, ckpt) for ckpt in (False, True) for seq in SEQS]
    jobs += [("size", name, size_seq, False) for name in sizes]
    doc = {"machine": vs_hf.machine(), "versions": vs_hf.versions(),
           "command": " ".join(["python -m benchmarks.scaling", *(sys.argv[1:] if argv is None else argv)]),
           "method": args.method, "device": args.device, "steps": steps, "warmup": warmup,
           "seq_shape": "quick-33m", "seq_batch": batch, "size_seq": size_seq, "size_batch": 1,
           "seq_sweep": [], "size_sweep": []}
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[str, Path] = {}
        for kind, name, seq, ckpt in tqdm(jobs, desc="points", unit="run"):
            shape = SIZE_SHAPES[name]
            if name not in built:
                built[name] = vs_hf.build_model(Path(tmp) / name, shape)
            b = batch if kind == "seq" else 1
            r = point(built[name], shape, args.method, seq, b, steps, warmup, ckpt, args.device, Path(tmp) / "out")
            r.update(shape_name=name, params=vs_hf.param_counts(shape)[0])
            doc["seq_sweep" if kind == "seq" else "size_sweep"].append(r)
    lines = ["| sweep | shape | seq | batch | checkpointing | s/step | peak MiB |", "|---|---|---:|---:|---|---:|---:|"]
    for kind in ("seq_sweep", "size_sweep"):
        for r in doc[kind]:
            cell = "failed" if "error" in r else f"{r['step_s_mean']:.2f} | {r['peak_mem_mib']:,.0f}"
            lines.append(f"| {kind[:-6]} | {r['shape_name']} | {r['seq']} | {r['batch']} | "
                         f"{'on' if r['grad_checkpointing'] else 'off'} | {cell} |")
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    plot(doc, Path(args.png))
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
