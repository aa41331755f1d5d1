"""Per-row adapters (lora.per_row_adapters): a batch mixing adapters row by row, as the server runs it."""
from __future__ import annotations

import pytest
import torch

import lora
from lora import LoraConfig
from lora.inject import per_row_adapters
from tests.test_lora import tiny_decoder

NAMES = ["a", "b", "c"]


def _model_with_adapters(dora_for: str | None = None):
    model = tiny_decoder()
    for i, name in enumerate(NAMES):
        targets = ["q_proj", "v_proj"] if name != "c" else ["q_proj", "v_proj", "down_proj"]
        lora.inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets, adapter_name=name,
                                           use_dora=name == dora_for))
        torch.manual_seed(10 + i)
        with torch.no_grad():  # non-zero B so every adapter changes the output
            for p in lora.adapter_parameters(model, name).values():
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("dora_for", [None, "b"])
def test_mixed_batch_equals_each_row_alone_with_its_adapter(dora_for):
    model = _model_with_adapters(dora_for)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 61, (5, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    rows = ["a", "b", None, "c", "a"]
    with torch.no_grad(), per_row_adapters(model, rows):
        mixed = model(ids, attention_mask=mask)
    for i, name in enumerate(rows):
        if name is None:
            with lora.disable_adapters(model), torch.no_grad():
                alone = model(ids[i : i + 1], attention_mask=mask[i : i + 1])
        else:
            lora.set_active_adapter(model, name)
            with torch.no_grad():
                alone = model(ids[i : i + 1], attention_mask=mask[i : i + 1])
        assert torch.allclose(mixed[i], alone[0], atol=1e-5), f"row {i} ({name})"
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_per_row_is_cleared_after_the_block_and_refused_when_merged():
    model = _model_with_adapters()
    ids = torch.randint(3, 61, (2, 5))
    lora.set_active_adapter(model, "b")
    with torch.no_grad():
        before = model(ids)
        with per_row_adapters(model, ["a", "a"]):
            pass
        assert torch.equal(model(ids), before)  # back on the active adapter
        assert all(layer.row_groups is None for _, layer in lora.lora_layers(model))
        lora.merge_lora(model)
        with pytest.raises(RuntimeError, match="merged"), per_row_adapters(model, ["a", None]):
            model(ids)


def test_one_adapter_for_every_row_equals_the_active_adapter_path():
    model = _model_with_adapters()
    ids = torch.randint(3, 61, (3, 6))
    lora.set_active_adapter(model, "c")
    with torch.no_grad():
        active = model(ids)
        with per_row_adapters(model, ["c", "c", "c"]):
            assert torch.allclose(model(ids), active, atol=1e-6)


def test_bf16_base_mixed_batch_matches_the_single_adapter_path_bit_for_bit():
    model = _model_with_adapters().to(torch.bfloat16)
    for _, layer in lora.lora_layers(model):  # adapters stay float32 on a bf16 base, as in training
        for name in layer.adapter_names:
            for p in layer.adapter_parameters(name).values():
                p.data = p.data.float()
    ids = torch.randint(3, 61, (3, 6))
    rows = ["b", "a", "b"]
    with torch.no_grad(), per_row_adapters(model, rows):
        mixed = model(ids)
    for i, name in enumerate(rows):
        lora.set_active_adapter(model, name)
        with torch.no_grad():
            assert torch.equal(mixed[i], model(ids[i : i + 1])[0]), i
