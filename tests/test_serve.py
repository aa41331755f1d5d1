"""python -m serve: an in-process server on a loopback port, driven by a real HTTP client (urllib).

Checks that concurrent requests over several adapters are batched and each answer equals the same
prompt run alone (adapters.load_adapted + models.generate), that streaming concatenates to the plain answer, stop strings,
adapter admin under a root, and that bad requests get 4xx while the server keeps answering.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import lora
from adapters import load_adapted
from lora import LoraConfig
from models.generate import SamplingConfig, generate
from models.tokenizer import load_tokenizer
from models.weight_format import WeightFormat
from serve.__main__ import ServeOptions, build_app
from serve.adapters import AdapterRegistry
from serve.engine import EngineConfig, Job
from serve.protocol import APIError, Limits
from serve.server import make_server
from tests.conftest import TASK_WORDS

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ["red", "green", "blue"]
TARGETS = {"red": ["q_proj", "v_proj"], "green": ["q_proj", "k_proj", "v_proj", "o_proj"], "blue": "all-linear"}


def make_adapter(base: Path, out: Path, name: str, seed: int) -> Path:
    """A LoRA adapter with random non-zero weights (training would only be slower), saved as train.run does."""
    from lora.adapter_io import save_adapter
    from models.checkpoint import load_pretrained

    model = load_pretrained(base, dtype="float32")
    config = LoraConfig(r=4, alpha=8, target_modules=TARGETS[name], adapter_name=name)
    lora.inject_lora(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, name).values():
            p.copy_(torch.randn_like(p) * 0.4)
    return save_adapter(model, out, config, base, adapter_name=name)


@pytest.fixture(scope="module")
def adapter_root(run_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(ADAPTERS):
        make_adapter(run_model, root / name, name, seed=100 + i)
    return root


@pytest.fixture(scope="module")
def server(run_model, adapter_root):
    """(base url, app): the server on 127.0.0.1, port 0, in a thread; shut down after the module."""
    opts = ServeOptions(
        model=str(run_model), adapters={n: str(adapter_root / n) for n in ADAPTERS}, adapter_root=str(adapter_root),
        device="cpu", dtype="float32",
        engine=EngineConfig(max_batch=32, window_s=0.05),
        limits=Limits(max_body_bytes=16_384, max_prompt_tokens=64, max_tokens=40),
    )
    app = build_app(opts)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield f"http://{host}:{port}", app
    httpd.shutdown()
    httpd.server_close()
    app.engine.stop()
    thread.join(timeout=10)


def call(url: str, body=None, method: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def stream(url: str, body: dict) -> list[dict | str]:
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for block in resp.read().decode().split("\n\n"):
            if block.strip():
                assert block.startswith("data: ")
                payload = block[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def prompts(n: int) -> list[str]:
    return [f"the {TASK_WORDS[i % 10]} {TASK_WORDS[(3 * i + 1) % 10]} is" + " the" * (i % 4) for i in range(n)]


def reference(run_model: Path, adapter_dir: Path | None, prompt: str, max_tokens: int, **sampling) -> str:
    """The prompt run alone through models.generate's generate()."""
    tok = load_tokenizer(run_model)
    model = reference.models.get(adapter_dir)
    if model is None:
        model = reference.models[adapter_dir] = load_adapted(str(run_model), adapter_dir and str(adapter_dir), "float32", "cpu").model
    cfg = SamplingConfig(max_tokens, stop_ids=tuple(sorted(tok.stop_ids)), **sampling)
    return tok.decode(generate(model, [tok.encode(prompt)], cfg, pad_id=tok.pad_id)[0], skip_special_tokens=True)


reference.models = {}


