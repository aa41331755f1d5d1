"""How the server is run: the base each adapter needs (from its training record) and the refusals when
it cannot be held; the command line's --batching and --max-adapters; streamed logprobs; and a graceful
shutdown on SIGTERM of a real `python -m serve` process."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from adapters import load_adapted
from models.weight_format import WeightFormat, write_record
from serve.__main__ import ServeOptions, StartupError, main, needed_base, options_from_args, parse_args
from serve.engine import EngineConfig
from serve.protocol import Limits
from tests.test_serve import call, make_adapter, reference, stream
from tests.test_serve_metrics import start

ROOT = Path(__file__).resolve().parents[1]
NF4_BF16 = WeightFormat(torch.bfloat16, "nf4", torch.bfloat16)
NF4_F32 = WeightFormat(torch.float32, "nf4", torch.float32)


@pytest.fixture(scope="module")
def adapters(run_model, tmp_path_factory) -> Path:
    """A root holding a full-precision LoRA adapter and two whose records say they were trained on 4-bit
    bases quantized from bfloat16 and from float32 (the weights are the same: only the record matters to
    the refusals tested here)."""
    root = tmp_path_factory.mktemp("policy")
    plain = make_adapter(run_model, root / "plain", "red", seed=11)
    for name, fmt in (("q_bf16", NF4_BF16), ("q_f32", NF4_F32)):
        shutil.copytree(plain, root / name)
        write_record(root / name, fmt)
    return root


def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# --- the base each adapter needs ------------------------------------------------------------------------
def test_adapters_needing_different_bases_are_refused_at_startup_in_one_line(run_model, adapters, capsys):
    code, err = run_main(capsys, "--model", str(run_model), "--device", "cpu", "--adapter", f"a={adapters / 'q_bf16'}",
                         "--adapter", f"b={adapters / 'q_f32'}")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "'a' and 'b' need different bases" in err and "from bfloat16" in err and "from float32" in err


def test_a_dtype_contradicting_an_adapters_base_is_refused_at_startup(run_model, adapters, capsys):
    code, err = run_main(capsys, "--model", str(run_model), "--device", "cpu", "--dtype", "float32",
                         "--adapter", f"q={adapters / 'q_bf16'}")
    assert code == 2 and err.count("\n") == 1, err
    assert "--dtype float32 contradicts adapter 'q'" in err and "nf4 quantized from bfloat16" in err
    # flags that agree with the record are fine; the record fills in what they leave open
    for flags in ({"dtype": "bfloat16"}, {"load_in_4bit": True}, {}):
        opts = ServeOptions(model=str(run_model), adapters={"q": str(adapters / "q_bf16"), "p": str(adapters / "plain")},
                            **flags)
        assert needed_base(opts) == NF4_BF16
    assert needed_base(ServeOptions(model=str(run_model), adapters={"p": str(adapters / "plain")}, dtype="float16")) is None
    with pytest.raises(StartupError, match="contradicts"):
        needed_base(ServeOptions(model=str(run_model), adapters={"q": str(adapters / "q_f32")}, dtype="bfloat16"))


def test_loading_an_adapter_that_needs_another_base_later_is_a_409_naming_both(run_model, adapters):
    opts = ServeOptions(model=str(run_model), adapters={}, adapter_root=str(adapters), device="cpu", dtype="float32",
                        limits=Limits(max_tokens=8))
    url, app, stop = start(opts)
    try:
        for how in ("admin", "on demand"):
            if how == "admin":
                status, out = call(url + "/admin/adapters", {"name": "q", "path": "q_bf16"})
            else:
                status, out = call(url + "/v1/completions", {"model": "q_bf16", "prompt": "the sun", "max_tokens": 2})
            assert status == 409 and out["error"]["code"] == "base_mismatch", (how, out)
            message = out["error"]["message"]
            assert "nf4 quantized from bfloat16" in message and "holds the base as float32" in message, message
        assert app.registry.names == []
        # the server goes on; an adapter any base serves loads on demand
        status, out = call(url + "/v1/completions", {"model": "plain", "prompt": "the sun", "max_tokens": 2})
        assert status == 200, out
    finally:
        stop()


def test_load_adapted_refuses_a_dtype_that_contradicts_a_qlora_record(run_model, adapters, capsys):
    with pytest.raises(ValueError, match=r"dtype float32 contradicts adapter .*q_bf16.*nf4 quantized from bfloat16"):
        load_adapted(run_model, adapters / "q_bf16", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="contradicts"):
        load_adapted(run_model, adapters / "q_bf16", dtype=torch.float16, device="cpu")
    agreed = load_adapted(run_model, adapters / "q_bf16", dtype="bfloat16", device="cpu")
    assert agreed.format == NF4_BF16
    assert load_adapted(run_model, adapters / "plain", dtype="bfloat16", device="cpu").format == WeightFormat(torch.bfloat16)

    from serve.generate import main as generate_main

    code = generate_main(["--model", str(run_model), "--adapter", str(adapters / "q_bf16"), "--prompt", "the sun",
                          "--dtype", "float32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: dtype float32 contradicts"), err


# --- command-line flags -----------------------------------------------------------------------------------
def test_batching_flag_maps_to_the_engine_config(run_model):
    base = ["--model", str(run_model)]
    assert options_from_args(parse_args(base)).engine.continuous is True
    assert options_from_args(parse_args(base + ["--batching", "static"])).engine.continuous is False
    assert options_from_args(parse_args(base + ["--batching", "continuous"])).engine.continuous is True
    with pytest.raises(SystemExit):
        parse_args(base + ["--batching", "paged"])
    opts = options_from_args(parse_args(base + ["--max-adapters", "3", "--adapter-root", "/tmp"]))
    assert opts.max_adapters == 3 and opts.on_demand
    assert not options_from_args(parse_args(base + ["--no-on-demand"])).on_demand


def test_fewer_adapter_slots_than_command_line_adapters_is_refused(run_model, adapters, capsys):
    code, err = run_main(capsys, "--model", str(run_model), "--device", "cpu", "--max-adapters", "1",
                         "--adapter", f"a={adapters / 'plain'}", "--adapter", f"b={adapters / 'plain'}")
    assert code == 2 and err.count("\n") == 1 and "--max-adapters 1" in err, err


def test_static_batching_serves_the_same_answers(run_model, adapters):
    opts = ServeOptions(model=str(run_model), adapters={"plain": str(adapters / "plain")}, device="cpu", dtype="float32",
                        engine=EngineConfig(continuous=False), limits=Limits(max_tokens=8))
    url, app, stop = start(opts)
    try:
        assert app.engine.config.continuous is False
        jobs = [("plain", "the cat is", 6), (run_model.name, "the red moon is", 8), ("plain", "the dog", 4)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: call(url + "/v1/completions", {"model": j[0], "prompt": j[1],
                                                                            "max_tokens": j[2], "temperature": 0}), jobs))
        for (name, prompt, n), (status, out) in zip(jobs, answers):
            assert status == 200, out
            want = reference(run_model, None if name == run_model.name else adapters / name, prompt, n)
            assert out["choices"][0]["text"] == want, name
    finally:
        stop()


# --- streamed logprobs ------------------------------------------------------------------------------------
def test_streamed_logprobs_concatenate_to_the_non_streamed_ones(run_model, adapters):
    opts = ServeOptions(model=str(run_model), adapters={"plain": str(adapters / "plain")}, device="cpu", dtype="float32",
                        limits=Limits(max_tokens=24))
    url, _, stop = start(opts)
    try:
        comp, chat = url + "/v1/completions", url + "/v1/chat/completions"
        body = {"model": "plain", "prompt": "the red moon is", "max_tokens": 16, "temperature": 0, "logprobs": 3}
        _, plain = call(comp, body)
        text = plain["choices"][0]["text"]
        assert len(text) >= 6, text
        for extra in ({}, {"stop": [text[4:6]]}):  # a stop string holds text back, then cuts it
            _, whole = call(comp, {**body, **extra})
            events = stream(comp, {**body, **extra})
            chunks = [e["choices"][0] for e in events[:-1]]
            got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for c in chunks:
                if c["logprobs"] is not None:
                    for key in got:
                        got[key] += c["logprobs"][key]
            assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
            assert got == whole["choices"][0]["logprobs"] and got["tokens"], extra
            # each chunk's logprobs are its own tokens'
            assert all(c["logprobs"] is None or "".join(c["logprobs"]["tokens"]).startswith(c["text"][:1])
                       for c in chunks if c["text"])

        body = {"model": "plain", "messages": [{"role": "user", "content": "the sun"}], "max_tokens": 8,
                "temperature": 0, "logprobs": True, "top_logprobs": 2}
        _, whole = call(chat, body)
        events = stream(chat, body)
        content = [item for e in events[:-1] if e["choices"] and e["choices"][0].get("logprobs")
                   for item in e["choices"][0]["logprobs"]["content"]]
        assert content and content == whole["choices"][0]["logprobs"]["content"]
    finally:
        stop()


# --- graceful shutdown ------------------------------------------------------------------------------------
def _serve(run_model: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m serve` on a free port; returns the process and its base url once it listens."""
    cmd = [sys.executable, "-m", "serve", "--model", str(run_model), "--port", "0", "--device", "cpu",
           "--dtype", "float32", "--max-tokens-limit", "2000", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"on (http://[\d.]+:\d+)", line)
        if match:
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()}")


