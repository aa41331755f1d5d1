"""The memory-saving autograd functions against the plain tensor formulas they replace.

models.rmsnorm, models.swiglu and lora.lowrank each promise the plain formula's forward (bit for bit)
and its gradients, while keeping less for backward; the rotary table cache promises the values a
fresh computation gives. Each promise is checked here, and so is the saving itself.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora.dropout import keep_mask
from lora.linear import LoRALinear
from lora.lowrank import lora_delta
from models.config import ModelConfig
from models.decoder import Decoder, RotaryEmbedding
from models.rmsnorm import rms_norm
from models.swiglu import swiglu


def saved_bytes(fn) -> tuple[int, list[tuple[torch.dtype, tuple[int, ...]]]]:
    """Bytes (distinct storages) and (dtype, shape) of every tensor autograd saves while fn() runs."""
    seen: dict[int, int] = {}
    kinds = []

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        kinds.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), kinds, out


def plain_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
def test_rms_norm_forward_is_the_plain_formula_bit_for_bit(x_dtype, w_dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 48) * 3).to(x_dtype)
    w = (torch.randn(48) + 1).to(w_dtype)
    assert torch.equal(rms_norm(x, w, 1e-6), plain_rms_norm(x, w, 1e-6))


def test_rms_norm_gradients_equal_autograd_through_the_plain_formula_float32():
    torch.manual_seed(1)
    x = (torch.randn(4, 9, 64, dtype=torch.float64) * 2).float()
    w = torch.randn(64) + 1
    g = torch.randn(4, 9, 64)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    rms_norm(xa, wa, 1e-6).backward(g)
    plain_rms_norm(xb, wb, 1e-6).backward(g)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(wa.grad, wb.grad, rtol=1e-5, atol=1e-5)
    # and both against float64, so the check is not two wrong answers agreeing
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    plain_rms_norm(x64, w64, 1e-6).backward(g.double())
    assert torch.allclose(xa.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_rms_norm_bf16_gradients_match_the_plain_formula():
    """bf16 input, frozen bf16 weight (LoRA's norms) and bf16 input, float32 weight (full fine-tuning)."""
    torch.manual_seed(2)
    x = torch.randn(2, 16, 64).bfloat16()
    for w, trains in ((torch.randn(64).bfloat16() + 1, False), (torch.randn(64) + 1, True)):
        g = torch.randn(2, 16, 64).to(torch.promote_types(x.dtype, w.dtype))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        wa, wb = w.clone().requires_grad_(trains), w.clone().requires_grad_(trains)
        rms_norm(xa, wa, 1e-6).backward(g)
        plain_rms_norm(xb, wb, 1e-6).backward(g)
        # one bf16 rounding of the result apart at most
        assert torch.allclose(xa.grad.float(), xb.grad.float(), rtol=1e-2, atol=1e-2)
        assert (xa.grad.float() - xb.grad.float()).abs().mean() < 1e-3
        if trains:
            assert torch.allclose(wa.grad, wb.grad, rtol=1e-3, atol=1e-3)


def test_rms_norm_keeps_only_x_weight_and_rstd():
    x = torch.randn(2, 32, 64).bfloat16().requires_grad_()
    w = torch.ones(64, dtype=torch.bfloat16)
    fused, kinds, _ = saved_bytes(lambda: rms_norm(x, w, 1e-6))
    plain, _, _ = saved_bytes(lambda: plain_rms_norm(x, w, 1e-6))
    assert fused == x.numel() * 2 + 64 * 2 + 2 * 32 * 4  # x (bf16), weight, rstd [2, 32, 1] float32
    assert (torch.float32, (2, 32, 64)) not in kinds
    assert plain > fused


# -------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_and_gradients_are_the_two_op_version_bit_for_bit(dtype):
    torch.manual_seed(3)
    gate, up, g = (torch.randn(3, 5, 40).to(dtype) for _ in range(3))
    ga, ua = gate.clone().requires_grad_(), up.clone().requires_grad_()
    gb, ub = gate.clone().requires_grad_(), up.clone().requires_grad_()
    a, b = swiglu(ga, ua), F.silu(gb) * ub
    assert torch.equal(a, b)
    a.backward(g)
    b.backward(g)
    assert torch.equal(ga.grad, gb.grad) and torch.equal(ua.grad, ub.grad)


def test_swiglu_keeps_only_gate_and_up():
    gate = torch.randn(2, 8, 32).requires_grad_()
    up = torch.randn(2, 8, 32).requires_grad_()
    fused, _, _ = saved_bytes(lambda: swiglu(gate, up))
    plain, _, _ = saved_bytes(lambda: F.silu(gate) * up)
    assert fused == 2 * gate.numel() * 4 and plain == 3 * gate.numel() * 4


# ------------------------------------------------------------------------------------ LoRA delta
def module_delta(x, a, b, scaling, p, seed):
    """The module formula lora_delta replaces: s · B(A(dropout(x.to(A.dtype)))), dropout as x times a float32
    noise tensor (mask · scale), the mask drawn by lora.dropout from the same generator state."""
    torch.manual_seed(seed)
    xa = x.to(a.dtype)
    if p > 0:
        mask, scale = keep_mask(x.shape, p, x.device)
        xa = xa * (mask.to(torch.float32) * scale)
    return F.linear(F.linear(xa, a), b) * scaling


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_delta_equals_the_module_formula_float32(p):
    torch.manual_seed(4)
    x, a, b = torch.randn(3, 11, 24), torch.randn(4, 24), torch.randn(16, 4)
    g = torch.randn(3, 11, 16)
    leaves = [[t.clone().requires_grad_() for t in (x, a, b)] for _ in range(2)]
    torch.manual_seed(9)
    out = lora_delta(*leaves[0], 2.0, p, training=p > 0)
    ref = module_delta(*leaves[1], 2.0, p, seed=9)
    assert torch.equal(out, ref)
    out.backward(g)
    ref.backward(g)
    for ours, theirs in zip(leaves[0], leaves[1]):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-6, atol=1e-6)