def test_concurrent_requests_over_three_adapters_are_batched_and_equal_each_run_alone(server, run_model, adapter_root):
    url, app = server
    texts = prompts(24)
    jobs = [(ADAPTERS[i % 3], texts[i], 6 + i % 7) for i in range(24)]
    body = lambda a, p, n: {"model": a, "prompt": p, "max_tokens": n, "temperature": 0}
    before = app.engine.stats.max_rows
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: call(url + "/v1/completions", body(*j)), jobs))
    assert all(status == 200 for status, _ in answers), answers
    for (adapter, prompt, n), (_, out) in zip(jobs, answers):
        choice = out["choices"][0]
        assert out["model"] == adapter and out["object"] == "text_completion"
        assert choice["text"] == reference(run_model, adapter_root / adapter, prompt, n), (adapter, prompt)
        assert out["usage"]["completion_tokens"] <= n
        assert choice["finish_reason"] == ("length" if out["usage"]["completion_tokens"] == n else "stop")
    assert sum(bool(out["choices"][0]["text"]) for _, out in answers) >= 20  # real text, not just an EOS
    stats = app.engine.stats
    assert stats.max_rows > 1 and stats.max_adapters > 1, stats  # rows of several adapters shared a forward
    assert stats.max_rows >= max(before, 8)
    # The adapters really differ: one prompt, three answers.
    assert len({reference(run_model, adapter_root / a, texts[0], 12) for a in ADAPTERS}) > 1

    # A few against the CLI itself, as a user would run it.
    for adapter, prompt, n in jobs[:2]:
        cmd = [sys.executable, "-m", "serve.generate", "--model", str(run_model), "--adapter", str(adapter_root / adapter),
               "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0", "--dtype", "float32", "--device", "cpu"]
        cli = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert cli.returncode == 0, cli.stderr
        expected = next(o for j, (_, o) in zip(jobs, answers) if j == (adapter, prompt, n))
        assert cli.stdout[:-1] == expected["choices"][0]["text"]


