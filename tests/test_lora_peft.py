"""PEFT interoperability: adapters we save load in peft.PeftModel and compute the same logits, and
adapters PEFT saves load into ours with the same logits; the trainable-parameter line matches."""
from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from torch import nn

import lora
import models
from lora import LoraConfig
from lora.dropout import keep_mask
from lora.lowrank import drop
from tests.conftest import left_padded_batch
from tests.test_lora import VARIANTS, randomize_adapter

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": r".*\.(q_proj|v_proj|down_proj)",  # biased q/v; a regex target
    "qwen3": "all-linear",
}
CASES = [(m, v) for m in ("llama", "qwen2") for v in VARIANTS] + [("qwen3", "dora")]


def _compare(ours, hf, config):
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(input_ids=ids, attention_mask=mask).logits
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("model_variant,variant", CASES)
def test_our_adapter_loads_in_peft_with_same_logits(hf_checkpoint, tmp_path, model_variant, variant):
    path, hf = hf_checkpoint(model_variant)
    ours = models.load_pretrained(path)
    cfg = LoraConfig(r=4, alpha=8, target_modules=TARGETS[model_variant], **VARIANTS[variant])
    lora.inject_lora(ours, cfg)
    randomize_adapter(ours, std=0.1)
    out = lora.save_adapter(ours, tmp_path / "ours", cfg, base_model_name_or_path=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unexpected keyword" or missing-key warnings
        loaded = peft.PeftConfig.from_pretrained(out)
    assert loaded.r == 4 and loaded.lora_alpha == 8 and loaded.use_dora == cfg.use_dora and loaded.use_rslora == cfg.use_rslora
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default"))
    assert n_lora == len(list(lora.lora_layers(ours)))
    assert _compare(ours, peft_model, ours.config) <= 1e-4


@pytest.mark.parametrize("model_variant,variant", CASES)
def test_peft_adapter_loads_into_ours_with_same_logits(hf_checkpoint, tmp_path, model_variant, variant):
    path, hf = hf_checkpoint(model_variant)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[model_variant], task_type="CAUSAL_LM", **VARIANTS[variant]
    )
    peft_model = peft.get_peft_model(hf, cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = models.load_pretrained(path)
    loaded = lora.load_adapter(ours, tmp_path / "peft")
    assert loaded.use_dora == (variant == "dora") and loaded.use_rslora == (variant == "rslora")
    assert _compare(ours, peft_model, ours.config) <= 1e-4
    with torch.no_grad():  # and merged, PEFT's merge and ours still agree
        lora.merge_lora(ours)
        merged = peft_model.merge_and_unload()
    assert _compare(ours, merged, ours.config) <= 1e-4


@pytest.mark.parametrize("model_variant,extra", [("llama_tied", {}), ("qwen3", {"use_dora": True})])
def test_trainable_report_matches_peft(hf_checkpoint, model_variant, extra, capsys):
    path, hf = hf_checkpoint(model_variant)
    ours = models.load_pretrained(path)
    lora.inject_lora(ours, LoraConfig(r=8, alpha=16, target_modules="all-linear", **extra))
    peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **extra)).print_trainable_parameters()
    assert lora.trainable_report(ours) == capsys.readouterr().out.strip()


def test_two_peft_adapters_switch_like_peft(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("llama")
    ours = models.load_pretrained(path)
    for name, extra in (("first", {}), ("second", {"use_dora": True})):
        cfg = LoraConfig(r=2, alpha=4, target_modules=["v_proj", "up_proj"], adapter_name=name, **extra)
        lora.inject_lora(ours, cfg)
        randomize_adapter(ours, name, seed=len(name), std=0.1)
        lora.save_adapter(ours, tmp_path / name, cfg, base_model_name_or_path=str(path), adapter_name=name)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "first", adapter_name="first").eval()
    peft_model.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ("first", "second", "first"):
        lora.set_active_adapter(ours, name)
        peft_model.set_adapter(name)
        assert _compare(ours, peft_model, ours.config) <= 1e-4


