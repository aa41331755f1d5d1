"""What each method costs on one model: trainable parameters, output size, peak training memory.

    OMP_NUM_THREADS=2 python -m benchmarks.methods_table [--steps 3] [--keep DIR]

Builds a random ~31M-parameter Llama (grouped-query attention, the demo tokenizer) in a temporary
directory, then runs `python -m train.run --method M --max-steps 3` for full, lora, qlora, prefix
and prompt, each in a fresh process so that its peak resident memory (VmHWM of /proc/self/status,
which train.run reports as peak_memory_mib on a CPU; peak allocated memory on a GPU) is its own.
Prints a markdown table. Numbers on a CPU include the interpreter and torch themselves (a few
hundred MiB), which is the floor every method shares.
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


def build_model(out_dir: Path) -> Path:
    """A random Llama of MODEL's shape with the demo tokenizer, saved in Hugging Face format."""
    from models.checkpoint import save_pretrained
    from models.config import ModelConfig
    from models.decoder import Decoder
    from models.demo import DEMO_MODEL_CONFIG, build_demo_tokenizer

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


def build_data(path: Path, n: int = 256) -> Path:
    from train.demo import ensure_demo_data

    lines = ensure_demo_data().read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_method(method: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    """Train in a fresh process; return its summary plus the trainable-parameter count it printed."""
    cmd = [sys.executable, "-m", "train.run", "--method", method, "--model", str(model), "--data", str(data),
           "--val-fraction", "0.1", "--seq-len", "128", "--batch-size", "4", "--max-steps", str(steps),
           "--eval-every", "0", "--save-every", "0", "--dtype", "float32", "--output-dir", str(out), "--overwrite"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    found = re.search(r"trainable params: ([\d,]+)", proc.stderr)
    summary["trainable"] = int(found.group(1).replace(",", "")) if found else None
    return summary


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


def row(method: str, summary: dict) -> tuple[str, int, int, float]:
    """(method, trainable parameters, bytes written, peak MiB) for one run."""
    product = Path(summary["output"])
    files = sorted(product.glob("*.safetensors"))
    trainable = summary["trainable"] if summary["trainable"] is not None else tensor_elements(files)
    return method, trainable, sum(f.stat().st_size for f in files), summary["peak_memory_mib"]


def table(rows: list[tuple[str, int, int, float]], total_params: int) -> str:
    lines = ["| Method | Trainable parameters | Saved weights | Peak training memory |", "|---|---:|---:|---:|"]
    for method, trainable, size, peak in rows:
        share = 100 * trainable / total_params
        lines.append(f"| `{method}` | {trainable:,} ({share:.3g}%) | {_size(size)} | {peak:,.0f} MiB |")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods_table", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--keep", help="build in this directory instead of a temporary one")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        model = build_model(root / "model")
        data = build_data(root / "data.jsonl")
        rows = [row(m, run_method(m, model, data, root / m, args.steps)) for m in METHODS]
        total = tensor_elements(sorted(model.glob("*.safetensors")))
    print(f"Random Llama, {total / 1e6:.1f}M parameters ({MODEL['num_hidden_layers']} layers, hidden "
          f"{MODEL['hidden_size']}, {MODEL['num_attention_heads']} query / {MODEL['num_key_value_heads']} kv heads), "
          f"float32, batch 4 x 128 tokens, {args.steps} steps, {'GPU' if torch.cuda.is_available() else 'CPU'}; "
          "defaults otherwise (LoRA r=16 on q,k,v,o; 20 virtual tokens).\n")
    print(table(rows, total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
