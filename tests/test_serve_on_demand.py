"""Adapters on demand: a request naming an adapter under --adapter-root loads it on first use; at most
--max-adapters are held (least recently used evicted, never one with a request in flight); loads happen
while the engine keeps decoding; concurrent first requests load an adapter once."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve.__main__ import ServeOptions
from serve.engine import EngineConfig
from serve.protocol import Limits
from tests.test_serve import ADAPTERS, call, make_adapter, reference
from tests.test_serve_metrics import parse_prometheus, scrape, start, value

N_ADAPTERS = 5
MAX = 2


@pytest.fixture(scope="module")
def root(run_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("on_demand")
    for i in range(N_ADAPTERS):
        make_adapter(run_model, root / f"a{i}", ADAPTERS[i % 3], seed=300 + i)
    return root


@pytest.fixture(scope="module")
def served(run_model, root):
    opts = ServeOptions(model=str(run_model), adapters={}, adapter_root=str(root), device="cpu", dtype="float32",
                        max_adapters=MAX, engine=EngineConfig(max_batch=16), limits=Limits(max_tokens=40))
    url, app, stop = start(opts)
    yield url, app
    stop()


def complete(url: str, body: dict, retry_s: float = 120.0) -> tuple[int, dict]:
    """A completion, retried while the server answers 503 'adapter_slots_full' (as its message asks)."""
    deadline = time.monotonic() + retry_s
    while True:
        status, out = call(url + "/v1/completions", body)
        if status != 503 or out["error"]["code"] != "adapter_slots_full" or time.monotonic() > deadline:
            return status, out
        time.sleep(0.05)


def test_concurrent_requests_over_more_adapters_than_slots_equal_each_run_alone(served, run_model, root):
    url, app = served
    reg = app.registry
    peak = [0]
    install = reg._install

    def counting_install(*args, **kwargs):
        install(*args, **kwargs)
        peak[0] = max(peak[0], len(reg.names))

    reg._install = counting_install
    before = parse_prometheus(scrape(url)[2])
    prompts = ["the cat is", "the red moon is", "the dog is the"]
    jobs = [(f"a{i % N_ADAPTERS}", prompts[i % 3], 5 + i % 4) for i in range(3 * N_ADAPTERS)]
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: complete(url, {"model": j[0], "prompt": j[1], "max_tokens": j[2],
                                                             "temperature": 0}), jobs))
    finally:
        reg._install = install
    for (name, prompt, n), (status, out) in zip(jobs, answers):
        assert status == 200, out
        assert out["choices"][0]["text"] == reference(run_model, root / name, prompt, n), (name, prompt)
    assert 0 < peak[0] <= MAX and len(reg.names) <= MAX
    after = parse_prometheus(scrape(url)[2])
    loads = value(after, "ftkit_adapter_loads_total") - value(before, "ftkit_adapter_loads_total")
    evictions = value(after, "ftkit_adapter_evictions_total") - value(before, "ftkit_adapter_evictions_total")
    assert loads >= N_ADAPTERS and evictions >= N_ADAPTERS - MAX and evictions == reg.evictions
    assert value(after, "ftkit_adapters_loaded") == len(reg.names) <= MAX
    assert not reg._pins  # every request let go of its adapter
    # Different adapters really answer differently (so a wrong adapter could not pass the check above).
    assert len({reference(run_model, root / f"a{i}", prompts[0], 8) for i in range(3)}) > 1


def test_concurrent_first_requests_load_an_adapter_once(served, run_model, root):
    url, app = served
    reg = app.registry
    name = next(f"a{i}" for i in range(N_ADAPTERS) if f"a{i}" not in reg.names)
    loads = reg.loads
    body = {"model": name, "prompt": "the sun is", "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: complete(url, body), range(6)))
    assert all(status == 200 for status, _ in answers), answers
    assert len({out["choices"][0]["text"] for _, out in answers}) == 1
    assert reg.loads == loads + 1


def test_a_pinned_adapter_is_never_evicted_and_full_slots_answer_503(served, run_model, root):
    url, app = served
    reg = app.registry
    held = [reg.acquire(f"a{i}") for i in range(MAX)]  # as two requests in flight would
    try:
        assert sorted(reg.names) == sorted(held)
        other = f"a{MAX}"
        status, out = call(url + "/v1/completions", {"model": other, "prompt": "the sun", "max_tokens": 2})
        assert status == 503 and out["error"]["code"] == "adapter_slots_full", out
        assert "--max-adapters" in out["error"]["message"] and sorted(reg.names) == sorted(held)
    finally:
        for name in held:
            reg.release(name)
    status, out = call(url + "/v1/completions", {"model": other, "prompt": "the sun", "max_tokens": 2})
    assert status == 200, out
    assert other in reg.names and len(reg.names) <= MAX


def test_loading_happens_while_the_engine_keeps_serving(served, run_model, root, monkeypatch):
    """The files are read with no lock held: while one adapter's load is in its prepare step, a request
    for the base is answered. (Were the engine's lock held there, that request would wait for the load.)"""
    import serve.adapters

    url, app = served
    name = next(f"a{i}" for i in range(N_ADAPTERS) if f"a{i}" not in app.registry.names)
    real = serve.adapters.prepare
    during: list = []

    def slow_prepare(model, directory, adapter_name):
        if adapter_name == name:
            done = threading.Event()

            def ask():
                during.append(call(url + "/v1/completions", {"model": run_model.name, "prompt": "the sun is",
                                                             "max_tokens": 3, "temperature": 0}))
                done.set()

            threading.Thread(target=ask, daemon=True).start()
            during.append(done.wait(timeout=60))
        return real(model, directory, adapter_name)

    monkeypatch.setattr(serve.adapters, "prepare", slow_prepare)
    status, out = complete(url, {"model": name, "prompt": "the sun is", "max_tokens": 3, "temperature": 0})
    assert status == 200, out
    assert during and during[-1] is True and during[0][0] == 200, during


def test_on_demand_names_stay_inside_the_root(served, run_model, root, tmp_path):
    url, app = served
    comp = url + "/v1/completions"
    body = {"prompt": "the sun", "max_tokens": 2}
    for name in ("nothing-here", "../" + root.name + "/a0", "a0/../a1", ".hidden"):
        status, out = call(comp, {**body, "model": name})
        assert status == 404 and out["error"]["code"] == "model_not_found", (name, out)
    outside = make_adapter(run_model, tmp_path / "outside", "red", seed=1)
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    try:
        status, out = call(comp, {**body, "model": "sneaky"})
        assert status == 403 and out["error"]["code"] == "path_not_allowed", out
        assert "sneaky" not in app.registry.names
    finally:
        (root / "sneaky").unlink()


def test_the_least_recently_used_adapter_is_the_one_evicted(served):
    url, app = served
    reg = app.registry
    body = {"prompt": "the sun", "max_tokens": 2, "temperature": 0}
    for name in ("a0", "a1", "a0", "a2"):  # a0 used after a1: a1 is the least recently used when a2 comes
        status, out = complete(url, {**body, "model": name})
        assert status == 200, out
    assert sorted(reg.names) == ["a0", "a2"]
    for name in ("a3", "a4"):  # a0 now the oldest, then a2
        assert complete(url, {**body, "model": name})[0] == 200
    assert sorted(reg.names) == ["a3", "a4"]
