"""LoRA dropout tested for what dropout must be, not for equality with another library's random stream:
Bernoulli(1-p) keep-masks, kept values scaled so the expectation is the input, masks independent of
each other, a function of torch's seed (so a seeded run and a resumed run replay them), and the
layer's output equal to the formula with the mask it drew (tests/test_fused_ops.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora import LoraConfig, LoRALinear, inject_lora
from lora.dropout import LEVELS, keep_mask, keep_threshold

CPU = torch.device("cpu")


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p_within_binomial_noise(p):
    torch.manual_seed(0)
    n = 1_000_000
    mask, scale = keep_mask((1000, 1000), p, CPU)
    q = keep_threshold(p) / LEVELS
    assert abs(q - (1 - p)) <= 0.5 / LEVELS  # the realised keep probability is the asked one, to 2^-17
    assert scale == pytest.approx(1 / q, rel=1e-12)
    kept = int(mask.sum())
    sigma = math.sqrt(n * q * (1 - q))
    assert abs(kept - n * q) < 5 * sigma


def test_dropout_is_unbiased():
    """Mean of drop(x) over many masks equals x (scale = 1 / realised keep probability)."""
    torch.manual_seed(1)
    x = torch.randn(64, 32, dtype=torch.float64)
    total = torch.zeros_like(x)
    draws = 4000
    for _ in range(draws):
        mask, scale = keep_mask(x.shape, 0.3, CPU)
        total += x * mask * scale
    err = (total / draws - x).abs()
    # per element sd of the mean: |x| sqrt(p/q) / sqrt(draws)
    bound = 5 * x.abs() * math.sqrt(0.3 / 0.7) / math.sqrt(draws)
    assert bool((err <= bound + 1e-12).all())


def test_masks_show_no_structure():
    """No correlation between neighbouring elements, between rows, or between two successive masks;
    run lengths of kept elements as a Bernoulli sequence gives them."""
    torch.manual_seed(2)
    a, _ = keep_mask((2000, 500), 0.5, CPU)
    b, _ = keep_mask((2000, 500), 0.5, CPU)
    fa, fb = a.double() - 0.5, b.double() - 0.5
    n = a.numel()
    for name, c in [("neighbours", (fa[:, 1:] * fa[:, :-1]).mean()), ("rows", (fa[1:] * fa[:-1]).mean()),
                    ("successive masks", (fa * fb).mean())]:
        assert abs(float(c)) / 0.25 < 5 / math.sqrt(n), name  # correlation within 5 sigma of 0
    flat = a.flatten()
    runs = int((flat[1:] != flat[:-1]).sum()) + 1  # Wald-Wolfowitz: expected n/2 + 1/2 for p = 1/2
    assert abs(runs - (n + 1) / 2) < 5 * math.sqrt(n) / 2


def test_masks_are_a_function_of_torchs_seed():
    torch.manual_seed(3)
    first = [keep_mask((7, 300), 0.2, CPU)[0] for _ in range(3)]
    torch.manual_seed(3)
    again = [keep_mask((7, 300), 0.2, CPU)[0] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], first[1])  # successive masks differ
    torch.manual_seed(4)  # another rank's seed (train.run seeds seed + rank)
    assert not torch.equal(keep_mask((7, 300), 0.2, CPU)[0], first[0])
    # resuming: restoring torch's generator state replays the masks from there on
    torch.manual_seed(3)
    keep_mask((7, 300), 0.2, CPU)
    state = torch.get_rng_state()
    expected = keep_mask((7, 300), 0.2, CPU)[0]
    torch.set_rng_state(state)
    assert torch.equal(keep_mask((7, 300), 0.2, CPU)[0], expected)


def test_adapted_linears_draw_independent_masks():
    """q and v read the same input in one forward: their masks must differ (each linear its own draw)."""
    torch.manual_seed(5)
    seen = []

    def spy(shape, p, device):
        out = keep_mask(shape, p, device)
        seen.append(out[0])
        return out

    from lora import lowrank

    original = lowrank.keep_mask
    lowrank.keep_mask = spy
    try:
        model = nn.ModuleDict({"q_proj": nn.Linear(32, 32), "v_proj": nn.Linear(32, 32)})
        inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]))
        model.train()
        x = torch.randn(4, 32)
        model["q_proj"](x), model["v_proj"](x)
    finally:
        lowrank.keep_mask = original
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])


def test_eval_mode_and_p_zero_draw_nothing():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(5, 16)
    layer.eval()
    state = torch.get_rng_state()
    first = layer(x)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(layer(x), first)
    layer.train()
    assert not torch.equal(layer(x), first)
