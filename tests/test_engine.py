"""serve.engine's continuous batching, driven directly (no HTTP).

Requests join a running batch between decode steps and leave it as they finish, so the cache's rows
and columns move under them (serve.slots.SlotCache). Every answer must still equal the same prompt
run alone through adapters.load_adapted + models.generate (greedy: the same tokens), whatever joined
or left around it: LoRA, DoRA, prompt- and prefix-tuning adapters and the base.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import lora
from lora import LoraConfig
from models.generate import SamplingConfig
from models.tokenizer import load_tokenizer
from serve.__main__ import ServeOptions, build_app
from serve.engine import EngineConfig, Job
from serve.slots import SlotCache
from tests.test_serve import make_virtual_adapter, reference

LONG = 30  # tokens the long request generates (the tiny model's stop token is rare under these adapters)


def make_lora(base: Path, out: Path, seed: int, dora: bool = False) -> Path:
    from lora.adapter_io import save_adapter
    from models.checkpoint import load_pretrained

    model = load_pretrained(base, dtype="float32")
    config = LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=dora)
    lora.inject_lora(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "default").values():
            p.add_(torch.randn_like(p) * 0.3)
    return save_adapter(model, out, config, base)


@pytest.fixture(scope="module")
def adapters(run_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine_adapters")
    return {
        "lora": make_lora(run_model, root / "lora", 1),
        "dora": make_lora(run_model, root / "dora", 2, dora=True),
        "prompt": make_virtual_adapter(run_model, root / "prompt", "prompt", 3),
        "prefix": make_virtual_adapter(run_model, root / "prefix", "prefix", 4),
    }


def engine_app(run_model, adapters, **config):
    opts = ServeOptions(model=str(run_model), adapters={k: str(v) for k, v in adapters.items()}, device="cpu",
                        dtype="float32", engine=EngineConfig(**config))
    return build_app(opts)


def wait_for_text(job: Job, pieces: int) -> list:
    """The first `pieces` events of a running job (so the test knows it is decoding)."""
    return [job.events.get(timeout=60) for _ in range(pieces)]


def test_requests_joining_and_leaving_a_running_batch_equal_each_run_alone(run_model, adapters):
    tok = load_tokenizer(run_model)
    app = engine_app(run_model, adapters, max_batch=8)
    try:
        names = [None, "lora", "dora", "prompt", "prefix"]
        # Short prompts first; later ones are longer than the running batch's context (the window must
        # widen to the left), and many finish at different steps (rows leave, others move into their slots).
        plan = [(names[i % 5], "the tree" + " is the sun" * (i % 4 + (3 if i >= 8 else 0)), 3 + (7 * i) % 11)
                for i in range(14)]
        first = [app.engine.submit(Job(tok.encode(p), a, SamplingConfig(n))) for a, p, n in plan[:4]]
        seen = {job: wait_for_text(job, 1) for job in first}  # they are decoding now
        later = []
        for a, p, n in plan[4:]:
            later.append(app.engine.submit(Job(tok.encode(p), a, SamplingConfig(n))))
            time.sleep(0.01)
        for job, (adapter, prompt, n) in zip(first + later, plan):
            head = seen.get(job, [])
            text, last = job.result(timeout=120)
            assert last.kind == "done", last.error
            text = "".join(e.text for e in head) + text
            directory = adapters[adapter] if adapter else None
            assert text == reference(run_model, directory, prompt, n), (adapter, prompt, n)
        stats = app.engine.stats
        assert stats.max_rows > 1 and stats.batches < len(plan)  # requests shared forwards and prefills
    finally:
        app.engine.stop()


@pytest.mark.parametrize("continuous", [True, False])
def test_a_short_request_finishes_while_a_long_one_decodes_only_with_continuous_batching(run_model, adapters, continuous):
    tok = load_tokenizer(run_model)
    app = engine_app(run_model, {"lora": adapters["lora"]}, max_batch=4, continuous=continuous)
    try:
        long = app.engine.submit(Job(tok.encode("the sun is"), "lora", SamplingConfig(LONG)))
        head = wait_for_text(long, 1)
        short = app.engine.submit(Job(tok.encode("the tree is the"), None, SamplingConfig(2)))
        short_text, short_last = short.result(timeout=120)
        long_events = list(long.stream(timeout=120))
        assert short_last.kind == "done" and long_events[-1].kind == "done"
        assert long_events[-1].completion_tokens == LONG  # the long one ran to its limit
        assert short_text == reference(run_model, None, "the tree is the", 2)
        long_text = "".join(e.text for e in head + long_events)
        assert long_text == reference(run_model, adapters["lora"], "the sun is", LONG)
        # Continuous: the long request was still decoding when the short one was done (most of its text
        # came after); static: the short one waited for the whole long batch to end.
        texts = [e for e in long_events if e.kind == "text"]
        still_running = sum(e.at > short_last.at for e in texts)
        assert (still_running > len(texts) // 2) if continuous else (still_running == 0), (still_running, len(texts))
    finally:
        app.engine.stop()


def test_streamed_logprobs_add_up_to_the_final_list_and_drain_finishes_work(run_model, adapters):
    tok = load_tokenizer(run_model)
    app = engine_app(run_model, {}, max_batch=4)
    job = app.engine.submit(Job(tok.encode("the sun is"), None, SamplingConfig(12), logprobs=2))
    events = list(job.stream(timeout=120))
    streamed = [entry for e in events if e.kind == "text" for entry in e.logprobs]
    assert events[-1].kind == "done" and streamed == events[-1].logprobs and len(streamed) > 0

    # drain: what was submitted finishes; nothing new is admitted.
    jobs = [app.engine.submit(Job(tok.encode("the tree is"), None, SamplingConfig(8))) for _ in range(3)]
    app.engine.drain(timeout_s=60)
    assert all(j.result(timeout=1)[1].kind == "done" for j in jobs)
    assert not app.engine.alive
    with pytest.raises(RuntimeError, match="shutting down"):
        app.engine.submit(Job(tok.encode("x"), None, SamplingConfig(2)))


def test_drain_past_its_bound_ends_the_rest_with_an_error(run_model):
    tok = load_tokenizer(run_model)
    app = engine_app(run_model, {}, max_batch=1)
    running = app.engine.submit(Job(tok.encode("the sun is"), None, SamplingConfig(LONG)))
    waiting = app.engine.submit(Job(tok.encode("the tree is"), None, SamplingConfig(LONG)))
    wait_for_text(running, 1)
    start = time.monotonic()
    app.engine.drain(timeout_s=0.0)
    assert time.monotonic() - start < 30
    assert [e.kind for e in running.stream(timeout=1)][-1] == "error"
    assert [e.kind for e in waiting.stream(timeout=1)][-1] == "error"


def test_slot_cache_keeps_each_rows_keys_right_aligned_through_joins_leaves_and_growth():
    """Each row's keys stay where the mask says, as rows of different lengths join and leave, the window
    widens and trims, and the tensors are reallocated; the virtual columns stay at the window's front."""
    head, layers = 2, 2
    cache = SlotCache(layers, 1, 1, max_rows=4, head=head, dtype=torch.float32, device="cpu")
    virtual = torch.tensor([-1.0, -2.0])
    history: dict[int, list[float]] = {}  # row id -> the key values it has put in, in order
    ids: list[int] = []  # row id per slot
    counter = iter(range(1000))

    def join(lengths: list[int]) -> None:
        w = max(lengths)
        keys = torch.zeros(len(lengths), 1, head + w, 1)
        mask = torch.zeros(len(lengths), w, dtype=torch.long)
        for i, n in enumerate(lengths):
            rid = next(counter)
            values = [float(1000 * rid + j) for j in range(n)]
            keys[i, 0, :head, 0] = virtual
            keys[i, 0, head + w - n:, 0] = torch.tensor(values)
            mask[i, w - n:] = 1
            history[rid], _ = values, ids.append(rid)
        from models.decoder import KVCache
        cache.join(KVCache([keys] * layers, [keys] * layers), mask)

    def step() -> None:
        view = cache.view()
        B = cache.rows
        new = torch.tensor([float(1000 * rid + len(history[rid])) for rid in ids]).view(B, 1, 1, 1)
        for layer in range(layers):
            view.update(layer, new, new)
        view.length += 1
        cache.advance(view, torch.ones(B, dtype=torch.bool))
        for rid in ids:
            history[rid].append(float(1000 * rid + len(history[rid])))

    def check() -> None:
        assert cache.mask.shape == (len(ids), cache.width)
        for slot, rid in enumerate(ids):
            for t in (*cache.keys, *cache.values):
                window = t[slot, 0, cache.lo:cache.hi, 0]
                assert window[:head].tolist() == virtual.tolist()
                real = window[head:][cache.mask[slot].bool()]
                assert real.tolist() == history[rid], (slot, rid)
        if ids:  # the window starts at the first column some row uses
            assert bool(cache.mask[:, 0].any())

    def leave(slots: list[int]) -> None:
        order = cache.leave(slots)
        ids[:] = [ids[i] for i in order]

    join([3])
    check()
    for _ in range(5):
        step()
    join([2, 4])  # shorter than the window: right-aligned
    check()
    step()
    join([20])  # longer than the window: widens to the left, reallocating (no room before it)
    check()
    leave([0])
    check()
    for _ in range(40):  # past the capacity: reallocated, window copied to the front
        step()
    check()
    leave([1, 2])  # the long one stays; the window trims to its context
    check()
    leave([0])
    assert cache.rows == 0 and cache.width == 0
    join([1])
    step()
    check()
