"""GET /metrics: the server's counters, gauges and histograms in Prometheus' text exposition format (0.0.4).

    # HELP ftkit_requests_total HTTP requests answered, by endpoint and status.
    # TYPE ftkit_requests_total counter
    ftkit_requests_total{endpoint="/v1/completions",status="200"} 12

Written here rather than taken from prometheus_client: the format is a few lines of text and the server
needs four kinds of sample, not a dependency. Handler threads record, so every update takes one lock.
Gauges that belong to the engine (queue length, running rows) are read when the page is rendered.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable

# Seconds. Time to first token spans a warm prefill on a GPU to a long queue on a CPU; time per output
# token spans a large batch on a GPU to a small model on one core (vLLM's buckets are similar).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
PREFIX = "ftkit_"


class Histogram:
    """Observations counted into cumulative buckets (upper bounds `le`), with their sum and count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative (rendering accumulates)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1


class Metrics:
    """Everything /metrics reports; `gauges` name -> (help, a function read at render time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}  # counters kept elsewhere (the registry's)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def latency(self, timing: TimedEvents, tokens: int) -> None:
        """Time to first token (submit -> first text) and, over more than one token, the time per output
        token after the first: (done - first) / (tokens - 1)."""
        if timing.first_text is None:
            return
        with self._lock:
            self.ttft.observe(timing.first_text - timing.submitted)
            if tokens > 1 and timing.done is not None:
                self.tpot.observe((timing.done - timing.first_text) / (tokens - 1))

    def render(self) -> str:
        with self._lock:
            out: list[str] = []
            _family(out, "requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                    [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(self.requests.items())])
            _family(out, "prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                    [({}, self.prompt_tokens)])
            _family(out, "generation_tokens_total", "counter", "Tokens generated for finished requests.",
                    [({}, self.generation_tokens)])
            for name, (help_, read) in self.counters.items():
                _family(out, name, "counter", help_, [({}, read())])
            for name, (help_, read) in self.gauges.items():
                _family(out, name, "gauge", help_, [({}, read())])
            _histogram(out, "time_to_first_token_seconds", "Seconds from a request's submission to its first text.",
                       self.ttft)
            _histogram(out, "time_per_output_token_seconds", "Seconds per generated token after the first.", self.tpot)
        return "\n".join(out) + "\n"


class TimedEvents(queue.Queue):
    """A job's event queue that keeps when its first text and its end were produced (each event's `at`,
    stamped on the engine's thread, so the times do not depend on when a handler reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted = time.monotonic()
        self.first_text: float | None = None
        self.done: float | None = None

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        if item.kind == "text" and self.first_text is None:
            self.first_text = item.at
        elif item.kind in ("done", "error"):
            self.done = item.at
        super().put(item, block, timeout)


def _family(out: list[str], name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
    out += [f"# HELP {PREFIX}{name} {_escape_help(help_)}", f"# TYPE {PREFIX}{name} {kind}"]
    out += [f"{PREFIX}{name}{_labels(labels)} {_number(value)}" for labels, value in samples]


def _histogram(out: list[str], name: str, help_: str, h: Histogram) -> None:
    out += [f"# HELP {PREFIX}{name} {_escape_help(help_)}", f"# TYPE {PREFIX}{name} histogram"]
    total = 0
    for bound, n in zip(h.bounds, h.counts):
        total += n
        out.append(f"{PREFIX}{name}_bucket{_labels({'le': _number(bound)})} {total}")
    out.append(f'{PREFIX}{name}_bucket{{le="+Inf"}} {h.count}')
    out += [f"{PREFIX}{name}_sum {_number(h.sum)}", f"{PREFIX}{name}_count {h.count}"]


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    """Integers without a decimal point, other values as Python's shortest repr; infinities as +Inf/-Inf."""
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))
