"""Export a model, optionally with a LoRA adapter merged into it, as a GGUF file for llama.cpp and Ollama.

    python -m lora.to_gguf --model MODEL [--adapter DIR] --output FILE.gguf --type {f32,f16,bf16,q8_0}
                           [--into original|quantized] [--name NAME]

MODEL is a checkpoint directory or hub id (or a .gguf file, where models.load_checkpoint reads those).
With --adapter the LoRA is merged first, exactly as `python -m lora.merge` merges it (the same
`lora.merge.merged_model`): a QLoRA adapter into the dequantized 4-bit base it was trained against,
unless --into original. The merge is computed in float32, so the merged weights are rounded once, to
--type. The tokenizer, chat template and stop tokens come from MODEL (models.load_tokenizer).

Beside FILE.gguf goes an Ollama `Modelfile` (models.modelfile): `ollama create NAME -f Modelfile`.
What the export could only approximate (a pre-tokenizer llama.cpp does not know, a sliding window,
an untranslatable chat template) is printed as warnings. Bad input prints one line to stderr and exits
with status 2, having written nothing: an unsupported architecture or tokenizer, a missing or broken
model, an adapter that is not LoRA (prefix or prompt tuning: nothing to merge), an output that exists.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lora.merge import INTO, UsageError, merged_model
from models.checkpoint import Loaded, load_checkpoint
from models.gguf_export import GGUF_TYPES, ExportResult, export_gguf
from models.hub import CheckpointError
from models.modelfile import modelfile_path
from models.tokenizer import load_tokenizer


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage too; one line is enough here
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m lora.to_gguf",
                            description="Export a model (with a LoRA adapter merged) as a GGUF file.")
    parser.add_argument("--model", required=True, help="model directory, hub id or .gguf file")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory to merge first")
    parser.add_argument("--output", required=True, help="the .gguf file to write (an Ollama Modelfile goes beside it)")
    parser.add_argument("--type", default="f16", choices=GGUF_TYPES, help="weight format (default f16)")
    parser.add_argument("--into", choices=INTO, help="with --adapter: merge into the original or the dequantized 4-bit weights")
    parser.add_argument("--name", help="general.name in the GGUF (default: the output file's stem)")
    return parser


def _check_output(output: str) -> Path:
    """The output path, refused before any loading when it is not a new .gguf file."""
    out = Path(output)
    if out.suffix != ".gguf":
        raise UsageError(f"--output {out} must end in .gguf")
    for path in (out, modelfile_path(out)):
        if path.exists():
            raise UsageError(f"{path} already exists: choose another --output (or remove it)")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such directory for --output")
    return out


def export(model: str, output: str, out_type: str = "f16", adapter: str | None = None, into: str | None = None,
           name: str | None = None) -> ExportResult:
    """Load `model` (merging `adapter` into it) and write it with its tokenizer to `output`."""
    out = _check_output(output)
    tokenizer = load_tokenizer(model)  # first: the cheaper of the two to find missing
    if adapter is None:
        loaded: Loaded = load_checkpoint(model)
    else:
        loaded = merged_model(model, adapter, dtype=torch.float32, into=into)
    return export_gguf(loaded.model, tokenizer, out, out_type, name=name)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        result = export(args.model, args.output, args.type, args.adapter, args.into, args.name)
    except (UsageError, CheckpointError, ValueError, OSError) as err:
        print(f"lora.to_gguf: error: {err}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"lora.to_gguf: warning: {note}", file=sys.stderr)
    ids = ", ".join(f"{k}={v}" for k, v in sorted(result.special_ids.items()))
    print(f"GGUF written to {result.path} ({args.type}; tokenizer.ggml.pre={result.pre_tokenizer}; {ids})")
    if result.modelfile is not None:
        print(f"Ollama Modelfile written to {result.modelfile}: ollama create NAME -f {result.modelfile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