@pytest.mark.parametrize("timeout_s,max_tokens", [(60.0, 300), (0.5, 1500)])
def test_sigterm_finishes_or_cuts_running_requests_within_the_bound_and_exits_0(run_model, timeout_s, max_tokens):
    """SIGTERM while a long request streams: with a generous --shutdown-timeout it completes (300 tokens of
    the tiny model take seconds); with a short one it is cut with an error in the stream (1500 tokens take
    far longer than 0.5 s); either way the stream ends properly and the process exits 0 within the bound."""
    proc, url = _serve(run_model, "--shutdown-timeout", str(timeout_s))
    try:
        body = {"model": run_model.name, "prompt": "the cat is", "max_tokens": max_tokens, "temperature": 0,
                "stream": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            first = resp.readline()  # the first event is out: the request is running
            assert first.startswith(b"data: {")
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            rest = resp.read().decode()
        events = [json.loads(b[6:]) for b in (first.decode() + rest).split("\n\n") if b.startswith("data: {")]
        assert rest.rstrip().endswith("data: [DONE]")
        code = proc.wait(timeout=timeout_s + 30)
        elapsed = time.monotonic() - sent
        assert code == 0 and elapsed < timeout_s + 15, (code, elapsed)
        finished = [e for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
        errors = [e for e in events if "error" in e]
        if timeout_s >= 60:
            assert finished and finished[-1]["choices"][0]["finish_reason"] == "length" and not errors, events[-3:]
            assert sum(1 for e in events if e.get("choices") and e["choices"][0]["text"]) > 100
        else:
            assert not finished and [e["error"]["code"] for e in errors] == ["server_shutting_down"], events[-3:]
        # nothing is accepted any more
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
