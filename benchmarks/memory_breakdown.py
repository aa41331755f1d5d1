"""Which tensors hold this trainer's memory: weights by kind, optimizer state, saved activations, loss.

    OMP_NUM_THREADS=2 python -m benchmarks.memory_breakdown [--shape qwen2.5-0.5b] [--methods lora,qlora,qlora+embed]
        [--seq 256] [--batch 1] [--grad-checkpointing] [--json PATH]

Each method runs in a fresh process (benchmarks.vs_hf's model and settings: r=16 on q,k,v,o, bf16
autocast) that measures, in MiB (qlora+embed is qlora with --quantize-embeddings):

- weights: bytes of parameters and buffers, split into block linears (bf16 or NF4), embedding /
  tied head, norms and biases, and LoRA adapters (float32 masters);
- optimizer: AdamW's state after one step (two float32 moments per trainable parameter) plus grads;
- saved activations: distinct storages autograd keeps after one forward and the loss (counted with
  torch.autograd.graph.saved_tensors_hooks; parameters and buffers left out);
- loss transient: one chunk of train.loss: its float32 logits (turned into the softmax gradient in
  place) and their bf16 copy for the matmuls, rows x vocab x (4 + 2) (counted, not measured);
- peak: VmHWM minus the resident set after imports, over loading plus two training steps.
The rest of the peak (peak minus the parts) is allocator slack, library workspaces and transients.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import vs_hf

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def loss_chunk_rows(vocab: int) -> int:
    """Target rows per chunk of train.loss.causal_lm_loss_sum: sized by train.loss.chunk_rows where it exists."""
    try:
        from train.loss import chunk_rows
    except ImportError:  # the loss of commit b23434d: a fixed 2048-row chunk
        return 2048
    return chunk_rows(vocab)


def _storage_bytes(tensors) -> tuple[int, set[int]]:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()), set(seen)


def weight_parts(model: torch.nn.Module) -> dict[str, float]:
    """MiB of parameters and buffers by kind (each storage once, so the tied head is not counted twice)."""
    from quant import NF4Linear

    parts = {"block linears": 0, "embedding / tied head": 0, "norms, biases, rotary": 0, "LoRA adapters": 0}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None or t.untyped_storage().data_ptr() in seen:
                continue
            ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
            n = t.untyped_storage().nbytes()
            if ".lora_" in f"{name}." or "lora_" in name:
                parts["LoRA adapters"] += n
            elif "embed_tokens" in name or name == "lm_head":
                parts["embedding / tied head"] += n
            elif isinstance(module, (torch.nn.Linear, NF4Linear)) and pname in ("weight", "weight_packed", "absmax_q",
                                                                                 "nested_absmax", "absmax_offset"):
                parts["block linears"] += n
            else:
                parts["norms, biases, rotary"] += n
    return {k: v / MiB for k, v in parts.items()}


def worker(args: argparse.Namespace) -> dict:
    from train.loop import autocast_context, forward_loss_sum, train_step

    base = vs_hf.rss_mib()
    cfg = vs_hf.ours_config(args.method, bool(args.grad_checkpointing))
    device = torch.device("cpu")
    model, opt, sched = vs_hf.ours_trainer(cfg, args.model, device)
    out = {"method": args.method, "load_peak_mib": vs_hf.rss_mib("VmHWM") - base, "weights_mib": weight_parts(model)}
    rows = vs_hf.synthetic_rows(args.vocab, args.batch * 3, args.seq)
    train_step(model, opt, sched, [{"input_ids": rows[: args.batch], "labels": rows[: args.batch]}], device,
               torch.bfloat16, 1.0)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["optimizer_and_grads_mib"] = (_storage_bytes(state)[0] + sum(p.numel() * 4 for p in trainable)) / MiB
    # saved activations of one forward + loss, parameters and buffers excluded
    _, weight_ptrs = _storage_bytes(list(model.parameters()) + list(model.buffers()))
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weight_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    batch = {"input_ids": rows[args.batch : 2 * args.batch], "labels": rows[args.batch : 2 * args.batch]}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(device, torch.bfloat16):
        summed, _ = forward_loss_sum(model, batch)
    summed.backward()
    model.zero_grad(set_to_none=True)
    out["saved_activations_mib"] = sum(saved.values()) / MiB
    vocab = args.vocab
    if cfg.lora.quantize_embeddings:  # the 4-bit head is read by vocabulary slices (train.loss)
        from quant.embedding import QuantizedHead

        vocab = min(vocab, QuantizedHead.VOCAB_CHUNK)
    target_rows = min(args.batch * (args.seq - 1), loss_chunk_rows(vocab))
    out["loss_transient_mib"] = target_rows * vocab * (4 + 2) / MiB
    train_step(model, opt, sched, [{"input_ids": rows[2 * args.batch :], "labels": rows[2 * args.batch :]}], device,
               torch.bfloat16, 1.0)
    out["peak_mib"] = vs_hf.rss_mib("VmHWM") - base
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_breakdown", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(vs_hf.SHAPES))
    p.add_argument("--methods", default="lora,qlora")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on")
    p.add_argument("--keep", help="build the model in this directory instead of a temporary one")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0
    shape = vs_hf.SHAPES[args.shape]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        model = root / "model"
        if not (model / "config.json").exists():
            vs_hf.build_model(model, shape)
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "benchmarks.memory_breakdown", "--worker", "--method", method, "--model", str(model),
                   "--vocab", str(shape["vocab_size"]), "--seq", str(args.seq), "--batch", str(args.batch)]
            cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            rows.append(json.loads(line[7:]) if line else {"method": method, "error": proc.stderr.strip().splitlines()[-1:]})
    print(report(rows, args))
    if args.json:
        doc = {"machine": vs_hf.machine(), "versions": vs_hf.versions(), "shape_name": args.shape, "shape": shape,
               "seq": args.seq, "batch": args.batch, "grad_checkpointing": bool(args.grad_checkpointing),
               "command": " ".join(["python -m benchmarks.memory_breakdown", *(sys.argv[1:] if argv is None else argv)]),
               "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


def report(rows: list[dict], args: argparse.Namespace) -> str:
    """A markdown table: one column per method, one row per part of the peak."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return "all runs failed: " + "; ".join(" ".join(r["error"]) for r in rows)
    names = list(ok[0]["weights_mib"])
    lines = ["| MiB | " + " | ".join(r["method"] for r in ok) + " |", "|---|" + "---:|" * len(ok)]
    for n in names:
        lines.append(f"| weights: {n} | " + " | ".join(f"{r['weights_mib'][n]:,.0f}" for r in ok) + " |")
    for key, label in (("optimizer_and_grads_mib", "adapter grads + AdamW state"),
                       ("saved_activations_mib", f"saved activations (batch {args.batch} x {args.seq})"),
                       ("loss_transient_mib", "loss transient (one logits chunk and its bf16 gradient; counted)")):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:,.0f}" for r in ok) + " |")
    for r in ok:
        r["sum_mib"] = sum(r["weights_mib"].values()) + r["optimizer_and_grads_mib"] + r["saved_activations_mib"] + r["loss_transient_mib"]
    lines.append("| sum of the parts | " + " | ".join(f"{r['sum_mib']:,.0f}" for r in ok) + " |")
    lines.append("| measured peak (VmHWM - base) | " + " | ".join(f"{r['peak_mib']:,.0f}" for r in ok) + " |")
    lines.append("| rest (allocator, workspaces, transients) | " + " | ".join(f"{r['peak_mib'] - r['sum_mib']:,.0f}" for r in ok) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