def test_lora_delta_under_bf16_autocast_equals_the_module_formula_and_keeps_no_float32_input():
    torch.manual_seed(5)
    x = torch.randn(2, 32, 64).bfloat16()
    a, b = torch.randn(8, 64) * 0.1, torch.randn(48, 8) * 0.1
    g = torch.randn(2, 32, 48).bfloat16()
    leaves = [[t.clone().requires_grad_() for t in (x, a, b)] for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(9)
        saved, kinds, out = saved_bytes(lambda: lora_delta(*leaves[0], 2.0, 0.1, training=True))
        plain, _, ref = saved_bytes(lambda: module_delta(*leaves[1], 2.0, 0.1, seed=9))
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(leaves[0][0].grad, leaves[1][0].grad)
    for i in (1, 2):  # float32 masters: the same bf16 matmuls, summed in a different order at most
        assert torch.allclose(leaves[0][i].grad, leaves[1][i].grad, rtol=1e-2, atol=1e-4)
    assert all(dtype != torch.float32 or shape[-1] != 64 for dtype, shape in kinds)  # no float32 copy of x
    # kept: x (bf16, 2 bytes) + mask (1 byte) per element; the module formula: noise (4) + bf16 copy (2)
    assert saved < 0.6 * plain


def test_lora_layer_gradients_match_the_module_formula_with_frozen_base():
    """Through LoRALinear: gradients reach x, A and B (not the frozen base) as the module formula gives them."""
    torch.manual_seed(6)
    layer = LoRALinear(nn.Linear(24, 16), r=4, alpha=8, dropout=0.2).train()
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(5, 24, requires_grad=True)
    torch.manual_seed(1)
    layer(x).square().sum().backward()
    got = [x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()]
    assert layer.base.weight.grad is None
    x2 = x.detach().clone().requires_grad_()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    (layer.base(x2) + module_delta(x2, a, b, layer.scaling["default"], 0.2, seed=1)).square().sum().backward()
    for ours, theirs in zip(got, (x2.grad, a.grad, b.grad)):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- rotary cache
def tiny_config(**extra) -> ModelConfig:
    return ModelConfig.from_hf_dict({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, **extra})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_equals_recomputation(dtype):
    rotary = RotaryEmbedding(tiny_config(rope_theta=500000.0))
    for T in (1, 17, 64, 17):
        cos, sin = rotary.for_length(T, dtype, torch.device("cpu"))
        ref_cos, ref_sin = rotary(torch.arange(T)[None], dtype)
        assert cos.shape == (1, 1, T, 8) and cos.dtype == dtype
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert rotary.for_length(17, dtype, torch.device("cpu"))[0] is cos  # a repeated length is served from the cache


def test_rope_cache_follows_a_changed_inv_freq():
    rotary = RotaryEmbedding(tiny_config())
    before, _ = rotary.for_length(9, torch.float32, torch.device("cpu"))
    rotary.inv_freq = rotary.inv_freq * 0.5  # e.g. a loader recomputing the buffer
    after, _ = rotary.for_length(9, torch.float32, torch.device("cpu"))
    assert torch.equal(after, rotary(torch.arange(9)[None], torch.float32)[0])
    assert not torch.equal(before, after)
    rotary.inv_freq.mul_(2)  # an in-place change is seen too
    assert torch.equal(rotary.for_length(9, torch.float32, torch.device("cpu"))[0], before)


def test_decoder_with_the_cached_table_equals_explicit_positions():
    torch.manual_seed(7)
    model = Decoder(tiny_config()).train()
    ids = torch.randint(0, 64, (3, 20))
    cached = model(ids)
    explicit = model(ids, position_ids=torch.arange(20).expand(3, 20))
    assert torch.equal(cached, explicit)
