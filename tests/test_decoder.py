"""Our decoder against transformers on the same checkpoints: logits and greedy generation."""
import pytest
import torch

import models
from models.generate import SamplingConfig, generate
from tests.conftest import VARIANTS, left_padded_batch


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(hf_checkpoint, variant):
    path, hf = hf_checkpoint(variant)
    ours = models.load_pretrained(path)
    ids, mask = left_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask)
    assert out.shape == ref.shape == (3, 14, ours.config.vocab_size)
    diff = (out - ref).abs()[mask.bool()].max().item()
    assert diff <= 1e-4, f"{variant}: max abs logit difference {diff}"


def test_both_rope_spellings_read_the_same(hf_checkpoint):
    new, _ = hf_checkpoint("llama3_rope_new")
    old, _ = hf_checkpoint("llama3_rope_old")
    a, b = models.ModelConfig.from_file(new / "config.json"), models.ModelConfig.from_file(old / "config.json")
    assert a.rope_type == b.rope_type == "llama3"
    assert a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta
    assert "rope_parameters" not in (old / "config.json").read_text()


def test_left_padded_row_equals_row_alone(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    model = models.load_pretrained(path)
    ids, mask = left_padded_batch(model.config.vocab_size)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        alone = model(ids[2:, 9:])
    assert (batch[2, 9:] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_generation_cache_batch_and_transformers_agree(hf_checkpoint, variant):
    path, hf = hf_checkpoint(variant)
    model = models.load_pretrained(path)
    prompts = [[1, 5, 7, 9, 11, 13, 17, 19], [1, 20, 30], [1, 40, 41, 42, 43]]
    cfg = SamplingConfig(max_new_tokens=12)
    batched = generate(model, prompts, cfg)
    no_cache = generate(model, prompts, cfg, use_cache=False)
    one_by_one = [generate(model, [p], cfg)[0] for p in prompts]
    reference = [
        hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        for p in prompts
    ]
    assert batched == no_cache == one_by_one == reference


def test_generation_stops_at_eos(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    model = models.load_pretrained(path)
    free = generate(model, [[1, 5, 7]], SamplingConfig(max_new_tokens=6))[0]
    stop_token = free[2]
    stopped = generate(model, [[1, 5, 7], [1, 9]], SamplingConfig(max_new_tokens=6, stop_ids=(stop_token,)))
    assert stopped[0] == free[: free.index(stop_token) + 1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    model = models.load_pretrained(path)
    p = [[1, 5, 7, 9]]
    a = generate(model, p, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3))
    b = generate(model, p, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3))
    assert a == b
    greedy = generate(model, p, SamplingConfig(max_new_tokens=8))
    assert generate(model, p, SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5)) == greedy


def test_gradient_checkpointing_gives_same_gradients(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3")
    ids, mask = left_padded_batch(96)
    grads = []
    for ckpt in (False, True):
        model = models.load_pretrained(path).train()
        model.gradient_checkpointing = ckpt
        model(ids, attention_mask=mask).float().square().mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_packed_documents_do_not_see_each_other(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    model = models.load_pretrained(path)
    a, b = torch.tensor([[1, 5, 9, 13, 17]]), torch.tensor([[1, 33, 44]])
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 3])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    with torch.no_grad():
        out = model(packed, position_ids=positions, doc_ids=doc_ids)
        assert (out[:, :5] - model(a)).abs().max() <= 1e-5
        assert (out[:, 5:] - model(b)).abs().max() <= 1e-5
