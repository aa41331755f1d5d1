"""GET /metrics: the page parses as Prometheus text (checked by a strict little parser written here), its
counters move by what requests did, and it wants the API key like every other endpoint."""
from __future__ import annotations

import math
import re
import threading
import urllib.error
import urllib.request

import pytest

from serve.__main__ import ServeOptions, build_app
from serve.engine import EngineConfig
from serve.metrics import Histogram, Metrics, TimedEvents
from serve.protocol import Limits
from serve.server import make_server
from tests.test_serve import call, stream

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"'
SAMPLE = re.compile(rf"({NAME})(\{{(?:{LABEL}(?:,{LABEL})*)?\}})? (\S+)")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_prometheus(text: str) -> dict[str, dict]:
    """Families by name: {"type", "help", "samples": {(sample name, ((label, value), ...)): float}}; any
    departure from the text format (0.0.4) fails an assertion."""
    assert text.endswith("\n"), "the last line must end with a newline"
    families: dict[str, dict] = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_ = line[len("# HELP "):].partition(" ")
            assert re.fullmatch(NAME, name) and name not in families, line
            current = families[name] = {"help": help_, "type": None, "samples": {}}
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            assert current is families.get(name) and current["type"] is None and not current["samples"], line
            assert kind in TYPES, line
            current["type"] = kind
        else:
            assert not line.startswith("#") and line.strip() == line and line, f"stray line {line!r}"
            match = SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            labels = tuple(re.findall(LABEL, match.group(2) or ""))
            assert len({k for k, _ in labels}) == len(labels), f"a label twice: {line!r}"
            assert current is not None and current["type"], f"sample before its HELP/TYPE: {line!r}"
            family = [n for n in families if n == name or (current["type"] == "histogram" and name in
                                                             (n + "_bucket", n + "_sum", n + "_count"))]
            assert family == [list(families)[-1]], f"sample {name} outside its family"
            key = (name, labels)
            assert key not in current["samples"], f"duplicate sample {line!r}"
            value = float(match.groups()[-1])  # "+Inf", "NaN" and exponents parse too
            current["samples"][key] = value
    for name, family in families.items():
        assert family["type"], f"{name} has no TYPE"
        if family["type"] == "histogram":
            check_histogram(name, family["samples"])
        if family["type"] == "counter":
            assert all(v >= 0 for v in family["samples"].values()), name
    return families


def check_histogram(name: str, samples: dict) -> None:
    buckets = [(dict(labels)["le"], v) for (n, labels), v in samples.items() if n == name + "_bucket"]
    bounds = [float(le) for le, _ in buckets]
    counts = [v for _, v in buckets]
    assert bounds and bounds == sorted(bounds) and len(set(bounds)) == len(bounds), f"{name}: le not ascending"
    assert math.isinf(bounds[-1]) and buckets[-1][0] == "+Inf", f"{name}: no +Inf bucket"
    assert all(a <= b for a, b in zip(counts, counts[1:])), f"{name}: bucket counts not cumulative"
    assert (name + "_count", ()) in samples and (name + "_sum", ()) in samples, f"{name}: no _sum or _count"
    assert counts[-1] == samples[(name + "_count", ())], f"{name}: +Inf bucket != _count"


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    key = (sample or family, tuple(sorted(labels.items())))
    found = {(n, tuple(sorted(ls))): v for (n, ls), v in families[family]["samples"].items()}
    return found.get(key, 0.0)


def start(opts: ServeOptions):
    app = build_app(opts)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        app.engine.stop()
        thread.join(timeout=10)

    return "http://%s:%d" % httpd.server_address[:2], app, stop


def scrape(url: str, key: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=60) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture(scope="module")
def served(run_model):
    opts = ServeOptions(model=str(run_model), adapters={}, device="cpu", dtype="float32",
                        engine=EngineConfig(max_batch=8), limits=Limits(max_tokens=40))
    url, app, stop = start(opts)
    yield url, app
    stop()


