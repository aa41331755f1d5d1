"""LoRALinear and injection: exact identity at init, freezing, training touches only adapters,
target selection, multiple adapters, adapter files and their errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora
from lora import LoraConfig, LoRALinear
from models import CheckpointError, Decoder, ModelConfig
from quant import NF4Weights
from tests.conftest import left_padded_batch

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def tiny_decoder(seed: int = 0, **overrides) -> Decoder:
    """A random-weight Decoder built directly (no files), with biases on q/k/v like qwen2."""
    fields = dict(
        model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, qkv_bias=True,
    )
    torch.manual_seed(seed)
    model = Decoder(ModelConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():  # non-trivial norms so every weight shows up in the output
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def train_steps(model: nn.Module, params, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
    """A few AdamW steps of next-token loss on `params` (model in train mode)."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(ids, attention_mask=mask)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def batch(vocab: int = 61, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch: ids [3,10], mask [3,10] with 1 on real tokens."""
    return left_padded_batch(vocab, seed, length=10, pads=(0, 3, 6))


@torch.no_grad()
def randomize_adapter(model: nn.Module, adapter_name: str = "default", seed: int = 0, std: float = 0.2) -> None:
    """Non-zero A and B (and a perturbed DoRA magnitude) so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for key, p in sorted(lora.adapter_parameters(model, adapter_name).items()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if key.endswith("lora_magnitude_vector"):
            p.mul_(1 + 0.1 * noise)
        else:
            p.copy_(noise * std)


def test_fresh_adapter_equals_base_exactly():
    model = tiny_decoder()
    ids, mask = batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        for i, extra in enumerate(VARIANTS.values()):
            lora.inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", adapter_name=f"a{i}", **extra))
            assert torch.equal(model(ids, attention_mask=mask), ref)


def test_dropout_applies_to_the_adapter_branch_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.9).train()
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: the dropped adapter adds nothing, the base is untouched
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.eval()
    expected = base(x) + layer.lora_B["default"](layer.lora_A["default"](x))
    assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("use_rslora,scale", [(False, 32 / 16), (True, 32 / 4)])
def test_scaling(use_rslora, scale):
    layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=32, use_rslora=use_rslora)
    assert layer.scaling["default"] == scale


def test_init_matches_peft_kaiming_uniform():
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(40, 8), r=4, alpha=8)
    a = layer.lora_A["default"].weight
    bound = 1 / 40**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 40
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_dora_magnitude_starts_at_row_norms():
    base = nn.Linear(12, 6)
    layer = LoRALinear(base, r=2, alpha=4, use_dora=True)
    assert torch.allclose(layer.lora_magnitude_vector["default"], base.weight.norm(dim=1))


def test_only_adapter_parameters_require_grad_and_report():
    model = tiny_decoder()
    total = sum(p.numel() for p in model.parameters())
    names = lora.inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}
    expected = 2 * (4 * (32 + 32) + 4 * (48 + 32))
    report = lora.trainable_report(model)
    assert report == f"trainable params: {expected:,d} || all params: {total + expected:,d} || trainable%: {100 * expected / (total + expected):.4f}"


def test_optimizer_steps_change_only_adapter_parameters():
    model = tiny_decoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora.inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear", use_dora=True))
    adapter = lora.adapter_parameters(model, "default")
    start = {k: p.detach().clone() for k, p in adapter.items()}
    ids, mask = batch()
    train_steps(model, adapter.values(), ids, mask, steps=3)
    after = model.state_dict()
    for key, value in before.items():  # every base tensor bit-identical
        wrapped = key.replace("_proj.", "_proj.base.") if "_proj." in key else key
        assert torch.equal(after[wrapped], value), key
    assert all(not torch.equal(p, start[k]) for k, p in adapter.items())  # every adapter tensor trained


def test_target_selection_forms():
    model = tiny_decoder()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert lora.find_targets(model, "all-linear") == [n for n in linears if n != "lm_head"]
    assert lora.find_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert lora.find_targets(model, r"model\.layers\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert lora.find_targets(model, ["lm_head"]) == ["lm_head"]  # asked for by name: allowed


def test_no_match_names_targets_and_lists_modules():
    model = tiny_decoder()
    with pytest.raises(ValueError, match=r"\['qkv'\].*q_proj.*up_proj"):
        lora.inject_lora(model, LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="non-linear"):
        lora.inject_lora(model, LoraConfig(target_modules=["mlp"]))
    assert not list(lora.lora_layers(model))


@pytest.mark.parametrize(
    "kwargs", [{"r": 0}, {"r": 2.5}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}, {"target_modules": "("}, {"adapter_name": "a.b"}]
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        LoraConfig(**kwargs)


def test_disable_adapters_context():
    model = tiny_decoder()
    ids, _ = batch()
    with torch.no_grad():
        ref = model(ids)
        lora.inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        randomize_adapter(model)
        adapted = model(ids)
        with lora.disable_adapters(model):
            assert torch.equal(model(ids), ref)
        assert torch.equal(model(ids), adapted)
        lora.merge_lora(model)
        with pytest.raises(RuntimeError, match="unmerge"):
            with lora.disable_adapters(model):
                pass


def test_two_adapters_switch_and_each_equals_its_single_adapter_model():
    base = tiny_decoder()
    ids, mask = batch()
    configs = {
        "a": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter_name="a"),
        "b": LoraConfig(r=2, alpha=3, target_modules="all-linear", use_dora=True, adapter_name="b"),
    }
    singles, both = {}, copy.deepcopy(base)
    for name, cfg in configs.items():
        single = copy.deepcopy(base)
        lora.inject_lora(single, cfg)
        randomize_adapter(single, name, seed=len(name) + ord(name))
        singles[name] = single
        lora.inject_lora(both, cfg)
        lora_state = lora.lora_state_dict(single, name)
        with torch.no_grad():
            for key, p in lora.adapter_parameters(both, name).items():
                p.copy_(lora_state[key])
    with torch.no_grad():
        outs = {name: m(ids, attention_mask=mask) for name, m in singles.items()}
        assert not torch.allclose(outs["a"], outs["b"])
        for name in ["a", "b", "a"]:
            lora.set_active_adapter(both, name)
            assert torch.equal(both(ids, attention_mask=mask), outs[name])
            trainable = {n for n, p in both.named_parameters() if p.requires_grad}
            assert trainable and all(name in n.split(".") for n in trainable)
    with pytest.raises(ValueError, match="no LoRA adapter named 'c'"):
        lora.set_active_adapter(both, "c")
    # Switching while merged would silently keep the old delta in the weights: refused.
    lora.set_active_adapter(both, "a")
    lora.merge_lora(both)
    with pytest.raises(RuntimeError, match="unmerge"):
        lora.set_active_adapter(both, "b")


def test_lora_state_dict_keys_are_peft_keys_without_prefix():
    model = tiny_decoder()
    lora.inject_lora(model, LoraConfig(r=2, alpha=2, target_modules=["o_proj"], use_dora=True))
    keys = sorted(lora.lora_state_dict(model, "default"))
    assert keys == sorted(
        f"model.layers.{i}.self_attn.o_proj.{k}" for i in range(2) for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    )


# ---------------------------------------------------------------------- adapter files


def saved_adapter(tmp_path, use_dora=False):
    model = tiny_decoder()
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], use_dora=use_dora)
    lora.inject_lora(model, cfg)
    randomize_adapter(model)
    out = lora.save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path="tiny")
    return model, out


def test_save_and_load_round_trip(tmp_path):
    model, out = saved_adapter(tmp_path, use_dora=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"]
    assert json.loads((out / "lora_training.json").read_text())["base_quantization"] is None
    fresh = tiny_decoder()
    loaded = lora.load_adapter(fresh, out)
    assert loaded.target_modules == ["q_proj", "up_proj"]
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask), model(ids, attention_mask=mask))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


def _corrupt(out, edit):
    tensors = load_file(out / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, out / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"), r"missing tensor 'base_model\.model\.model\.layers\.1\.mlp\.up_proj\.lora_B\.weight'"),
        (lambda t: t.update({"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": torch.zeros(4, 32)}), "unexpected tensor 'base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight'"),
        (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 32)}), r"q_proj\.lora_A\.weight' has shape \[3, 32\]"),
    ],
)
def test_bad_adapter_tensors_name_file_and_tensor(tmp_path, edit, message):
    _, out = saved_adapter(tmp_path)
    _corrupt(out, edit)
    model = tiny_decoder()
    with pytest.raises(CheckpointError, match=message) as err:
        lora.load_adapter(model, out)
    assert "adapter_model.safetensors" in str(err.value)
    assert not list(lora.lora_layers(model))  # left as it was


@pytest.mark.parametrize(
    "change,message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": "4"}, "r must be int"),
        ({"r": True}, "r must be int"),
        ({"lora_alpha": None}, "lora_alpha must be"),
        ({"target_modules": 3}, "target_modules must be"),
        ({"target_modules": ["nothing_like_this"]}, "matches no linear layer"),
        ({"peft_type": "PREFIX_TUNING"}, "nothing to merge"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True is not supported"),
        ({"use_dora": "yes"}, "use_dora must be bool"),
    ],
)
def test_bad_adapter_config(tmp_path, change, message):
    _, out = saved_adapter(tmp_path)
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    model = tiny_decoder()
    with pytest.raises(CheckpointError, match=message) as err:
        lora.load_adapter(model, out)
    assert "adapter_config.json" in str(err.value)
    assert not list(lora.lora_layers(model))


def test_pickled_or_corrupt_adapter_is_refused(tmp_path):
    _, out = saved_adapter(tmp_path)
    data = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        lora.load_adapter(tiny_decoder(), out)
    (out / "adapter_model.safetensors").rename(out / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        lora.load_adapter(tiny_decoder(), out)


# ---------------------------------------------------------------------- 4-bit base (QLoRA)


class DequantizingLinear(NF4Weights):
    """Stand-in for a 4-bit layer: a frozen 4-bit weight type whose weight is only reachable through
    dequantize(), as NF4Linear's, but with a rounding simple enough to see."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.weight.numel(), torch.float32, None)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", linear.weight.detach().round(decimals=1))
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = torch.float32

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantize(self, dtype=None):
        return self.packed.to(dtype or self.compute_dtype)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(), self.bias)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_into_a_quantized_base_swaps_in_a_dense_layer_and_back(variant):
    torch.manual_seed(0)
    quantized = DequantizingLinear(nn.Linear(16, 12))
    layer = LoRALinear(quantized, r=4, alpha=8, **VARIANTS[variant])
    randomize_adapter(layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert isinstance(layer.base, nn.Linear) and "_quantized_base" not in dict(layer.named_modules())
        assert "base.weight" in layer.state_dict() and "base.packed" not in layer.state_dict()
        assert (layer(x) - y).abs().max() <= 1e-5
        layer.unmerge()
        assert layer.base is quantized
        assert torch.equal(layer(x), y)


def test_qlora_fresh_equals_base_and_training_touches_only_adapters(hf_checkpoint, tmp_path):
    import models
    import quant

    path, _ = hf_checkpoint("llama")
    model = models.load_pretrained(path, quantize="nf4", compute_dtype=torch.float32)
    assert any(isinstance(m, quant.NF4Linear) for m in model.modules())
    ids, mask = batch(96)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total_before = lora.count_parameters(model)[1]
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear", use_dora=True)
    lora.inject_lora(model, cfg)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask), ref)
    trainable, total = lora.count_parameters(model)
    n_adapter = sum(p.numel() for p in lora.adapter_parameters(model, "default").values())
    assert trainable == n_adapter and total == total_before + n_adapter
    # 4-bit weights count as parameters, as PEFT counts bitsandbytes' packed weights.
    assert total_before == sum(p.numel() for p in models.load_pretrained(path).parameters())
    train_steps(model, lora.adapter_parameters(model, "default").values(), ids, mask, steps=2)
    after = model.state_dict()
    for key, value in before.items():
        wrapped = key.replace("_proj.", "_proj.base.") if "_proj." in key else key
        assert torch.equal(after[wrapped], value), key
    out = lora.save_adapter(model, tmp_path / "qlora", cfg, base_model_name_or_path=str(path))
    record = json.loads((out / "lora_training.json").read_text())
    assert record == {"base_quantization": "nf4", "base_dtype": "float32", "compute_dtype": "float32"}


def test_training_through_a_merged_layer_is_refused():
    layer = LoRALinear(nn.Linear(8, 4), r=2, alpha=2)
    randomize_adapter(layer)
    layer.merge()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.train()(x)
    with torch.no_grad():
        layer(x)
    layer.eval()(x)
