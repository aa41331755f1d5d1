"""`train.run --compile`: the flag, Decoder.compile_blocks (same keys, same outputs) and LoRA under compile."""
from __future__ import annotations

import pytest
import torch

import lora
from lora import LoraConfig
from lora.linear import _traced_lora_term
from lora.lowrank import lora_delta
from tests.test_lora import tiny_decoder
from train.config import TrainConfig, parse_args


def test_compile_flag_is_off_by_default_and_parsed():
    assert TrainConfig().run.compile is False
    assert parse_args(["--model", "m", "--compile"]).run.compile is True


@pytest.mark.parametrize("autocast", [False, True])
def test_traced_lora_term_without_dropout_equals_lora_delta(autocast):
    """The compile-time path computes lora_delta's maths with the same roundings."""
    torch.manual_seed(0)
    x, a, b = torch.randn(2, 5, 16), torch.randn(4, 16), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        traced = _traced_lora_term(x, a, b, 2.0, 0.0)
        eager = lora_delta(x, a, b, 2.0, 0.0, training=True)
    assert traced.dtype == eager.dtype
    assert torch.equal(traced, eager)


def test_traced_lora_term_dropout_keeps_one_minus_p_scaled():
    """With dropout on, kept inputs are scaled by 1/(1-p) and the rest zeroed: A = I, B = I shows drop(x)."""
    torch.manual_seed(0)
    x, eye = torch.rand(64, 256) + 1.0, torch.eye(256)
    y = _traced_lora_term(x, eye, eye, 1.0, 0.25)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    torch.testing.assert_close(y[kept], x[kept] / 0.75)


def test_compiled_blocks_keep_keys_outputs_and_train_only_adapters():
    """compile_blocks changes no state-dict key; logits and LoRA gradients match eager within float32 rounding."""
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    models = []
    for compiled in (False, True):
        model = tiny_decoder()
        lora.inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]))
        lora.mark_only_adapter_trainable(model, "default")
        for name, p in model.named_parameters():  # B starts at zero: give the adapters a visible effect
            if "lora_B" in name:
                torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(len(name)))
        keys = list(model.state_dict())
        if compiled:
            model.compile_blocks()
            assert list(model.state_dict()) == models[0][1]
        model.train()
        logits = model(ids)
        logits.float().square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        models.append((logits.detach(), keys, grads))
    (eager, _, g_eager), (comp, _, g_comp) = models
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    assert g_comp.keys() == g_eager.keys() and all("lora_" in n for n in g_comp)
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-4, atol=1e-5)


def test_qlora_layer_runs_compiled_with_a_graph_break_at_the_4bit_base():
    """NF4Linear's native dequantizer cannot be traced: compiled, a LoRA layer on it still equals eager."""
    from lora import LoRALinear
    from quant import NF4Linear

    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.float32), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 64)
    eager = layer(x)
    compiled = torch.compile(layer)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
