"""Serving under load on loopback: throughput and latency of `python -m serve`'s engine settings.

    OMP_NUM_THREADS=1 python -m benchmarks.serve_load poisson [--rates 2,4,8,16] [--requests 96]
    OMP_NUM_THREADS=1 python -m benchmarks.serve_load closed [--clients 24] [--requests 4]

Each setting gets its own server process (`python -m benchmarks.serve_load serve ...`, which is
build_app + the HTTP server, on 127.0.0.1, port 0), so the clients never share its interpreter.

poisson (open loop): requests arrive at random (exponential gaps) at each --rates requests/s, with
  mixed prompt lengths (4-48 words) and output lengths (--max-tokens choices), adapters round-robin
  over the --adapters, greedy, streamed. The same requests at the same times for every setting:
    static        a batch runs until its last row is done, finished rows riding along as masked
                  padding; requests arriving meanwhile wait (this server before continuous batching)
    static-leave  the same, but finished rows leave the batch at once (fewer rows per step)
    continuous    requests join the running batch between decode steps (the default)
  Reported per rate and setting: completed requests/s, generated tokens/s, p50/p99 time to first
  token and p50/p99 end-to-end latency.
closed (closed loop): --clients threads each send --requests completions back to back:
    sequential     max_batch=1: one request at a time (what a naive server does)
    per-adapter    batching, but a batch only holds requests for one adapter (cross_adapter=False)
    cross-adapter  batching across adapters: every row its own LoRA adapter (the default)

Without --model it builds a small random Llama (no download) with the test suite's tokenizer, and
random non-zero LoRA adapters on every linear layer.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
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
    "static": EngineConfig(max_batch=16, window_s=0.01, continuous=False),
    "static-leave": EngineConfig(max_batch=16, window_s=0.01, continuous=False, pad_finished=False),
    "continuous": EngineConfig(max_batch=16, continuous=True),
}
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Sample:
    """One request as its client saw it (seconds since the load started)."""

    sent: float
    first: float  # first text arrived
    end: float
    tokens: int


@dataclass
class Result:
    mode: str
    samples: list[Sample] = field(default_factory=list)
    rate: float | None = None  # offered load (poisson), requests/s
    max_rows: int = 0

    @property
    def seconds(self) -> float:
        return max(s.end for s in self.samples) - min(s.sent for s in self.samples)

    def summary(self) -> dict:
        ttft = [s.first - s.sent for s in self.samples]
        e2e = [s.end - s.sent for s in self.samples]
        return {"mode": self.mode, "rate": self.rate, "requests": len(self.samples),
                "requests_per_s": len(self.samples) / self.seconds,
                "tokens_per_s": sum(s.tokens for s in self.samples) / self.seconds,
                "ttft_p50_ms": 1000 * percentile(ttft, 0.5), "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
                "e2e_p50_ms": 1000 * percentile(e2e, 0.5), "e2e_p99_ms": 1000 * percentile(e2e, 0.99),
                "max_rows": self.max_rows}

    def row(self) -> str:
        s = self.summary()
        rate = f"{self.rate:g} | " if self.rate is not None else ""
        return (f"| {rate}{self.mode} | {s['requests_per_s']:.1f} | {s['tokens_per_s']:.0f} | {s['ttft_p50_ms']:.0f} | "
                f"{s['ttft_p99_ms']:.0f} | {s['e2e_p50_ms']:.0f} | {s['e2e_p99_ms']:.0f} |")


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


@dataclass
class Request:
    at: float  # seconds after the load starts
    body: dict


def request_stream(port: int, body: dict, start: float) -> Sample:
    """Send one streamed completion; time its first text and its end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter() - start
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {resp.read()[:200]!r}")
    first, tokens = None, 0
    for line in resp:  # server-sent events, one "data: ..." line each
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter() - start
    conn.close()
    return Sample(sent, first if first is not None else end, end, tokens)


