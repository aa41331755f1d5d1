"""python -m serve driven by the official `openai` Python client, as users and tools call it.

The server runs in-process on a loopback port, as in tests/test_serve.py (whose fixtures this module
reuses); every answer is checked against the prompt run alone (adapters.load_adapted + models.generate)
or against what the same server returns to a plain request.
"""
from __future__ import annotations

import threading

import pytest
import torch

from adapters import load_adapted
from models.generate import SamplingConfig, generate
from models.tokenizer import load_tokenizer
from serve.__main__ import ServeOptions, build_app
from serve.engine import EngineConfig
from serve.protocol import Limits
from serve.server import make_server
from tests import test_serve
from tests.test_serve import ADAPTERS, reference

openai = pytest.importorskip("openai")
adapter_root = test_serve.adapter_root  # the module-scoped fixture: three LoRA adapters under one root

PROMPT = "the red cat is"
KEY = "test-key"


def _start(opts: ServeOptions):
    app = build_app(opts)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        app.engine.stop()
        thread.join(timeout=10)

    return f"http://{host}:{port}", app, stop


@pytest.fixture(scope="module")
def served(run_model, adapter_root):
    """(url, app, client): the server of tests/test_serve.py's fixture, and an OpenAI client on it."""
    url, app, stop = _start(ServeOptions(
        model=str(run_model), adapters={n: str(adapter_root / n) for n in ADAPTERS}, adapter_root=str(adapter_root),
        device="cpu", dtype="float32",
        engine=EngineConfig(max_batch=32, window_s=0.05),
        limits=Limits(max_body_bytes=16_384, max_prompt_tokens=64, max_tokens=40),
    ))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield url, app, client
    client.close()
    stop()


@pytest.fixture(scope="module")
def base_model(run_model):
    return load_adapted(str(run_model), None, "float32", "cpu").model.eval()


def test_models_list_names_the_base_and_every_adapter(served, run_model):
    _, _, client = served
    models = client.models.list().data
    assert [m.id for m in models] == [run_model.name, *ADAPTERS]
    assert all(m.object == "model" for m in models)


