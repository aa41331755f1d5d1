"""models.attention: the bf16 grouped causal path equals SDPA's causal attention within bf16 rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import attention
from tests.test_lora import tiny_decoder


def _inputs(B: int, H: int, K: int, T: int, D: int, seed: int = 0):
    """q [B,H,T,D], k, v [B,K,T,D] in bf16, transposed views as the decoder makes them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, n, D, generator=g).bfloat16().transpose(1, 2) for n in (H, K, K)]


def _run(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y = fn(q, k, v)
    y.backward(grad.to(y.dtype))
    return [t.float() for t in (y, q.grad, k.grad, v.grad)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("block", [None, 16, attention.BLOCK])
@pytest.mark.parametrize("H,K,T", [(9, 3, 64), (4, 4, 33), (8, 2, 1)])
def test_grouped_path_matches_sdpa_within_bf16_rounding(H, K, T, block):
    """Output and all three gradients against float32 SDPA: no worse than a few times bf16 SDPA's own error.

    block 16 splits the queries into 4 (T 64) or 3 uneven blocks (T 33: 16, 16, 1); None is one [T, T] block.
    """
    q, k, v = _inputs(2, H, K, T, 16)
    grad = torch.randn(2, H, T, 16, generator=torch.Generator().manual_seed(1))
    ref = _run(_sdpa, *(t.float() for t in (q, k, v)), grad)
    ours = _run(lambda *qkv: attention.grouped_causal_attention(*qkv, block=block), q, k, v, grad)
    sdpa_bf16 = _run(_sdpa, q, k, v, grad)
    for name, r, o, s in zip(("y", "dq", "dk", "dv"), ref, ours, sdpa_bf16):
        scale = r.abs().max()
        err, sdpa_err = ((o - r).abs().max() / scale).item(), ((s - r).abs().max() / scale).item()
        assert err <= max(3 * sdpa_err, 2 ** -7), (name, err, sdpa_err)


def test_path_applies_to_cpu_bf16_self_attention_only():
    q, k, _ = _inputs(1, 4, 2, 8, 16)
    assert attention.applies(q, k)
    assert not attention.applies(q.float(), k.float())
    assert not attention.applies(q, torch.cat([k, k], dim=2))  # cached keys: SDPA
    long_q, long_k, _ = _inputs(1, 2, 1, attention.MAX_SEQ + 1, 8)
    assert not attention.applies(long_q, long_k)


def test_blocks_cover_the_positions_once_in_order():
    assert attention.blocks(300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert attention.blocks(64, None) == [(0, 64)]
    assert attention.blocks(1, 128) == [(0, 1)]


def test_causal_bias_of_a_block_masks_exactly_the_later_keys():
    """Rows of positions [4, 7) with 2 query heads each: row (t-4)*2 + g may see keys 0..t."""
    bias = attention.causal_bias(4, 7, 2, torch.float32, torch.device("cpu"))
    assert bias.shape == (6, 7)
    for row in range(6):
        t = 4 + row // 2
        assert torch.equal(bias[row].isinf(), torch.arange(7) > t)


def test_decoder_in_bf16_matches_its_sdpa_path(monkeypatch):
    """The whole decoder in bf16: logits and gradients with the grouped path close to those with SDPA."""
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(attention, "applies", lambda q, k: False)
        model = tiny_decoder().to(torch.bfloat16).train()
        logits = model(ids)
        logits.float().square().mean().backward()
        results.append((logits.float(), model.model.layers[0].self_attn.q_proj.weight.grad.float()))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0.02, atol=0.02)
    assert ((g1 - g2).norm() / g2.norm()).item() < 0.02


def test_activation_checkpointing_recomputes_the_grouped_path_exactly():
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = tiny_decoder().to(torch.bfloat16).train()
        model.gradient_checkpointing = checkpointing
        model(ids).float().square().mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.equal(grads[0], grads[1])