def test_the_page_parses_as_prometheus_text_and_its_counters_move(served, run_model):
    url, app = served
    status, content_type, text = scrape(url)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    before = parse_prometheus(text)
    assert before["ftkit_requests_total"]["type"] == "counter"
    assert before["ftkit_queue_length"]["type"] == "gauge" and before["ftkit_running_requests"]["type"] == "gauge"
    for name in ("ftkit_time_to_first_token_seconds", "ftkit_time_per_output_token_seconds"):
        assert before[name]["type"] == "histogram"

    comp = url + "/v1/completions"
    body = {"model": run_model.name, "prompt": "the sun is", "max_tokens": 6, "temperature": 0}
    status, plain = call(comp, body)
    assert status == 200 and plain["usage"]["completion_tokens"] > 1
    events = stream(comp, {**body, "prompt": "the red cat is the", "stream_options": {"include_usage": True}})
    streamed = events[-2]["usage"]
    assert call(comp, {**body, "model": "nothing"})[0] == 404
    after = parse_prometheus(scrape(url)[2])

    def moved(family: str, sample: str | None = None, **labels) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert moved("ftkit_requests_total", endpoint="/v1/completions", status="200") == 2
    assert moved("ftkit_requests_total", endpoint="/v1/completions", status="404") == 1
    assert moved("ftkit_requests_total", endpoint="/metrics", status="200") == 1  # the scrape before
    assert moved("ftkit_prompt_tokens_total") == plain["usage"]["prompt_tokens"] + streamed["prompt_tokens"]
    assert moved("ftkit_generation_tokens_total") == plain["usage"]["completion_tokens"] + streamed["completion_tokens"]
    ttft, tpot = "ftkit_time_to_first_token_seconds", "ftkit_time_per_output_token_seconds"
    assert moved(ttft, ttft + "_count") == 2 and moved(ttft, ttft + "_sum") > 0
    assert moved(tpot, tpot + "_count") == 1 + (streamed["completion_tokens"] > 1)
    assert value(after, "ftkit_queue_length") == 0 and value(after, "ftkit_running_requests") == 0
    # a path nobody routes is counted under one label, not under whatever a client sent
    assert call(url + "/v1/secret-probe")[0] == 404
    final = parse_prometheus(scrape(url)[2])
    assert value(final, "ftkit_requests_total", endpoint="other", status="404") >= 1
    assert not any("secret" in str(k) for k in final["ftkit_requests_total"]["samples"])


def test_the_gauges_read_the_engine(served):
    _, app = served
    page = parse_prometheus(app.metrics.render())
    assert value(page, "ftkit_queue_length") == app.engine.queue_length
    assert value(page, "ftkit_running_requests") == app.engine.running_rows


def test_metrics_want_the_api_key(run_model):
    url, _, stop = start(ServeOptions(model=str(run_model), adapters={}, device="cpu", api_key="sekret"))
    try:
        assert scrape(url)[0] == 401 and scrape(url, "wrong")[0] == 401
        status, _, text = scrape(url, "sekret")
        assert status == 200 and parse_prometheus(text)
    finally:
        stop()


def test_renderer_escapes_labels_and_histograms_count_each_observation_once():
    metrics = Metrics()
    metrics.request('/a"b\\c\nd', 200)
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.counts == [2, 1] and h.count == 4 and h.sum == pytest.approx(3.65)
    timing = TimedEvents()
    metrics.latency(timing, 5)  # no text yet: nothing observed
    page = parse_prometheus(metrics.render())
    assert value(page, "ftkit_requests_total", endpoint='/a\\"b\\\\c\\nd', status="200") == 1
    assert value(page, "ftkit_time_to_first_token_seconds", "ftkit_time_to_first_token_seconds_count") == 0


@pytest.mark.parametrize("page", [
    "# HELP a x\n# TYPE a counter\na 1",  # no final newline
    "a 1\n",  # no HELP/TYPE
    "# HELP a x\n# TYPE a counter\na{b=\"1\",b=\"2\"} 1\n",  # a label twice
    "# HELP a x\n# TYPE a counter\nb 1\n",  # outside its family
    "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",  # not cumulative
    "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",  # no +Inf
    "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",  # +Inf != count
    "# HELP a x\n# TYPE a counter\na one\n",  # not a number
])
def test_the_parser_refuses_malformed_pages(page):
    with pytest.raises((AssertionError, ValueError)):
        parse_prometheus(page)
