"""`python -m serve --model M [--adapter NAME=DIR ...]`: an OpenAI-compatible server on 127.0.0.1:8000.

    python -m serve --model Qwen/Qwen2.5-0.5B --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 16, "temperature": 0}'

The base is held as the adapters need it: an adapter trained on a 4-bit base (its lora_training.json)
gets that base (quantized from the same dtype); adapters needing different bases, or a --dtype that
contradicts one, are refused at start-up in one line. With --adapter-root, a request naming an adapter
that is not loaded loads it from the root (at most --max-adapters held, least recently used evicted;
see serve.adapters). SIGTERM (or Ctrl-C) drains: nothing new is admitted, running requests get up to
--shutdown-timeout seconds to finish (then they end with an error), and the process exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters import describe, trained_base
from models.checkpoint import load_checkpoint
from models.config import dtype_from_name
from models.hub import CheckpointError
from models.tokenizer import load_tokenizer
from models.weight_format import WeightFormat
from serve.adapters import DEFAULT_MAX_ADAPTERS, AdapterRegistry
from serve.engine import Engine, EngineConfig
from serve.protocol import APIError, Limits
from serve.server import App, make_server

log = logging.getLogger("serve")
API_KEY_ENV = "FTKIT_API_KEY"
HANDLER_GRACE_S = 5.0  # seconds handlers get, once the engine has stopped, to write what they hold


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
    max_adapters: int = DEFAULT_MAX_ADAPTERS  # adapters held at once, the command line's included
    on_demand: bool = True  # with adapter_root: a request naming an adapter not loaded loads root/<name>
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)


class StartupError(Exception):
    """The command line asks for something that cannot be served (one line, exit status 2)."""


def build_app(opts: ServeOptions):
    """Load the base once, register the adapters and start the engine; returns a serve.server.App.
    StartupError when the options contradict each other or the adapters' records."""
    if opts.max_adapters < max(1, len(opts.adapters)):
        raise StartupError(f"--max-adapters {opts.max_adapters}: need at least 1 and at least the {len(opts.adapters)} "
                           "adapters given with --adapter (they are held for good)")
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(opts.model)
    trained_on = needed_base(opts)
    if trained_on is not None:
        log.info("loading the base as the adapters were trained on it: %s", describe(trained_on))
        base = load_checkpoint(opts.model, device=device, **trained_on.load_kwargs())
    else:
        base = load_checkpoint(opts.model, dtype=opts.dtype, device=device, quantize="nf4" if opts.load_in_4bit else None)
    engine = Engine(base.model, tokenizer, opts.engine)
    registry = AdapterRegistry(base.model, engine.lock, opts.served_model_name or default_name(opts.model),
                               opts.adapter_root, base.format, aliases=(opts.model,), max_adapters=opts.max_adapters,
                               on_demand=opts.on_demand)
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


def needed_base(opts: ServeOptions) -> WeightFormat | None:
    """The 4-bit base the start-up adapters need, from their training records (None: any base serves them).
    Serving a QLoRA adapter on any other base computes something else than was trained (quantizing from
    another dtype gives other 4-bit codes), so adapters that need different bases, or a --dtype other than
    the one the needed base was quantized from, are a StartupError naming the conflict. --load-in-4bit
    agrees with any 4-bit need; the record supplies what the flags leave open."""
    needs = {name: fmt for name, fmt in ((n, trained_base(d)) for n, d in opts.adapters.items()) if fmt is not None}
    if not needs:
        return None
    (first, fmt), *rest = needs.items()
    for name, other in rest:
        if other != fmt:
            raise StartupError(f"adapters {first!r} and {name!r} need different bases ({describe(fmt)} vs "
                               f"{describe(other)}): one server holds one base, serve them from two")
    asked = dtype_from_name(opts.dtype)
    if asked is not None and asked != fmt.dtype:
        raise StartupError(f"--dtype {opts.dtype} contradicts adapter {first!r}, trained on a base held as "
                           f"{describe(fmt)}: leave --dtype out (or give --dtype {describe(WeightFormat(fmt.dtype))})")
    return fmt


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
    p.add_argument("--adapter-root", help="enables POST/DELETE /admin/adapters for directories under this one, and "
                   "loading an adapter named in a request from DIR/<name> on first use")
    p.add_argument("--max-adapters", type=int, default=DEFAULT_MAX_ADAPTERS,
                   help="adapters held in memory at once, --adapter ones included; when one more is needed the least "
                        "recently used adapter loaded on demand with no request in flight is evicted (those from "
                        f"--adapter and the admin endpoint never are) (default {DEFAULT_MAX_ADAPTERS})")
    p.add_argument("--no-on-demand", action="store_true", help="with --adapter-root: load adapters through the admin "
                   "endpoint only, never because a request names one")
    p.add_argument("--served-model-name", help="the base's name in requests and /v1/models (default: the model "
                   "directory's or file's name, or the hub id; --model as given is accepted too)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help="require 'Authorization: Bearer KEY' on "
                   f"every endpoint but /health (default: ${API_KEY_ENV} when set)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--max-batch", type=int, default=16, help="requests per batch at most")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="static batching: wait this long for more requests")
    p.add_argument("--no-cross-adapter-batching", action="store_true", help="batch only requests for the same adapter")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous: waiting requests join the running batch between decode steps; static: a batch "
                        "runs to its end before the next starts (for comparison) (default continuous)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds running requests get to "
                   "finish before they are cut with an error (default 30)")
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
        max_adapters=args.max_adapters, on_demand=not args.no_on_demand,
        engine=EngineConfig(args.max_batch, args.batch_window_ms / 1000, not args.no_cross_adapter_batching,
                            continuous=args.batching == "continuous"),
        limits=Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                      max_tokens=args.max_tokens_limit),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    if args.max_batch < 1 or args.shutdown_timeout < 0:
        print("error: need --max-batch >= 1 and --shutdown-timeout >= 0", file=sys.stderr)
        return 2
    try:
        app = build_app(options_from_args(args))
    except (StartupError, APIError, CheckpointError, OSError) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    server = make_server(app, args.host, args.port)
    host, port = server.server_address[:2]
    log.info("serving %s (+%d adapters) on http://%s:%d%s", app.registry.base_name, len(app.registry.names), host,
             port, "; requests need an API key" if app.api_key else "")
    # SIGTERM (docker stop, systemd): stop accepting, then drain below; shutdown() must come from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()  # no new connections; open ones get 503 for new requests while draining
        drain(app, args.shutdown_timeout)
    return 0


def drain(app, timeout_s: float) -> None:
    """Let running requests finish for up to `timeout_s` (then they end with an error), and give their
    handlers a moment to write the last events: the process exits right after, taking their threads."""
    log.info("shutting down: finishing %d running and %d waiting requests (at most %gs)", app.engine.running_rows,
             app.engine.queue_length, timeout_s)
    app.engine.drain(timeout_s)
    deadline = time.monotonic() + HANDLER_GRACE_S
    while app.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
