"""Merge a LoRA adapter into its base model and write a plain Hugging Face checkpoint.

    python -m lora.merge --base MODEL --adapter DIR --output DIR [--dtype float32|bfloat16|float16]
                         [--into original|quantized]

Which weights the adapter is added to (--into):
- quantized: the dequantized 4-bit (NF4) weights. This is what an adapter trained on a 4-bit base
  (QLoRA) was trained against, so the merged model computes what was trained; it is the default
  for such adapters (recorded in the adapter's lora_training.json). The base is re-quantized from
  the dtype training loaded it in (lora_training.json's base_dtype), which gives the same 4-bit
  weights bit for bit; the other tensors (embeddings, norms, lm_head) are likewise those trained with
  (embedding and head dequantized from 4 bits when training held them so: --quantize-embeddings).
- original: the checkpoint's full-precision weights; the default for adapters trained on a
  full-precision base. For a QLoRA adapter this gives a slightly different model from the one
  trained, since the quantization error of the base is not part of it.

The merged model is stored in --dtype (default: the base checkpoint's dtype) with the base's
tokenizer files. Bad input prints one line to stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from lora.adapter_io import load_adapter, read_adapter_config
from lora.inject import unload
from models.checkpoint import Loaded, load_checkpoint, load_config, save_pretrained
from models.config import dtype_from_name
from models.hub import CheckpointError, resolve_model_dir
from models.weight_format import WeightFormat, read_record

INTO = ("original", "quantized")


class UsageError(Exception):
    """A bad command line or bad input: reported as one line, exit status 2."""


def merged_model(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    into: str | None = None,
) -> Loaded:
    """Load `base`, add the LoRA adapter in `adapter_dir` and merge it: the plain model, in memory.

    into: "original" or "quantized" (None: "quantized" if the adapter was trained on a 4-bit base).
    dtype: dtype of the result (None: the base checkpoint's). Returns Loaded: the merged model, the base
    directory (whose tokenizer files go with it) and format.dtype, the dtype to store it in.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir}: no such adapter directory")
    read_adapter_config(adapter_dir)  # refuse a bad or non-LoRA adapter before loading the base
    trained_on = read_record(adapter_dir)  # None for an adapter made elsewhere
    into = into or ("quantized" if trained_on and trained_on.quantize else "original")
    if into not in INTO:
        raise UsageError(f"--into must be one of {', '.join(INTO)}, got {into!r}")
    if into == "quantized":
        # Quantize from the dtype training loaded the base in, so the 4-bit weights are the trained-against
        # ones bit for bit; float32 compute: the merged weight is dequantize(W) + delta, rounded once to `stored`.
        loaded = load_checkpoint(base, dtype=trained_on.dtype if trained_on else None, quantize="nf4",
                                 compute_dtype=torch.float32,
                                 quantize_embeddings=bool(trained_on and trained_on.quantize_embeddings))
        stored = dtype_from_name(dtype) or _checkpoint_dtype(loaded.directory)
    else:
        # Merging rounds (W + delta) computed in float32 once to the weight dtype, so load in `stored` directly.
        loaded = load_checkpoint(base, dtype=dtype)
        stored = loaded.format.dtype
    load_adapter(loaded.model, adapter_dir)
    unload(loaded.model, merge=True)
    return Loaded(loaded.model, loaded.directory, WeightFormat(stored))


def _checkpoint_dtype(location: Path) -> torch.dtype:
    """The dtype a checkpoint (directory or .gguf file) stores its weights in, float32 if it says none."""
    return dtype_from_name(load_config(location).torch_dtype) or torch.float32


def merge_adapter(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    into: str | None = None,
) -> Path:
    """Load `base`, add the adapter in `adapter_dir`, merge it, save an HF checkpoint to `output`.

    into: "original" or "quantized" (None: "quantized" if the adapter was trained on a 4-bit base).
    dtype: stored dtype of the result (None: the base checkpoint's).
    """
    out = Path(output)
    if out.resolve() in (resolve_model_dir(base).resolve(), Path(adapter_dir).resolve()):
        raise UsageError(f"--output {out} would overwrite the base model or the adapter: choose another directory")
    merged = merged_model(base, adapter_dir, dtype, into)
    return save_pretrained(merged.model, out, dtype=merged.format.dtype, tokenizer_dir=merged.directory)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m lora.merge", description="Merge a LoRA adapter into its base model.")
    parser.add_argument("--base", help="base model directory or hub id (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument("--output", required=True, help="directory for the merged Hugging Face checkpoint")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype (default: the base's)")
    parser.add_argument("--into", choices=INTO, help="merge into the original weights or the dequantized 4-bit ones")
    return parser


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage too; one line is enough here
        raise UsageError(message)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        base = args.base or _base_from_adapter(Path(args.adapter))
        out = merge_adapter(base, args.adapter, args.output, args.dtype, args.into)
    except (UsageError, CheckpointError, ValueError, OSError) as err:
        print(f"lora.merge: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


def _base_from_adapter(adapter_dir: Path) -> str:
    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not base:
        raise UsageError(f"--base not given and {adapter_dir / 'adapter_config.json'} names no base_model_name_or_path")
    return base


if __name__ == "__main__":
    sys.exit(main())
