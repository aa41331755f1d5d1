"""Merging adapters into weights (every module kind, LoRA / rsLoRA / DoRA), unmerge, unload,
and the `python -m lora.merge` command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lora
import models
from lora import LoraConfig
from lora.merge import main as merge_main
from tests.conftest import left_padded_batch
from tests.test_lora import KINDS, VARIANTS, batch, randomize_adapter, tiny_decoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_merge_equivalence_per_module_kind(kind, variant):
    model = tiny_decoder()
    names = lora.inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=[kind], **VARIANTS[variant]))
    randomize_adapter(model)
    layers = [model.get_submodule(n) for n in names]
    w0 = [layer.base.weight.detach().clone() for layer in layers]
    ids, mask = batch()
    real = mask.bool()
    with torch.no_grad():
        y = model(ids, attention_mask=mask)
        lora.merge_lora(model)
        merged_w = [layer.base.weight.detach().clone() for layer in layers]
        y_merged = model(ids, attention_mask=mask)
        lora.merge_lora(model)  # twice adds once
        assert all(torch.equal(layer.base.weight, w) for layer, w in zip(layers, merged_w))
        assert torch.equal(model(ids, attention_mask=mask), y_merged)
        lora.unmerge_lora(model)
        lora.unmerge_lora(model)  # and unmerging twice subtracts once
        y_back = model(ids, attention_mask=mask)
    assert not torch.allclose(merged_w[0], w0[0])
    assert (y - y_merged).abs()[real].max() <= 1e-5
    assert max((layer.base.weight - w).abs().max() for layer, w in zip(layers, w0)) <= 1e-6
    assert (y - y_back).abs()[real].max() <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unload_gives_plain_model_with_same_output(variant):
    model = tiny_decoder()
    lora.inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", **VARIANTS[variant]))
    randomize_adapter(model)
    ids, mask = batch()
    with torch.no_grad():
        y = model(ids, attention_mask=mask)
        lora.unload(model)
        assert not list(lora.lora_layers(model))
        assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
        assert (model(ids, attention_mask=mask) - y).abs()[mask.bool()].max() <= 1e-5
    assert set(model.state_dict()) == set(tiny_decoder().state_dict())


def test_merge_in_bfloat16_rounds_once():
    model = tiny_decoder().to(torch.bfloat16)
    lora.inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["up_proj"]))
    randomize_adapter(model)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    expected = (layer.base.weight.float() + layer.delta_weight("default")).to(torch.bfloat16)
    lora.merge_lora(model)
    assert layer.base.weight.dtype == torch.bfloat16 and torch.equal(layer.base.weight, expected)


# ---------------------------------------------------------------------- command line


def _adapter(tmp_path, path, variant="lora", quantize=None, name="adapter"):
    """Our model from checkpoint `path` with a random non-zero adapter saved to tmp_path/name."""
    kwargs = {"quantize": quantize, "compute_dtype": torch.float32} if quantize else {}
    model = models.load_pretrained(path, **kwargs)
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", **VARIANTS[variant])
    lora.inject_lora(model, cfg)
    randomize_adapter(model, std=0.1)
    out = lora.save_adapter(model, tmp_path / name, cfg, base_model_name_or_path=str(path))
    return model, out


def _hf_logits(out_dir, ids, mask):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_cli_merged_model_loads_in_transformers_with_our_logits(hf_checkpoint, tmp_path, variant):
    path, _ = hf_checkpoint("qwen2")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    model, adapter = _adapter(tmp_path, path, variant)
    rc = merge_main(["--base", str(path), "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    assert rc == 0
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    ids, mask = left_padded_batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    diff = (_hf_logits(tmp_path / "merged", ids, mask) - ours).abs()[mask.bool()].max()
    assert diff <= 1e-4


def test_cli_as_a_process_with_dtype(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama")
    _, adapter = _adapter(tmp_path, path)
    # --base defaults to the adapter's base_model_name_or_path
    cmd = [sys.executable, "-m", "lora.merge", "--adapter", str(adapter), "--output", str(tmp_path / "m"), "--dtype", "bfloat16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "nowhere" in bad.stderr


def _bad_inputs(tmp_path, path, adapter):
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    out = str(tmp_path / "out")
    return {
        "missing adapter": (["--base", str(path), "--adapter", str(tmp_path / "none"), "--output", out], "no such adapter directory"),
        "prefix tuning": (["--base", str(path), "--adapter", str(prefix), "--output", out], "nothing to merge"),
        "broken config": (["--base", str(path), "--adapter", str(broken), "--output", out], "not valid JSON"),
        "missing base": (["--base", str(tmp_path / "nobase"), "--adapter", str(adapter), "--output", out], "nobase"),
        "base is not a model": (["--base", str(adapter), "--adapter", str(adapter), "--output", out], "config.json"),
        "bad dtype": (["--base", str(path), "--adapter", str(adapter), "--output", out, "--dtype", "int8"], "invalid choice"),
        "bad into": (["--base", str(path), "--adapter", str(adapter), "--output", out, "--into", "both"], "invalid choice"),
        "no output": (["--base", str(path), "--adapter", str(adapter)], "--output"),
        "output over base": (["--base", str(path), "--adapter", str(adapter), "--output", str(path)], "overwrite"),
    }


def test_cli_bad_inputs_exit_2_with_one_line(hf_checkpoint, tmp_path, capsys):
    path, _ = hf_checkpoint("llama")
    _, adapter = _adapter(tmp_path, path)
    capsys.readouterr()  # drop the fixture's progress bars
    for case, (argv, message) in _bad_inputs(tmp_path, path, adapter).items():
        assert merge_main(argv) == 2, case
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (case, err)
    assert not (tmp_path / "out").exists()


def test_cli_qlora_adapter_merges_into_dequantized_weights_by_default(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama")
    qmodel, adapter = _adapter(tmp_path, path, "dora", quantize="nf4")
    ids, mask = left_padded_batch(qmodel.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        trained = qmodel(ids, attention_mask=mask)
        full = models.load_pretrained(path)
        lora.load_adapter(full, adapter)
        original = full(ids, attention_mask=mask)
    assert merge_main(["--base", str(path), "--adapter", str(adapter), "--output", str(tmp_path / "q")]) == 0
    assert merge_main(["--base", str(path), "--adapter", str(adapter), "--output", str(tmp_path / "o"), "--into", "original"]) == 0
    into_quantized = _hf_logits(tmp_path / "q", ids, mask)
    into_original = _hf_logits(tmp_path / "o", ids, mask)
    assert (into_quantized - trained).abs()[real].max() <= 1e-4
    assert (into_original - original).abs()[real].max() <= 1e-4
    assert (into_quantized - into_original).abs()[real].max() > 1e-3  # the two choices really differ


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_into_nf4_layer(variant):
    import quant
    torch.manual_seed(0)
    nf4 = quant.NF4Linear.from_linear(nn.Linear(64, 48), compute_dtype=torch.float32)
    layer = lora.LoRALinear(nf4, r=4, alpha=8, **VARIANTS[variant])
    randomize_adapter(layer)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert type(layer.base) is nn.Linear and layer.base.weight.dtype == torch.float32
        assert (layer(x) - y).abs().max() <= 1e-5
        layer.unmerge()
        assert layer.base is nf4 and torch.equal(layer(x), y)


def test_cli_requantizes_from_the_dtype_training_loaded_the_base_in(hf_checkpoint, tmp_path):
    """QLoRA as train/ runs it: a float32 checkpoint loaded in bf16 and quantized from bf16. The merge
    must add the delta to exactly those 4-bit weights (quantizing from float32 gives other codes)."""
    path, _ = hf_checkpoint("llama")
    qmodel = models.load_pretrained(path, dtype=torch.bfloat16, quantize="nf4", compute_dtype=torch.bfloat16)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["down_proj"])
    lora.inject_lora(qmodel, cfg)
    randomize_adapter(qmodel, std=0.1)
    adapter = lora.save_adapter(qmodel, tmp_path / "a", cfg, base_model_name_or_path=str(path))
    assert json.loads((adapter / "lora_training.json").read_text())["base_dtype"] == "bfloat16"
    assert merge_main(["--base", str(path), "--adapter", str(adapter), "--output", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    merged = models.load_pretrained(tmp_path / "m")
    for name, layer in lora.lora_layers(qmodel):
        expected = layer.base.dequantize(torch.float32) + layer.delta_weight("default")
        assert torch.equal(merged.get_submodule(name).weight, expected), name
