"""Dropout masks for LoRA's input: an independent Bernoulli keep-mask per adapted linear, drawn fast.

What dropout must be, and all this promises: every element is kept with probability q = 1 - p,
independently of every other element and of every other mask, and kept values are scaled by 1/q so
that the expected output is the input; the masks are a function of torch's random state, so a seeded
run draws the same masks, a resumed run (whose checkpoint holds that state) continues with the masks
the uninterrupted run would have drawn, and ranks seeded apart draw different masks.

They are not nn.Dropout's masks. On a CPU `bernoulli_` draws one 32-bit Mersenne Twister number per
element and was 13 % of a LoRA training step at SmolLM2-135M's shape. Here each mask takes a single
64-bit seed from torch's default generator (so torch's state still decides everything) and then reads
16 bits per element from the raw 64-bit output of NumPy's SFC64 generator (one vectorised call, no
per-element conversion): an element is kept when its 16 bits are below t = round(65536 q), so q is
realised as t / 65536 (within 2^-17 of the asked q) and the kept values are scaled by exactly
65536 / t, which keeps the expectation exact. A 2 x 512 x 576 mask takes 0.25 ms this way against
2.1 ms for `bernoulli_` (benchmarks/RESULTS.md). On a GPU `bernoulli_` is fast and is used as it is.
"""
from __future__ import annotations

import numpy as np
import torch

LEVELS = 1 << 16  # resolution of the keep probability


def keep_threshold(p: float) -> int:
    """t: an element is kept when its uniform 16-bit draw is < t (at least 1, so something survives)."""
    return min(LEVELS, max(1, round(LEVELS * (1.0 - p))))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(bool keep-mask of `shape`, scale for the kept values) for dropout probability p in (0, 1)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p), 1.0 / (1.0 - p)
    t = keep_threshold(p)
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    n = int(np.prod(shape, dtype=np.int64))
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)  # uint64: four 16-bit draws each
    return torch.from_numpy(words.view(np.uint16)[:n] < t).view(shape), LEVELS / t
