"""Prompt and prefix tuning: PEFT equivalence both ways, generation with the cache, short training runs."""
import json

import pytest
import torch

import models
from adapters import load_adapted
from models.generate import SamplingConfig, generate
from prompt import PrefixEncoder, PromptEmbedding, attach, load_virtual_tokens, save_virtual_tokens
from tests.conftest import left_padded_batch, make_task_data
from train.run import main

N = 4


def _ours_with(path, method, mlp=0):
    model = models.load_pretrained(path)
    torch.manual_seed(5)
    module = PrefixEncoder(N, model.config, mlp) if method == "prefix" else PromptEmbedding(N, model.config.hidden_size)
    if mlp:  # a random output bias keeps the folded prefix far from zero
        torch.nn.init.normal_(module.transform[-1].bias)
    attach(model, module)
    return model.eval()


def _peft_logits(peft, method, ids, mask):
    """PEFT's logits for the real tokens, with the position convention each method has in PEFT.

    prefix: given position_ids (counted over real tokens) are shifted by N inside PEFT.
    prompt: PEFT ignores position_ids; transformers numbers the whole row 0..N+T-1, padding included.
    """
    with torch.no_grad():
        if method == "prefix":
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            return peft(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return peft(input_ids=ids, attention_mask=mask).logits[:, N:]


def _ours_logits(model, method, ids, mask):
    """Ours with PEFT's positions: for prompt tuning, real tokens at N + column index (padding counted)."""
    with torch.no_grad():
        if method == "prefix":
            return model(ids, attention_mask=mask)
        return model(ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1]).expand_as(ids))


def _assert_close(ours, ref, mask):
    assert ours.shape == ref.shape
    diff = (ours - ref).abs()[mask.bool()].max().item()
    assert diff <= 1e-4, f"max abs logit difference {diff}"


@pytest.mark.parametrize("method,variant,mlp", [
    ("prefix", "llama", 0), ("prefix", "qwen3", 0), ("prefix", "mistral", 0), ("prefix", "llama", 16),
    ("prompt", "llama", 0), ("prompt", "qwen3", 0), ("prompt", "mistral", 0),
])  # llama: grouped-query attention; qwen3: head_dim != hidden/heads and k-norm; mistral: sliding window
def test_ours_saved_loads_in_peft_with_same_logits(hf_checkpoint, tmp_path, method, variant, mlp):
    from peft import PeftModel

    path, hf = hf_checkpoint(variant)
    ours = _ours_with(path, method, mlp)
    adapter = save_virtual_tokens(ours, tmp_path / "adapter", path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == f"{method.upper()}_TUNING" and config["num_virtual_tokens"] == N
    peft = PeftModel.from_pretrained(hf, adapter).eval()
    ids, mask = left_padded_batch(ours.config.vocab_size)
    ref = _peft_logits(peft, method, ids, mask)
    _assert_close(_ours_logits(ours, method, ids, mask), ref, mask)
    with torch.no_grad():  # the unpadded row: our default positions are PEFT's
        _assert_close(ours(ids[:1]), ref[:1], mask[:1])


@pytest.mark.parametrize("method,mlp", [("prefix", False), ("prefix", True), ("prompt", False)])
def test_peft_saved_loads_in_ours_with_same_logits(hf_checkpoint, tmp_path, method, mlp):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    path, hf = hf_checkpoint("llama")
    torch.manual_seed(7)
    if method == "prefix":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=mlp,
                                    encoder_hidden_size=24)
    else:
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    peft = get_peft_model(hf, config).eval()
    peft.save_pretrained(tmp_path / "adapter")
    ours = models.load_pretrained(path)
    load_virtual_tokens(ours, tmp_path / "adapter")
    ids, mask = left_padded_batch(ours.config.vocab_size)
    _assert_close(_ours_logits(ours.eval(), method, ids, mask), _peft_logits(peft, method, ids, mask), mask)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generation_cache_and_batching_agree(hf_checkpoint, method):
    path, _ = hf_checkpoint("qwen2")
    model = _ours_with(path, method)
    prompts = [[1, 5, 7, 9, 11, 13, 17, 19], [1, 20, 30], [1, 40, 41, 42, 43]]
    cfg = SamplingConfig(max_new_tokens=10)
    batched = generate(model, prompts, cfg)
    assert generate(model, prompts, cfg, use_cache=False) == batched
    assert [generate(model, [p], cfg)[0] for p in prompts] == batched
    with torch.no_grad():  # the virtual tokens change what the model computes
        plain = models.load_pretrained(path)(torch.tensor([prompts[0]]))
        assert (model(torch.tensor([prompts[0]])) - plain).abs().max() > 1e-3


