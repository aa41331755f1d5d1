"""`python -m serve.generate`: one prompt from the command line, on a base with or without an adapter.

    python -m serve.generate --model Qwen/Qwen2.5-0.5B --prompt "The capital of France is" \
        --max-new-tokens 20 --temperature 0
    python -m serve.generate --model Qwen/Qwen2.5-0.5B --adapter runs/qlora/adapter --chat --prompt "Hi"

prints only the generated continuation on stdout. The adapter (any kind, ours or PEFT's) goes on through
adapters.load_adapted, so a QLoRA adapter runs on the 4-bit base it was trained on. Bad input prints
one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

import torch

from adapters import load_adapted
from models.generate import SamplingConfig, generate
from models.hub import CheckpointError
from models.tokenizer import load_tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--adapter", help="adapter directory (or a train.run output directory holding adapter/), ours or PEFT's")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", help="with --chat: a system message before it")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        print("error: need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1", file=sys.stderr)
        return 2
    if args.system is not None and not args.chat:
        print("error: --system is for a chat prompt: add --chat", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tok = load_tokenizer(args.model)
        model = load_adapted(args.model, args.adapter, args.dtype, device).model
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = args.prompt
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        text = tok.render_chat([*system, {"role": "user", "content": text}], add_generation_prompt=True)
    cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, tuple(sorted(tok.stop_ids)), args.seed)
    new = generate(model, [tok.encode(text)], cfg, pad_id=tok.pad_id)[0]
    print(tok.decode(new, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
