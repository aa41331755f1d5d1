"""Prefix and prompt tuning on a real pretrained model (the shipped SmolLM2-135M-Instruct GGUF): both start
from real tokens and end a short run below the untouched base's held-out loss.

Random N(0,1) virtual tokens (PEFT's default) start far above the base on this model (README: prefix
and prompt tuning; `python -m benchmarks.virtual_init`); these runs are the demo task, small enough for CI.
"""
from __future__ import annotations

import math

import pytest

from benchmarks.virtual_init import measure


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_a_short_run_from_real_tokens_ends_below_the_untouched_base(tmp_path, method):
    r = measure(method, "text", 12, tmp_path)
    assert all(math.isfinite(r[k]) for k in ("base", "start", "end"))
    assert r["end"] < r["base"], r
    # from real tokens the run starts as the base reading a sentence first: near the base, not above it by nats
    assert r["start"] < r["base"] + 0.5, r