def test_base_model_name_picks_no_adapter_and_seeded_sampling_repeats_generate(server, run_model):
    url, _ = server
    prompt = prompts(3)[2]
    status, out = call(url + "/v1/completions", {"model": str(run_model), "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert status == 200 and out["choices"][0]["text"] == reference(run_model, None, prompt, 8)
    sampled = {"model": "green", "prompt": prompt, "max_tokens": 8, "temperature": 0.9, "top_p": 0.8, "seed": 7}
    status, out = call(url + "/v1/completions", sampled)
    assert status == 200
    # generate() alone with the same seed draws the same samples: the row has its own generator
    want = reference(run_model, Path(server[1].registry.directory("green")), prompt, 8, temperature=0.9, top_p=0.8, seed=7)
    assert out["choices"][0]["text"] == want


def test_stream_concatenates_to_the_plain_answer_with_and_without_stop_strings(server):
    url, _ = server
    body = {"model": "blue", "prompt": prompts(5)[4], "max_tokens": 16, "temperature": 0}
    _, plain = call(url + "/v1/completions", body)
    text = plain["choices"][0]["text"]
    events = stream(url + "/v1/completions", body)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
    assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(e["id"] == events[0]["id"] for e in events[:-1])

    assert len(text) >= 6, text
    stop = text[3:5]
    with_stop = {**body, "stop": [stop, "never-appears"]}
    _, cut = call(url + "/v1/completions", with_stop)
    assert cut["choices"][0]["text"] == text[: text.find(stop)]  # cut before the stop string, as OpenAI
    assert cut["choices"][0]["finish_reason"] == "stop"
    events = stream(url + "/v1/completions", with_stop)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut["choices"][0]["text"]


def test_chat_completions_apply_the_template_and_stream_deltas(server, run_model):
    url, _ = server
    tok = load_tokenizer(run_model)
    messages = [{"role": "user", "content": "the cat is"}]
    body = {"model": "red", "messages": messages, "max_tokens": 10, "temperature": 0,
            "stream_options": {"include_usage": True}}
    status, out = call(url + "/v1/chat/completions", body)
    assert status == 200 and out["object"] == "chat.completion", out
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant"
    prompt = tok.render_chat(messages, add_generation_prompt=True)
    assert out["usage"]["prompt_tokens"] == len(tok.encode(prompt))
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    events = stream(url + "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[0]["object"] == "chat.completion.chunk"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert content == message["content"]
    assert events[-2]["usage"] == out["usage"] and events[-2]["choices"] == []


def test_models_and_health(server, run_model):
    url, _ = server
    assert call(url + "/health") == (200, {"status": "ok"})
    status, out = call(url + "/v1/models")
    # the base is named by its directory's name, not the server's filesystem path (which is still accepted)
    assert status == 200 and [m["id"] for m in out["data"]] == [run_model.name, *ADAPTERS]


def _assert_error(status_body, status: int, code: str) -> None:
    got, body = status_body
    assert got == status, body
    assert body["error"]["code"] == code and body["error"]["message"] and body["error"]["type"]


def test_bad_requests_get_4xx_json_and_the_server_keeps_answering(server):
    url, app = server
    ok = {"model": "red", "prompt": "the sun is", "max_tokens": 3, "temperature": 0}
    comp = url + "/v1/completions"
    _assert_error(call(comp, raw=b"{not json"), 400, "invalid_json")
    _assert_error(call(comp, raw=b"[1, 2]"), 400, "invalid_json")
    _assert_error(call(comp, raw=b"x" * 20_000), 413, "body_too_large")
    _assert_error(call(comp, {**ok, "model": "purple"}), 404, "model_not_found")
    _assert_error(call(comp, {**ok, "max_tokens": 41}), 400, "max_tokens_too_large")
    _assert_error(call(comp, {**ok, "prompt": "the moon " * 60}), 400, "context_length_exceeded")
    _assert_error(call(comp, {**ok, "temperature": "hot"}), 400, "invalid_value")
    _assert_error(call(comp, {**ok, "top_p": 0}), 400, "invalid_value")
    _assert_error(call(comp, {**ok, "stop": [""]}), 400, "invalid_value")
    _assert_error(call(comp, {**ok, "n": 2}), 400, "invalid_value")
    _assert_error(call(url + "/v1/chat/completions", {**ok, "messages": [{"role": "user"}]}), 400, "invalid_value")
    _assert_error(call(url + "/v1/nope"), 404, "not_found")
    _assert_error(call(comp, method="GET"), 405, "method_not_allowed")

    # An exception inside the engine fails that request only (500), and the engine goes on.
    real = app.engine._prefill

    def broken(key, jobs):
        raise RuntimeError("boom")

    app.engine._prefill = broken
    try:
        _assert_error(call(comp, ok), 500, "internal_error")
    finally:
        app.engine._prefill = real
    assert call(url + "/health")[0] == 200
    status, out = call(comp, ok)
    assert status == 200 and out["choices"][0]["text"] is not None


def test_admin_loads_and_unloads_adapters_only_from_under_the_root(server, run_model, adapter_root, tmp_path):
    url, _ = server
    admin = url + "/admin/adapters"
    body = {"prompt": "the dog is", "max_tokens": 6, "temperature": 0}
    status, out = call(admin, {"name": "red2", "path": "red"})  # relative to the root
    assert status == 200, out
    _, red = call(url + "/v1/completions", {**body, "model": "red"})
    _, red2 = call(url + "/v1/completions", {**body, "model": "red2"})
    assert red2["choices"][0]["text"] == red["choices"][0]["text"]  # same files, same answers
    _assert_error(call(admin, {"name": "red2", "path": "red"}), 409, "adapter_exists")
    assert call(admin + "/red2", method="DELETE")[0] == 200
    _assert_error(call(url + "/v1/completions", {**body, "model": "red2"}), 404, "model_not_found")
    _assert_error(call(admin + "/red2", method="DELETE"), 404, "adapter_not_found")

    outside = make_adapter(run_model, tmp_path / "outside", "red", seed=1)
    (adapter_root / "sneaky").symlink_to(outside, target_is_directory=True)
    _assert_error(call(admin, {"name": "x", "path": str(outside)}), 403, "path_not_allowed")
    _assert_error(call(admin, {"name": "x", "path": "../" + outside.parent.name + "/outside"}), 403, "path_not_allowed")
    _assert_error(call(admin, {"name": "x", "path": "sneaky"}), 403, "path_not_allowed")  # symlink out of the root
    _assert_error(call(admin, {"name": "x", "path": "nothing-here"}), 400, "adapter_not_found")
    _assert_error(call(admin, {"name": "bad name!", "path": "red"}), 400, "invalid_name")
    _assert_error(call(admin, {"name": str(run_model), "path": "red"}), 400, "invalid_name")
    assert [m["id"] for m in call(url + "/v1/models")[1]["data"]][1:] == ADAPTERS
    assert call(url + "/v1/completions", {**body, "model": "red"})[0] == 200


def test_admin_is_disabled_without_a_root():
    registry = AdapterRegistry(model=None, lock=threading.Lock(), base_name="base", root=None,
                               base_format=WeightFormat(torch.float32))
    with pytest.raises(APIError) as err:
        registry.path_under_root("anything")
    assert err.value.status == 403 and err.value.code == "admin_disabled"


def test_4bit_base_serves_adapters_as_generate_does_on_the_same_4bit_base(run_model, adapter_root):
    from lora.adapter_io import load_adapter
    from models.checkpoint import load_pretrained

    opts = ServeOptions(model=str(run_model), adapters={"red": str(adapter_root / "red")}, load_in_4bit=True,
                        device="cpu", dtype="float32", served_model_name="tiny")
    app = build_app(opts)
    httpd = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions"
        tok = load_tokenizer(run_model)
        model = load_pretrained(run_model, dtype="float32", quantize="nf4")
        load_adapter(model, adapter_root / "red")
        for name in ("tiny", "red"):
            status, out = call(url, {"model": name, "prompt": "the tree is", "max_tokens": 6, "temperature": 0})
            assert status == 200, out
            with (lora.disable_adapters(model) if name == "tiny" else torch.no_grad()):
                ids = generate(model.eval(), [tok.encode("the tree is")], SamplingConfig(6, stop_ids=tuple(tok.stop_ids)),
                               pad_id=tok.pad_id)[0]
            assert out["choices"][0]["text"] == tok.decode(ids)
    finally:
        httpd.shutdown()
        httpd.server_close()
        app.engine.stop()


def make_virtual_adapter(base: Path, out: Path, kind: str, seed: int) -> Path:
    """A prompt- or prefix-tuning adapter with random virtual tokens, in PEFT's format."""
    from models.checkpoint import load_pretrained
    from prompt import PrefixEncoder, PromptEmbedding, attach, save_virtual_tokens

    model = load_pretrained(base, dtype="float32")
    torch.manual_seed(seed)
    module = PromptEmbedding(4, model.config.hidden_size) if kind == "prompt" else PrefixEncoder(3, model.config)
    with torch.no_grad():
        module.embedding.normal_(0, 1.0)
    attach(model, module)
    return save_virtual_tokens(model, out, base)


def test_prompt_and_prefix_adapters_are_served_beside_lora_ones(server, run_model, adapter_root):
    url, app = server
    for kind in ("prompt", "prefix"):
        make_virtual_adapter(run_model, adapter_root / kind, kind, seed=5)
        assert call(url + "/admin/adapters", {"name": kind, "path": kind})[0] == 200
    try:
        texts = prompts(8)
        jobs = [(["prompt", "prefix", "red", str(run_model)][i % 4], texts[i], 5 + i % 3) for i in range(8)]
        body = lambda a, p, n: {"model": a, "prompt": p, "max_tokens": n, "temperature": 0}
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: call(url + "/v1/completions", body(*j)), jobs))
        for (adapter, prompt, n), (status, out) in zip(jobs, answers):
            assert status == 200, out
            directory = None if adapter == str(run_model) else adapter_root / adapter
            assert out["choices"][0]["text"] == reference(run_model, directory, prompt, n), adapter
        # The virtual tokens change the answer, and are gone from the model between batches.
        assert reference(run_model, adapter_root / "prompt", texts[0], 6) != reference(run_model, None, texts[0], 6)
        assert app.engine.model.virtual_tokens is None
    finally:
        for kind in ("prompt", "prefix"):
            call(url + "/admin/adapters/" + kind, method="DELETE")
    assert [m["id"] for m in call(url + "/v1/models")[1]["data"]][1:] == ADAPTERS


def test_a_qlora_adapter_alone_is_served_on_the_4bit_base_it_was_trained_on(run_model, tmp_path):
    """No --dtype, no --load-in-4bit: the base is loaded as the adapter's record says (NF4 quantized from
    bfloat16, as train.run's QLoRA does), so the server's greedy text equals serve.generate's."""
    from adapters import load_adapted
    from models.checkpoint import load_pretrained

    model = load_pretrained(run_model, dtype=torch.bfloat16, quantize="nf4", compute_dtype=torch.bfloat16)
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    lora.inject_lora(model, config)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "default").values():
            p.copy_(torch.randn_like(p) * 0.4)
    adapter = lora.save_adapter(model, tmp_path / "qlora", config, run_model)
    app = build_app(ServeOptions(model=str(run_model), adapters={"q": str(adapter)}, device="cpu"))
    try:
        assert app.registry.base_format == WeightFormat(torch.bfloat16, "nf4", torch.bfloat16)
        tok = load_tokenizer(run_model)
        served = load_adapted(run_model, adapter, device="cpu").model
        ids = generate(served, [tok.encode("the tree is")], SamplingConfig(6, stop_ids=tuple(tok.stop_ids)), pad_id=tok.pad_id)[0]
        job = app.engine.submit(Job(tok.encode("the tree is"), "q", SamplingConfig(6)))
        text, last = job.result(timeout=120)
        assert last.kind == "done" and text == tok.decode(ids)
    finally:
        app.engine.stop()


