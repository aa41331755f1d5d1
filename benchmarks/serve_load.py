"""Serving under concurrent load on loopback: throughput and p50/p99 latency of `python -m serve`.

    OMP_NUM_THREADS=2 python -m benchmarks.serve_load [--model DIR] [--clients 24] [--requests 4]

Starts the server in-process on 127.0.0.1 (port 0) three times on the same base and adapters:
  sequential      max_batch=1: one request at a time (what a naive server does)
  per-adapter     batching, but a batch only holds requests for one adapter (cross_adapter=False)
  cross-adapter   batching across adapters: every row its own LoRA adapter (the default)
Each of --clients threads sends --requests completions back to back (closed loop), adapters
round-robin over --adapters, greedy, --max-tokens each. Reported: requests/s, generated tokens/s,
p50/p99 latency per request, and the largest batch the engine ran.

Without --model it builds a small random Llama (no download) with the test suite's tokenizer, and
random non-zero LoRA adapters on every linear layer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

import lora
from lora import LoraConfig
from lora.adapter_io import save_adapter
from models import Decoder, ModelConfig, load_pretrained, save_pretrained
from serve.__main__ import ServeOptions, build_app
from serve.engine import EngineConfig
from serve.protocol import Limits
from serve.server import make_server

MODES = {
    "sequential": EngineConfig(max_batch=1, window_s=0.0),
    "per-adapter": EngineConfig(max_batch=32, window_s=0.01, cross_adapter=False),
    "cross-adapter": EngineConfig(max_batch=32, window_s=0.01, cross_adapter=True),
}
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


@dataclass
class Result:
    mode: str
    seconds: float
    latencies: list[float]
    tokens: int
    max_rows: int

    def row(self) -> str:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        return (f"| {self.mode} | {len(lat) / self.seconds:.1f} | {self.tokens / self.seconds:.0f} | "
                f"{1000 * statistics.median(lat):.0f} | {1000 * p99:.0f} | {self.max_rows} |")


def build_model(out: Path, hidden: int, layers: int) -> Path:
    """A random Llama with the test suite's byte-level BPE tokenizer (tests/conftest.py)."""
    from tests.conftest import make_tokenizer_files

    vocab = make_tokenizer_files(out)
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512)
    torch.manual_seed(0)
    model = Decoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
    save_pretrained(model, out, dtype="float32")
    return out


def build_adapters(base: Path, root: Path, n: int) -> dict[str, str]:
    out = {}
    for i in range(n):
        name = f"ad{i}"
        model = load_pretrained(base, dtype="float32")
        config = LoraConfig(r=16, alpha=32, target_modules="all-linear", adapter_name=name)
        lora.inject_lora(model, config)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in lora.adapter_parameters(model, name).values():
                p.normal_(0, 0.05)
        out[name] = str(save_adapter(model, root / name, config, base, adapter_name=name))
    return out


def run_load(url: str, names: list[str], clients: int, requests: int, max_tokens: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            i = c * requests + r
            body = {"model": names[i % len(names)], "prompt": f"the {WORDS[i % 10]} {WORDS[(3 * i) % 10]} is",
                    "max_tokens": max_tokens, "temperature": 0, "stop": ["never-appears"]}
            req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as resp:
                out = json.loads(resp.read())
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += out["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, tokens[0]


def bench_mode(mode: str, model: str, adapters: dict[str, str], args) -> Result:
    opts = ServeOptions(model=model, adapters=adapters, device=args.device, dtype="float32", engine=MODES[mode],
                        limits=Limits(max_tokens=max(args.max_tokens, 16)))
    app = build_app(opts)
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        run_load(url, list(adapters), 2, 1, 4)  # warm-up
        app.engine.stats.max_rows = 0
        seconds, latencies, tokens = run_load(url, list(adapters), args.clients, args.requests, args.max_tokens)
        return Result(mode, seconds, latencies, tokens, app.engine.stats.max_rows)
    finally:
        server.shutdown()
        server.server_close()
        app.engine.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="base checkpoint (default: a random model built here)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="default: random adapters")
    p.add_argument("--adapters", type=int, default=3, help="random adapters to build when none are given")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--requests", type=int, default=4, help="per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_model(Path(tmp) / "base", args.hidden, args.layers))
        adapters = dict(a.split("=", 1) for a in args.adapter) or build_adapters(Path(model), Path(tmp) / "adapters", args.adapters)
        print(f"{args.clients} clients x {args.requests} requests, {len(adapters)} adapters round-robin, "
              f"{args.max_tokens} tokens each, greedy, device {args.device}, torch threads {torch.get_num_threads()}")
        print("| mode | requests/s | tokens/s | p50 ms | p99 ms | max rows/forward |\n|---|---|---|---|---|---|")
        for mode in args.modes.split(","):
            print(bench_mode(mode, model, adapters, args).row(), flush=True)


if __name__ == "__main__":
    main()