def test_completions_and_chat_equal_generate_run_alone(served, run_model, adapter_root):
    _, _, client = served
    for name in (run_model.name, "red", "blue"):
        directory = None if name == run_model.name else adapter_root / name
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert out.object == "text_completion" and out.model == name
        assert out.choices[0].text == reference(run_model, directory, PROMPT, 8), name
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.prompt_tokens == len(load_tokenizer(run_model).encode(PROMPT))

    tok = load_tokenizer(run_model)
    messages = [{"role": "user", "content": "the sun is"}]
    chat = client.chat.completions.create(model="green", messages=messages, max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    rendered = tok.render_chat(messages, add_generation_prompt=True)
    assert chat.choices[0].message.content == reference(run_model, adapter_root / "green", rendered, 8)
    assert chat.usage.prompt_tokens == len(tok.encode(rendered))
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    # content as a list of text parts, as current SDKs send it: the same prompt, the same answer
    parts = [{"role": "user", "content": [{"type": "text", "text": "the sun "}, {"type": "text", "text": "is"}]}]
    again = client.chat.completions.create(model="green", messages=parts, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content


def test_streams_concatenate_to_the_plain_answer_and_end_with_usage(served, run_model):
    _, _, client = served
    body = dict(model="blue", prompt=PROMPT, max_tokens=12, temperature=0)
    plain = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "the moon is"}]
    plain = client.chat.completions.create(model="red", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="red", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    # without stream_options: no usage chunk
    bare = list(client.chat.completions.create(model="red", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in bare)


def test_stop_strings_cut_the_text_as_openai_does(served, run_model):
    _, _, client = served
    body = dict(model="green", prompt=PROMPT, max_tokens=16, temperature=0)
    text = client.completions.create(**body).choices[0].text
    assert len(text) >= 6, text
    stop = text[3:5]
    cut = client.completions.create(**body, stop=[stop, "never-appears"]).choices[0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(**body, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def _greedy(model, tok, ids: list[int], n: int) -> list[int]:
    return [t for t in generate(model, [ids], SamplingConfig(n, stop_ids=tuple(tok.stop_ids)))[0] if t not in tok.stop_ids]


def test_completion_logprobs_and_echoed_prompt_logprobs_equal_a_forward_pass(served, run_model, base_model):
    _, _, client = served
    tok = load_tokenizer(run_model)
    prompt = "the dog is"
    ids = tok.encode(prompt)

    def log_softmax(seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(base_model(torch.tensor([seq]))[0].float(), -1)

    # as many new tokens as decode to whole characters one by one (the others: a regression test below)
    new = _greedy(base_model, tok, ids, 5)
    new = new[:next((i for i, t in enumerate(new) if "\ufffd" in tok.decode([t])), len(new))]
    assert len(new) >= 2, new
    out = client.completions.create(model=run_model.name, prompt=prompt, max_tokens=len(new), temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in new]
    assert out.choices[0].text == "".join(lp.tokens)
    ref = log_softmax(ids + new)
    want = ref[torch.arange(len(ids) - 1, len(ids) - 1 + len(new)), torch.tensor(new)]
    assert torch.allclose(torch.tensor(lp.token_logprobs), want, atol=1e-4)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert [max(top.values()) for top in lp.top_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)  # greedy
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(new))]

    # scoring, as lm-evaluation-harness asks it: token ids, echo, no new tokens
    scored = client.completions.create(model=run_model.name, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)
    choice = scored.choices[0]
    assert choice.text == tok.decode(ids, skip_special_tokens=False)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    ref = log_softmax(ids)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs[1:]), want, atol=1e-4)
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    # lm-eval 0.4.13's local-completions asks max_tokens=1 and drops the last entry: the prompt's are the same
    one = client.completions.create(model=run_model.name, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                    temperature=0).choices[0]
    assert len(one.logprobs.token_logprobs) == len(ids) + 1 and one.text == choice.text + tok.decode(new[:1])
    assert one.logprobs.token_logprobs[1:-1] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-5)


def test_chat_logprobs_with_top_logprobs(served, run_model):
    _, _, client = served
    out = client.chat.completions.create(model="red", messages=[{"role": "user", "content": "the sun"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6) for c in content)  # greedy: the best
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert "".join(c.token for c in content).startswith(out.choices[0].message.content)
    plain = client.chat.completions.create(model="red", messages=[{"role": "user", "content": "the sun"}], max_tokens=4,
                                           temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content


def test_several_prompts_and_token_id_prompts_in_one_call(served, run_model, adapter_root):
    _, _, client = served
    tok = load_tokenizer(run_model)
    texts = ["the dog is", "the green tree is the", PROMPT]
    out = client.completions.create(model="red", prompt=texts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    want = [reference(run_model, adapter_root / "red", t, 6) for t in texts]
    assert [c.text for c in out.choices] == want
    assert out.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    by_ids = client.completions.create(model="red", prompt=[tok.encode(t) for t in texts], max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == want and [c.index for c in by_ids.choices] == [0, 1, 2]
    one = client.completions.create(model="red", prompt=tok.encode(texts[1]), max_tokens=6, temperature=0)
    assert [c.text for c in one.choices] == want[1:2]


def test_api_key_wrong_key_is_refused_right_key_answers(run_model):
    url, _, stop = _start(ServeOptions(model=str(run_model), adapters={}, device="cpu", dtype="float32", api_key=KEY))
    try:
        body = dict(model=run_model.name, prompt=PROMPT, max_tokens=3, temperature=0)
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60) as bad:
            with pytest.raises(openai.AuthenticationError) as err:
                bad.completions.create(**body)
            assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60) as good:
            assert [m.id for m in good.models.list().data] == [run_model.name]
            assert good.completions.create(**body).choices[0].text == reference(run_model, None, PROMPT, 3)
    finally:
        stop()


def test_errors_raise_the_right_openai_exceptions_and_the_server_keeps_serving(served, run_model, adapter_root):
    _, _, client = served
    ok = dict(model="red", prompt=PROMPT, max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(**{**ok, "model": "purple"})
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="purple", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    bad_fields = [{"max_tokens": 41}, {"temperature": -1}, {"top_p": 0}, {"n": 2}, {"stop": [""]},
                  {"logprobs": 21}, {"prompt": "the moon " * 60}, {"prompt": [10**6]}, {"prompt": []},
                  {"extra_body": {"suffix": "x"}}, {"max_tokens": 0}, {"presence_penalty": 3}]
    for fields in bad_fields:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{**ok, **fields})
        assert err.value.status_code == 400 and err.value.code, fields
    chat_bad = [{"messages": [{"role": "user"}]}, {"top_logprobs": 2},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}]
    for fields in chat_bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{"model": "red", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 2, **fields})
    out = client.completions.create(**ok)
    assert out.choices[0].text == reference(run_model, adapter_root / "red", PROMPT, 3)