def test_adapter_config_fields(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama")
    ours = models.load_pretrained(path)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.05, target_modules="all-linear", use_rslora=True)
    lora.inject_lora(ours, cfg)
    out = lora.save_adapter(ours, tmp_path / "a", cfg, base_model_name_or_path="org/base")
    d = json.loads((out / "adapter_config.json").read_text())
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM" and d["bias"] == "none"
    assert d["base_model_name_or_path"] == "org/base" and d["inference_mode"] is True and d["fan_in_fan_out"] is False
    assert d["target_modules"] == sorted(TARGETS["llama"])  # lm_head excluded, as PEFT's all-linear
    assert d["lora_dropout"] == 0.05 and d["use_rslora"] is True and d["use_dora"] is False


class OurMasks(nn.Module):
    """Put in place of PEFT's nn.Dropout: the masks lora.dropout draws, in the same order of layers."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop(x, *keep_mask(x.shape, self.p, x.device)) if self.training else x


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_step_matches_peft(hf_checkpoint, tmp_path, variant, dropout):
    """Train mode: the same logits and the same adapter gradients, which checks DoRA's detached weight norm
    and where dropout applies. Dropout's masks are ours, not nn.Dropout's (tests/test_dropout.py tests them
    as dropout), so with dropout on PEFT's dropout modules draw ours, from the same generator state."""
    path, hf = hf_checkpoint("llama")
    ours = models.load_pretrained(path)
    cfg = LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear", **VARIANTS[variant])
    lora.inject_lora(ours, cfg)
    randomize_adapter(ours, std=0.1)
    out = lora.save_adapter(ours, tmp_path / "ours", cfg, base_model_name_or_path=str(path))
    peft_model = peft.PeftModel.from_pretrained(hf, out, is_trainable=True)
    swapped = 0
    for module in peft_model.modules():
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict) and dropout:
            module.lora_dropout["default"] = OurMasks(dropout)
            swapped += 1
    ids, mask = left_padded_batch(ours.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        without_dropout = ours(ids, attention_mask=mask)
    ours.train()
    peft_model.train()
    torch.manual_seed(5)
    a = ours(ids, attention_mask=mask)
    torch.manual_seed(5)
    b = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs()[real].max() <= 1e-4
    assert torch.allclose(a, without_dropout) == (dropout == 0)  # dropout really was on, or off
    assert swapped == (len(TARGETS["llama"]) * ours.config.num_hidden_layers if dropout else 0)
    a[real].square().mean().backward()
    b[real].square().mean().backward()
    peft_params = dict(peft_model.named_parameters())
    grads = 0
    for key, p in lora.adapter_parameters(ours, "default").items():
        path_, _, leaf = key.rpartition(".lora_")
        name = f"base_model.model.{path_}.lora_{leaf.replace('.weight', '')}.default.weight"
        theirs = peft_params[name].grad
        assert theirs is not None and (p.grad - theirs).abs().max() <= 1e-4 * max(1.0, theirs.abs().max().item()), key
        grads += 1
    assert grads == len(peft_params) - sum(1 for n, p in peft_params.items() if not p.requires_grad)


def test_trainable_report_on_4bit_base_matches_peft_on_bitsandbytes(hf_checkpoint, capsys):
    """4-bit weights count as parameters: our NF4 base against PEFT on a bitsandbytes 4-bit model."""
    import transformers

    path, _ = hf_checkpoint("qwen2")  # q/k/v biases: counted once, as plain parameters
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu")
    except Exception as err:  # bitsandbytes without a 4-bit backend for this machine
        pytest.skip(f"bitsandbytes 4-bit load unavailable: {err}")
    peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).print_trainable_parameters()
    ours = models.load_pretrained(path, quantize="nf4")
    lora.inject_lora(ours, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    assert lora.trainable_report(ours) == capsys.readouterr().out.strip().splitlines()[-1]