def poisson_requests(names: list[str], rate: float, n: int, lengths: list[int], seed: int = 0) -> list[Request]:
    """n requests with exponential gaps (mean 1/rate s), prompts of 4-48 words, max_tokens drawn from
    `lengths`, adapters round-robin; the same list for the same arguments."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for i in range(n):
        at += rng.expovariate(rate)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 48)))
        out.append(Request(at, {"model": names[i % len(names)], "prompt": words, "max_tokens": rng.choice(lengths),
                                "temperature": 0}))
    return out


def run_open_loop(port: int, requests: list[Request]) -> list[Sample]:
    """Each request sent at its time by its own thread (open loop: arrivals never wait for answers)."""
    samples: list[Sample] = []
    errors: list[BaseException] = []

    def send(req: Request, start: float) -> None:
        try:
            samples.append(request_stream(port, req.body, start))
        except BaseException as err:  # reported after the run
            errors.append(err)

    threads, start = [], time.perf_counter()
    for req in requests:
        time.sleep(max(0.0, req.at - (time.perf_counter() - start)))
        threads.append(threading.Thread(target=send, args=(req, start)))
        threads[-1].start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return samples


def run_closed_loop(port: int, names: list[str], clients: int, requests: int, max_tokens: int) -> list[Sample]:
    """--clients threads, each sending its requests back to back."""
    samples: list[Sample] = []
    start = time.perf_counter()

    def client(c: int) -> None:
        for r in range(requests):
            i = c * requests + r
            body = {"model": names[i % len(names)], "prompt": f"the {WORDS[i % 10]} {WORDS[(3 * i) % 10]} is",
                    "max_tokens": max_tokens, "temperature": 0}
            samples.append(request_stream(port, body, start))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples


class ServerProcess:
    """`python -m benchmarks.serve_load serve` in a child process; `port` once it listens."""

    def __init__(self, mode: str, model: str, adapters: dict[str, str], device: str, max_tokens: int) -> None:
        cmd = [sys.executable, "-m", "benchmarks.serve_load", "serve", "--mode", mode, "--model", model,
               "--device", device, "--max-tokens-limit", str(max_tokens)]
        for name, directory in adapters.items():
            cmd += ["--adapter", f"{name}={directory}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(line.split()[1])

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/bench/stats")
        return json.loads(conn.getresponse().read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def serve_child(args) -> None:
    """The server half: build the app with the mode's engine settings, print its port, serve."""
    from serve.server import Handler

    opts = ServeOptions(model=args.model, adapters=dict(a.split("=", 1) for a in args.adapter), device=args.device,
                        dtype="float32", engine=MODES[args.mode], limits=Limits(max_tokens=args.max_tokens_limit))
    app = build_app(opts)

    class StatsHandler(Handler):  # one extra route for the benchmark: the engine's counters
        app = None

        def do_GET(self) -> None:
            if self.path == "/bench/stats":
                body = json.dumps(vars(self.app.engine.stats)).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

    StatsHandler.app = app
    server = make_server(app, "127.0.0.1", 0)
    server.RequestHandlerClass = StatsHandler
    print(f"port {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        app.engine.stop()


def bench(mode: str, model: str, adapters: dict[str, str], args, load) -> Result:
    server = ServerProcess(mode, model, adapters, args.device, max(args.max_tokens_choices))
    try:
        run_closed_loop(server.port, list(adapters), 2, 1, 4)  # warm-up
        samples = load(server.port)
        return Result(mode, samples, max_rows=server.stats()["max_rows"])
    finally:
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=["poisson", "closed", "serve"])
    p.add_argument("--model", help="base checkpoint (default: a random model built here)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="default: random adapters")
    p.add_argument("--adapters", type=int, default=4, help="random adapters to build when none are given")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", help="engine settings to compare (default: static,static-leave,continuous for poisson, "
                   "sequential,per-adapter,cross-adapter for closed)")
    p.add_argument("--rates", default="2,4,8,16", help="poisson: offered loads, requests/s")
    p.add_argument("--requests", type=int, default=96, help="poisson: requests per rate; closed: per client")
    p.add_argument("--max-tokens", default="8,16,32,64,128,256", help="max_tokens choices, equally likely (closed: the first)")
    p.add_argument("--clients", type=int, default=24, help="closed: client threads")
    p.add_argument("--json", help="write the summaries here")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # serve: the engine setting
    p.add_argument("--max-tokens-limit", type=int, default=256, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.experiment == "serve":
        return serve_child(args)
    args.max_tokens_choices = [int(x) for x in args.max_tokens.split(",")]
    default_modes = "static,static-leave,continuous" if args.experiment == "poisson" else "sequential,per-adapter,cross-adapter"
    modes = (args.modes or default_modes).split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_model(Path(tmp) / "base", args.hidden, args.layers))
        adapters = dict(a.split("=", 1) for a in args.adapter) or build_adapters(Path(model), Path(tmp) / "adapters", args.adapters)
        names = list(adapters)
        if args.experiment == "poisson":
            print(f"poisson arrivals, {args.requests} requests per rate, {len(adapters)} adapters round-robin, "
                  f"max_tokens from {args.max_tokens_choices}, prompts 4-48 words, greedy, streamed, device "
                  f"{args.device}, torch threads {torch.get_num_threads()}")
            print("| offered req/s | batching | done req/s | tokens/s | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms |")
            print("|---|---|---|---|---|---|---|---|")
            for rate in [float(r) for r in args.rates.split(",")]:
                reqs = poisson_requests(names, rate, args.requests, args.max_tokens_choices)
                for mode in modes:
                    result = bench(mode, model, adapters, args, lambda port, r=reqs: run_open_loop(port, r))
                    result.rate = rate
                    results.append(result)
                    print(result.row(), flush=True)
        else:
            n = args.max_tokens_choices[0]
            print(f"{args.clients} clients x {args.requests} requests, {len(adapters)} adapters round-robin, "
                  f"{n} tokens each, greedy, device {args.device}, torch threads {torch.get_num_threads()}")
            print("| mode | requests/s | tokens/s | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms |")
            print("|---|---|---|---|---|---|---|")
            for mode in modes:
                result = bench(mode, model, adapters, args,
                               lambda port: run_closed_loop(port, names, args.clients, args.requests, n))
                results.append(result)
                print(result.row(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([r.summary() for r in results], indent=1) + "\n")


if __name__ == "__main__":
    main()
