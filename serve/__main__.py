"""`python -m serve --model M [--adapter NAME=DIR ...]`: an OpenAI-compatible server on 127.0.0.1:8000.

    python -m serve --model Qwen/Qwen2.5-0.5B --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 16, "temperature": 0}'
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters import trained_base
from models.checkpoint import load_checkpoint
from models.hub import CheckpointError
from models.tokenizer import load_tokenizer
from models.weight_format import WeightFormat
from serve.adapters import AdapterRegistry
from serve.engine import Engine, EngineConfig
from serve.protocol import APIError, Limits
from serve.server import App, make_server

log = logging.getLogger("serve")
API_KEY_ENV = "FTKIT_API_KEY"


@dataclass
class ServeOptions:
    model: str
    adapters: dict[str, str]
    load_in_4bit: bool = False
    adapter_root: str | None = None
    dtype: str | None = None
    device: str | None = None
    served_model_name: str | None = None  # the base's name in `model` fields (default: default_name(model))
    api_key: str | None = None  # every endpoint but /health wants "Authorization: Bearer <key>"
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)


def build_app(opts: ServeOptions):
    """Load the base once, register the adapters and start the engine; returns a serve.server.App."""
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(opts.model)
    trained_on = _trained_base(opts)
    if trained_on is not None:
        log.info("loading the base as the adapters were trained on it: %s", trained_on)
        base = load_checkpoint(opts.model, device=device, **trained_on.load_kwargs())
    else:
        base = load_checkpoint(opts.model, dtype=opts.dtype, device=device, quantize="nf4" if opts.load_in_4bit else None)
    engine = Engine(base.model, tokenizer, opts.engine)
    registry = AdapterRegistry(base.model, engine.lock, opts.served_model_name or default_name(opts.model),
                               opts.adapter_root, base.format, aliases=(opts.model,))
    engine.has_adapter = registry.has
    engine.virtual_tokens = registry.virtual_tokens
    for name, directory in opts.adapters.items():  # the operator's own command line: not limited to the root
        registry.load(name, directory)
    return App(engine.start(), registry, tokenizer, opts.limits, api_key=opts.api_key)


def default_name(model: str) -> str:
    """The base's name in /v1/models: a local directory's or file's own name (no path: it says nothing to
    a client and may say too much about the server), a hub id as it is."""
    path = Path(model)
    if path.is_dir():
        return path.resolve().name
    if path.is_file():
        return path.stem if path.suffix == ".gguf" else path.name
    return model


def _trained_base(opts: ServeOptions) -> WeightFormat | None:
    """The 4-bit base the start-up adapters were trained on, when the command line leaves the base's format
    open (no --dtype, no --load-in-4bit) and their records name one: serving a QLoRA adapter on any other
    base computes something else than was trained (quantizing from another dtype gives other 4-bit codes)."""
    if opts.dtype is not None or opts.load_in_4bit:
        return None
    formats = {f for f in map(trained_base, opts.adapters.values()) if f is not None}
    return formats.pop() if len(formats) == 1 else None


def _adapter_arg(value: str) -> tuple[str, str]:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=DIR")
    return name, directory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="base checkpoint directory or hub id")
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR",
                   help="serve adapter DIR as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--load-in-4bit", action="store_true", help="quantize the base to NF4 while loading")
    p.add_argument("--adapter-root", help="enables POST/DELETE /admin/adapters for directories under this one")
    p.add_argument("--served-model-name", help="the base's name in requests and /v1/models (default: the model "
                   "directory's or file's name, or the hub id; --model as given is accepted too)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help="require 'Authorization: Bearer KEY' on "
                   f"every endpoint but /health (default: ${API_KEY_ENV} when set)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--max-batch", type=int, default=16, help="requests per batch at most")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="wait this long for more requests")
    p.add_argument("--no-cross-adapter-batching", action="store_true", help="batch only requests for the same adapter")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    p.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    p.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens, help="largest max_tokens a request may ask")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        raise SystemExit("error: an adapter name is given twice")
    return ServeOptions(
        model=args.model, adapters=dict(args.adapter), load_in_4bit=args.load_in_4bit, adapter_root=args.adapter_root,
        dtype=args.dtype, device=args.device, served_model_name=args.served_model_name, api_key=args.api_key or None,
        engine=EngineConfig(args.max_batch, args.batch_window_ms / 1000, not args.no_cross_adapter_batching),
        limits=Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                      max_tokens=args.max_tokens_limit),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        app = build_app(options_from_args(args))
    except (APIError, CheckpointError, OSError) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    server = make_server(app, args.host, args.port)
    host, port = server.server_address[:2]
    logging.getLogger("serve").info("serving %s (+%d adapters) on http://%s:%d%s", app.registry.base_name,
                                    len(app.registry.names), host, port,
                                    "; requests need an API key" if app.api_key else "")
    # SIGTERM (docker stop, systemd) shuts down as Ctrl-C does; shutdown() must come from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