def test_content_parts_are_read_as_text_and_unsupported_fields_are_refused_by_name():
    from serve.protocol import parse_completion

    limits = Limits()
    parts = [{"type": "text", "text": "the sun "}, {"type": "text", "text": "is"}]
    req = parse_completion({"model": "m", "messages": [{"role": "user", "content": parts}]}, True, limits)
    assert req.messages == [{"role": "user", "content": "the sun is"}]
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(APIError, match="text only, got type 'image_url'") as err:
        parse_completion({"model": "m", "messages": [{"role": "user", "content": image}]}, True, limits)
    assert err.value.status == 400
    off = {"logprobs": False, "top_logprobs": 0, "echo": False}
    assert parse_completion({"model": "m", "prompt": "x", **off}, False, limits).prompts == ("x",)  # "off" is fine
    for key, value in [("logit_bias", {"5": 1.0}), ("suffix", "end")]:
        with pytest.raises(APIError, match=f"{key}={value!r} is not supported") as err:
            parse_completion({"model": "m", "prompt": "x", key: value}, False, limits)
        assert err.value.status == 400 and err.value.code == "unsupported_parameter"


def test_prompt_forms_and_logprob_fields_parse_as_the_openai_api_has_them():
    from serve.protocol import parse_completion

    limits = Limits()

    def parse(chat=False, **body):
        return parse_completion({"model": "m", **({} if chat else {"prompt": "x"}), **body}, chat, limits)

    assert parse(prompt="ab").prompts == ("ab",)
    assert parse(prompt=["ab", "cd"]).prompts == ("ab", "cd")
    assert parse(prompt=[5, 6, 7]).prompts == ((5, 6, 7),)
    assert parse(prompt=[[5, 6], [7]]).prompts == ((5, 6), (7,))
    for bad in ([], [""], [[]], [1.5], [-1], [True], "", [["a"]]):
        with pytest.raises(APIError, match="prompt must be"):
            parse(prompt=bad)
    assert parse(logprobs=3).logprobs == 3 and parse(logprobs=0).logprobs == 0 and parse(logprobs=False).logprobs is None
    chat = {"chat": True, "messages": [{"role": "user", "content": "hi"}]}
    assert parse(**chat, logprobs=True, top_logprobs=4).logprobs == 4 and parse(**chat, logprobs=True).logprobs == 0
    assert parse(echo=True, max_tokens=0, logprobs=1).max_tokens == 0
    for body, message in [({"logprobs": 21}, "at most 20"), ({"logprobs": True}, "must be an integer"),
                          ({"top_logprobs": 2}, "chat parameter"), ({"max_tokens": 0}, "0 only with echo"),
                          ({"echo": True, "stream": True}, "streamed request"), ({"prompt": ["a", "b"], "stream": True},
                                                                                   "streamed request"),
                          ({**chat, "top_logprobs": 2}, "needs logprobs: true"), ({**chat, "echo": True}, "echo must be")]:
        with pytest.raises(APIError, match=message):
            parse(**body)