def test_prompt_init_text_repeats_its_tokens():
    emb = torch.nn.Embedding(10, 6)
    module = PromptEmbedding(5, 6)
    module.init_from_tokens(emb, [3, 7])
    assert torch.equal(module.embedding, emb.weight[[3, 7, 3, 7, 3]].detach())


@pytest.mark.parametrize("variant", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_text_init_starts_as_the_base_reading_the_text_first(hf_checkpoint, variant, method):
    """Both inits from text: the adapted model's logits for the input equal the base's on text + input."""
    path, _ = hf_checkpoint(variant)
    base = models.load_pretrained(path)
    text = [7, 11, 13]  # four virtual tokens: 7 11 13 7
    model = models.load_pretrained(path)
    module = PrefixEncoder(N, model.config) if method == "prefix" else PromptEmbedding(N, model.config.hidden_size)
    if method == "prefix":
        module.init_from_text(model, text)
    else:
        module.init_from_tokens(model.model.embed_tokens, text)
    attach(model, module)
    ids = torch.tensor([[1, 5, 9, 21, 30, 2]])
    with torch.no_grad():
        adapted = model.eval()(ids)
        reading = base(torch.cat([torch.tensor([[7, 11, 13, 7]]), ids], dim=1))[:, N:]
    assert (adapted - reading).abs().max() <= 1e-5


def test_prefix_text_init_needs_no_projection(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    model = models.load_pretrained(path)
    with pytest.raises(ValueError, match="projection"):
        PrefixEncoder(N, model.config, 8).init_from_text(model, [3])
    with pytest.raises(ValueError, match="no tokens"):
        PrefixEncoder(N, model.config).init_from_text(model, [])


def test_prefix_gradients_reach_the_prefix_with_checkpointing(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    model = _ours_with(path, "prefix").train()
    model.gradient_checkpointing = True
    model(torch.tensor([[1, 5, 7, 9]])).sum().backward()
    grad = model.virtual_tokens.embedding.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("virtual_tokens"))


def _args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--val-fraction", "0.2", "--output-dir", str(out),
            "--seq-len", "32", "--batch-size", "8", "--seed", "3", "--dtype", "float32", "--num-virtual-tokens", "4",
            *extra]


@pytest.mark.parametrize("method,extra", [("prefix", ["--prefix-projection", "16"]),
                                          ("prompt", ["--prompt-init-text", "the colour is"])])
def test_short_run_lowers_val_loss_and_saves_a_loadable_adapter(run_model, tmp_path, capsys, method, extra):
    data = make_task_data(tmp_path / "task.jsonl", 120)
    out = tmp_path / "out"
    assert main(_args(run_model, data, out, "--method", method, "--max-steps", "12", "--eval-every", "6", *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    # A random tiny base leaves virtual tokens little to steer: 0.2 nats is a clear, stable drop here.
    assert summary["best_val_loss"] < summary["first_val_loss"] - 0.2
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == f"{method.upper()}_TUNING" and config["num_virtual_tokens"] == 4
    model = load_adapted(str(run_model), str(out / "adapter"), None, "cpu").model
    assert model.virtual_tokens.num_virtual_tokens == 4
    from serve.generate import main as generate_main

    capsys.readouterr()
    assert generate_main(["--model", str(run_model), "--adapter", str(out / "adapter"), "--prompt", "the cat is",
                          "--max-new-tokens", "3", "--device", "cpu"]) == 0


def test_merge_refuses_a_virtual_token_adapter(hf_checkpoint, tmp_path, capsys):
    from lora.merge import main as merge_main

    path, _ = hf_checkpoint("llama")
    adapter = save_virtual_tokens(_ours_with(path, "prompt"), tmp_path / "adapter", path)
    assert merge_main(["--base", str(path), "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 2
    assert "nothing to merge" in capsys.readouterr().err


def test_packing_is_refused_before_the_output_dir_is_touched(run_model, tmp_path, capsys):
    data = make_task_data(tmp_path / "task.jsonl", 40)
    assert main(_args(run_model, data, tmp_path / "out", "--method", "prefix", "--pack", "--max-steps", "2")) == 2
    assert "does not work with --pack" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