# --- regressions: server bugs found while writing these tests (fixed in serve/ since) --------------------------
def test_logprobs_cover_every_generated_token_when_tokens_split_a_character(served, run_model, base_model):
    """Several tokens that each decode to '\\ufffd' (pieces of one UTF-8 character) still get an entry each."""
    _, _, client = served
    tok = load_tokenizer(run_model)
    ids = tok.encode(PROMPT)
    new = _greedy(base_model, tok, ids, 5)
    assert len(new) == 5 and any("\ufffd" in tok.decode([t]) for t in new)  # the case this is about
    out = client.completions.create(model=run_model.name, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1)
    assert out.usage.completion_tokens == 5
    assert len(out.choices[0].logprobs.token_logprobs) == 5


def test_echo_scoring_keeps_an_entry_for_a_generated_stop_token(run_model, tmp_path):
    """lm-eval's local-completions asks echo + max_tokens=1 and sums token_logprobs[ctxlen:-1]: it needs an
    entry for the generated token even when that token is the end-of-sequence one."""
    import shutil

    from safetensors.torch import load_file, save_file

    tok = load_tokenizer(run_model)
    ids = tok.encode(PROMPT)
    # a copy of the tiny model whose greedy next token after PROMPT is the end-of-sequence token
    directory = tmp_path / "eos_model"
    shutil.copytree(run_model, directory)
    model = load_adapted(str(directory), None, "float32", "cpu").model.eval()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0, -1].detach().clone()))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    (eos,) = tok.stop_ids
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"][eos] = seen[0] * (30 / seen[0].dot(seen[0]))  # logit 30 at PROMPT's last position
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    assert _greedy(load_adapted(str(directory), None, "float32", "cpu").model.eval(), tok, ids, 1) == []

    url, _, stop = _start(ServeOptions(model=str(directory), adapters={}, device="cpu", dtype="float32"))
    try:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            out = client.completions.create(model=directory.name, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                            temperature=0)
        lp = out.choices[0].logprobs.token_logprobs
        assert len(lp) == len(ids) + 1  # the prompt's entries, then the generated (stop) token's
        assert lp[-1] > -1e-3
    finally:
        stop()


def test_a_failure_in_the_middle_of_a_stream_ends_it_with_an_error_event(served, monkeypatch):
    """Once the 200 and part of a chunked stream are out, an error goes in the stream as an event (never as a
    second HTTP response inside the body, which the client reads as a broken connection)."""
    import serve.protocol

    _, _, client = served

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(serve.protocol, "usage_chunk", boom)  # fails after the text chunks went out
    with pytest.raises(openai.APIError) as err:
        list(client.completions.create(model="red", prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert not isinstance(err.value, openai.APIConnectionError), err.value  # an error event, not a broken stream
    monkeypatch.undo()
    assert client.completions.create(model="red", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