# --- HTTP/1.1, API keys, penalties ----------------------------------------------------------------------
def test_one_connection_carries_many_requests_streams_included(server):
    """Keep-alive: plain answers, a chunked stream and an error all on one socket, in turn; an error
    answered before the body was read closes the connection (its bytes must not become a request)."""
    import http.client

    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"model": "red", "prompt": "the sun is", "max_tokens": 4, "temperature": 0}
    sockets, answers = set(), []
    for kind in ("plain", "stream", "plain", "error", "plain"):
        payload = {**body, "stream": kind == "stream"} if kind != "error" else {**body, "model": "purple"}
        conn.request("POST", "/v1/completions", json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        sockets.add(id(conn.sock))
        data = resp.read()
        assert resp.status == (404 if kind == "error" else 200) and resp.version == 11
        if kind == "stream":
            assert resp.headers["Transfer-Encoding"] == "chunked"
            texts = [json.loads(b[6:])["choices"][0]["text"] for b in data.decode().split("\n\n")
                     if b.startswith("data: {")]
            answers.append("".join(texts))
        elif kind == "plain":
            answers.append(json.loads(data)["choices"][0]["text"])
    assert len(sockets) == 1 and len(set(answers)) == 1  # one connection; streamed == plain
    conn.request("GET", "/v1/nope", body=b"x" * 10)  # a body nobody reads
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 404 and resp.headers["Connection"] == "close"
    conn.close()


def test_api_key_is_required_on_every_endpoint_but_health(run_model):
    app = build_app(ServeOptions(model=str(run_model), adapters={}, device="cpu", api_key="sekret"))
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = "http://%s:%d" % httpd.server_address[:2]

    def get(path: str, key: str | None = None, body: dict | None = None):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body else None, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        assert get("/health")[0] == 200
        done = {"model": run_model.name, "prompt": "the sun", "max_tokens": 2, "temperature": 0}
        for path, body in [("/v1/models", None), ("/v1/completions", done), ("/admin/adapters", {"name": "x", "path": "y"})]:
            for key in (None, "wrong", "sekret "):
                _assert_error(get(path, key, body), 401, "invalid_api_key")
        assert get("/v1/models", "sekret")[0] == 200
        assert get("/v1/completions", "sekret", done)[0] == 200
        assert get("/admin/adapters", "sekret", {"name": "x", "path": "y"})[0] == 403  # past the key: admin is off
    finally:
        httpd.shutdown()
        httpd.server_close()
        app.engine.stop()
        thread.join(timeout=10)


def _penalized_reference(run_model: Path, prompt: str, steps: int, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy decoding written out: a full forward per step, the penalties' formulas applied by hand."""
    tok = load_tokenizer(run_model)
    model = load_adapted(str(run_model), None, "float32", "cpu").model.eval()
    ids = tok.encode(prompt)
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out]))[0, -1].float()
        for t in set(ids + out):
            if repetition != 1:
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        nxt = int(logits.argmax())
        if nxt in tok.stop_ids:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_penalties_change_greedy_output_as_their_formulas_say_and_zero_changes_nothing(server, run_model):
    url, _ = server
    prompt = "the sun the sun the"
    base = {"model": run_model.name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    plain = call(url + "/v1/completions", base)[1]["choices"][0]["text"]
    zero = {"presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
    assert call(url + "/v1/completions", {**base, **zero})[1]["choices"][0]["text"] == plain
    assert plain == _penalized_reference(run_model, prompt, 12)
    outputs = {plain}
    for name, value in [("presence", 1.5), ("frequency", 0.8), ("repetition", 1.8)]:
        status, out = call(url + "/v1/completions", {**base, f"{name}_penalty": value})
        assert status == 200
        text = out["choices"][0]["text"]
        assert text == _penalized_reference(run_model, prompt, 12, **{name: value}), name
        outputs.add(text)
    assert len(outputs) > 1  # the penalties did change something on this repetitive prompt
    _assert_error(call(url + "/v1/completions", {**base, "presence_penalty": 3}), 400, "invalid_value")
    _assert_error(call(url + "/v1/completions", {**base, "repetition_penalty": 0}), 400, "invalid_value")


def test_logprobs_and_echo_equal_a_forward_pass_and_every_prompt_form_answers(server, run_model, adapter_root):
    """What lm-evaluation-harness's local-completions backend asks: token-id prompts, echo, max_tokens 0 and
    logprobs, for the base and an adapter; every logprob equals a plain forward's log-softmax (float32)."""
    url, _ = server
    tok = load_tokenizer(run_model)
    comp = url + "/v1/completions"
    texts = ["the sun is", "the red moon is the"]
    ids = [tok.encode(t) for t in texts]
    for model_name, adapter in [(run_model.name, None), ("green", adapter_root / "green")]:
        model = load_adapted(str(run_model), adapter and str(adapter), "float32", "cpu").model.eval()

        def logprobs_of(seq: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return torch.log_softmax(model(torch.tensor([seq]))[0].float(), -1)

        # scoring: echo the prompt, generate nothing
        status, out = call(comp, {"model": model_name, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1,
                                  "temperature": 0})
        assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1]
        for choice, seq in zip(out["choices"], ids):
            lp = choice["logprobs"]
            ref = logprobs_of(seq)
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            got = torch.tensor(lp["token_logprobs"][1:])
            want = ref[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
            assert torch.allclose(got, want, atol=1e-4), (got, want)
            assert [len(t) for t in lp["top_logprobs"][1:]] == [1] * (len(seq) - 1)
            best = [max(t.values()) for t in lp["top_logprobs"][1:]]
            assert torch.allclose(torch.tensor(best), ref[:-1].max(-1).values, atol=1e-4)
            assert choice["text"] == tok.decode(seq, skip_special_tokens=False) and choice["finish_reason"] == "length"
            assert lp["text_offset"][0] == 0 and lp["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in seq]
        assert out["usage"]["prompt_tokens"] == sum(map(len, ids)) and out["usage"]["completion_tokens"] == 0

        # generation: the generated tokens' logprobs, text prompts and id prompts alike
        body = {"model": model_name, "max_tokens": 5, "temperature": 0, "logprobs": 3}
        by_text = call(comp, {**body, "prompt": texts})[1]["choices"]
        by_ids = call(comp, {**body, "prompt": ids})[1]["choices"]
        assert [c["text"] for c in by_text] == [c["text"] for c in by_ids]
        for choice, seq in zip(by_ids, ids):
            lp = choice["logprobs"]
            new = [t for t in generate(model, [seq], SamplingConfig(5, stop_ids=tuple(tok.stop_ids)))[0]
                   if t not in tok.stop_ids]  # the tokens served, as generate() picks them
            assert lp["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in new]
            ref = logprobs_of(seq + new)
            want = ref[torch.arange(len(seq) - 1, len(seq) - 1 + len(new)), torch.tensor(new)]
            assert torch.allclose(torch.tensor(lp["token_logprobs"]), want, atol=1e-4)
            # (alternatives are keyed by text, as OpenAI's are: two tokens that decode alike share a key)
            assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"])
            assert [max(t.values()) for t in lp["top_logprobs"]] == pytest.approx(lp["token_logprobs"])  # greedy

    # chat: logprobs true with top_logprobs, in the chat shape
    status, out = call(url + "/v1/chat/completions", {"model": "red", "messages": [{"role": "user", "content": "the sun"}],
                                                      "max_tokens": 4, "temperature": 0, "logprobs": True,
                                                      "top_logprobs": 2})
    content = out["choices"][0]["logprobs"]["content"]
    assert status == 200 and content and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    assert "".join(c["token"] for c in content).startswith(out["choices"][0]["message"]["content"][:1])
    assert all(bytes(c["bytes"]).decode(errors="replace") == c["token"] for c in content)
