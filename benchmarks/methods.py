"""What each method costs on one model and dataset: parameters, weight bytes, peak memory, speed, loss.

    OMP_NUM_THREADS=2 python -m benchmarks.methods [--steps 8] [--warmup 2] [--dtype bfloat16] [--json PATH]

Builds a random ~31M-parameter Llama (grouped-query attention, the demo tokenizer) and a slice of
the demo corpus in a temporary directory, then runs `python -m train.run --method M` for full,
lora, qlora, prefix and prompt, each in a fresh process so that its peak memory is its own:
train.run reports peak_memory_mib, which is torch.cuda.max_memory_allocated on a GPU and the peak
resident set (VmHWM, so it includes the interpreter and torch themselves, the floor every method
shares) on a CPU. Per method:

- trainable parameters (as train.run prints them) and their share of the model;
- weight bytes: resident bytes of every parameter and buffer of the model as the method builds it
  (frozen bf16 or NF4 base plus float32 trainables), measured in this process with
  train.methods' Method.build, and the bytes of the weights the run saves;
- tokens/s: target tokens over wall time of the steps after --warmup (from train.run's metrics.jsonl);
- the training loss of the last step and the validation loss of the end of the run.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "qlora", "prefix", "prompt")
MODEL = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 10, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64, "tie_word_embeddings": False}
SEQ, BATCH = 128, 4


def build_model(out_dir: Path) -> Path:
    """A random Llama of MODEL's shape with the demo tokenizer, saved in Hugging Face format."""
    from demo.tiny import DEMO_MODEL_CONFIG, build_demo_tokenizer
    from models.checkpoint import save_pretrained
    from models.config import ModelConfig
    from models.decoder import Decoder

    build_demo_tokenizer(out_dir)
    tok = json.loads((out_dir / "tokenizer.json").read_text())
    vocab = max(len(tok["model"]["vocab"]), max((t["id"] for t in tok.get("added_tokens", [])), default=0) + 1)
    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_hf_dict({**DEMO_MODEL_CONFIG, **MODEL, "vocab_size": vocab}))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, out_dir, tokenizer_dir=out_dir)
    return out_dir


def build_data(path: Path, n: int = 512) -> Path:
    from demo.corpus import demo_corpus

    path.write_text("".join(json.dumps(r) + "\n" for r in demo_corpus()[:n]))
    return path


def run_method(method: str, model: Path, data: Path, out: Path, steps: int, dtype: str) -> dict:
    """Train in a fresh process; return its summary, its per-step metrics and the trainable count it printed."""
    cmd = [sys.executable, "-m", "train.run", "--method", method, "--model", str(model), "--data", str(data),
           "--val-fraction", "0.1", "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--max-steps", str(steps),
           "--eval-every", "0", "--save-every", "0", "--dtype", dtype, "--output-dir", str(out), "--overwrite"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    found = re.search(r"trainable params: ([\d,]+)", proc.stderr)
    summary["trainable"] = int(found.group(1).replace(",", "")) if found else None
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    summary["train_steps"] = [m for m in metrics if "loss" in m and "tokens_per_s" in m]
    summary["val_loss"] = next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None)
    return summary


def resident_weight_bytes(method: str, model: Path, dtype: str) -> int:
    """Bytes of all parameters and buffers of the model as train.methods builds it for `method`."""
    from train.config import TrainConfig

    cfg = TrainConfig()
    cfg.run.method = method
    compute = torch.float32 if dtype == "float32" else torch.bfloat16
    built = cfg.method.build(cfg, str(model), torch.device("cpu"), compute).model
    seen: set[int] = set()
    total = 0
    for t in list(built.parameters()) + list(built.buffers()):
        if t.data_ptr() not in seen:  # the tied head is counted once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def tokens_per_s(steps: list[dict], warmup: int) -> float | None:
    """Target tokens / seconds over the steps after `warmup` (each step's seconds = tokens / its tokens_per_s)."""
    timed = steps[warmup:]
    seconds = sum(s["tokens"] / s["tokens_per_s"] for s in timed if s["tokens_per_s"] > 0)
    return sum(s["tokens"] for s in timed) / seconds if seconds > 0 else None


def tensor_elements(files: list[Path]) -> int:
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            total += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def row(method: str, summary: dict, weight_bytes: int, warmup: int) -> dict:
    """One table row: the numbers of one method's run."""
    product = Path(summary["output"])
    files = sorted(product.glob("*.safetensors"))
    trainable = summary["trainable"] if summary["trainable"] is not None else tensor_elements(files)
    steps = summary["train_steps"]
    return {"method": method, "trainable": trainable, "weight_bytes": weight_bytes,
            "saved_bytes": sum(f.stat().st_size for f in files), "peak_mem_mib": summary["peak_memory_mib"],
            "tokens_per_s": tokens_per_s(steps, warmup), "final_loss": steps[-1]["loss"] if steps else None,
            "val_loss": summary["val_loss"]}


def table(rows: list[dict], total_params: int) -> str:
    lines = ["| Method | Trainable parameters | Weights in memory | Saved weights | Peak memory | tokens/s | last train loss | val loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = 100 * r["trainable"] / total_params
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        lines.append(f"| `{r['method']}` | {r['trainable']:,} ({share:.3g}%) | {_size(r['weight_bytes'])} | "
                     f"{_size(r['saved_bytes'])} | {r['peak_mem_mib']:,.0f} MiB | {tps} | {r['final_loss']:.3f} | {val} |")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="training steps per method, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="train.run --dtype")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--keep", help="build in this directory instead of a temporary one")
    p.add_argument("--json", help="write the rows (and machine, versions) here")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")
    from tqdm import tqdm

    from benchmarks.vs_hf import machine, versions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        model = build_model(root / "model")
        data = build_data(root / "data.jsonl")
        rows = []
        for m in tqdm(methods, desc="methods", unit="run"):
            summary = run_method(m, model, data, root / m, args.steps, args.dtype)
            rows.append(row(m, summary, resident_weight_bytes(m, model, args.dtype), args.warmup))
        total = tensor_elements(sorted(model.glob("*.safetensors")))
    head = (f"Random Llama, {total / 1e6:.1f}M parameters ({MODEL['num_hidden_layers']} layers, hidden "
            f"{MODEL['hidden_size']}, {MODEL['num_attention_heads']} query / {MODEL['num_key_value_heads']} kv heads), "
            f"{args.dtype}, batch {BATCH} x {SEQ} tokens, {args.steps} steps ({args.warmup} warm-up), {device.upper()}; "
            "defaults otherwise (LoRA r=16 on q,k,v,o; 20 virtual tokens).")
    print(head + "\n")
    print(table(rows, total))
    if args.json:
        doc = {"machine": machine(), "versions": versions(),
               "command": " ".join(["python -m benchmarks.methods", *(sys.argv[1:] if argv is None else argv)]),
               "device": device, "params": total, "seq": SEQ, "batch": BATCH, "steps": args.steps, "warmup": args.warmup,
               "dtype": args.dtype, "header": head, "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
