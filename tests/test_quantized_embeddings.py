"""QLoRA with --quantize-embeddings: the embedding and output head in NF4, end to end.

The reference for every check is the same model with its embedding / head weights replaced by their
NF4 round trip (dequantize(quantize(W))) held densely: the 4-bit path must compute exactly that.
"""
import json

import pytest
import torch

import lora
import models
from lora.inject import LoraConfig
from models.checkpoint import export_state_dict
from quant import dequantize_nf4, quantize_nf4
from quant.embedding import NF4Embedding, QuantizedHead
from tests.conftest import left_padded_batch, make_run_model, make_task_data
from tests.test_lora import randomize_adapter
from train import run as run_mod
from train.loop import accumulate_gradients
from train.memory import Settings, alternatives, estimate_peak_bytes

F32 = dict(dtype=torch.float32, quantize="nf4", compute_dtype=torch.float32)


def _round_trip(w: torch.Tensor) -> torch.Tensor:
    return dequantize_nf4(quantize_nf4(w), torch.float32)


def _models(path):
    """(4-bit embedding model, dense reference holding the NF4 round trip of the embedding / head)."""
    q = models.load_pretrained(path, quantize_embeddings=True, **F32)
    ref = models.load_pretrained(path, **F32)
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(_round_trip(ref.model.embed_tokens.weight))
        if not ref.config.tie_word_embeddings:
            ref.lm_head.weight.copy_(_round_trip(ref.lm_head.weight))
    return q, ref


@pytest.mark.parametrize("variant", ["llama", "llama_tied"])
def test_loader_holds_embedding_and_head_in_nf4(hf_checkpoint, variant):
    path, _ = hf_checkpoint(variant)
    q, ref = _models(path)
    assert isinstance(q.model.embed_tokens, NF4Embedding) and isinstance(q.lm_head, QuantizedHead)
    assert (q.lm_head.table is q.model.embed_tokens) == (variant == "llama_tied")
    assert not any(p.numel() >= q.config.vocab_size * q.config.hidden_size for p in q.parameters())
    ids, mask = left_padded_batch(q.config.vocab_size)
    with torch.no_grad():
        diff = (q(ids, attention_mask=mask) - ref(ids, attention_mask=mask)).abs()[mask.bool()].max()
    assert diff <= 1e-5
    ours, theirs = export_state_dict(q), export_state_dict(ref)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("variant", ["llama", "llama_tied"])
def test_adapter_gradients_through_the_4bit_head_equal_the_dense_reference(hf_checkpoint, variant, monkeypatch):
    """The loss reads the head slice by slice (online logsumexp, then softmax - onehot per slice)."""
    monkeypatch.setattr(QuantizedHead, "VOCAB_CHUNK", 48)  # several slices, the last one short
    path, _ = hf_checkpoint(variant)
    grads = []
    for model in _models(path):
        lora.inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
        randomize_adapter(model, std=0.1)
        model.train()
        ids, _ = left_padded_batch(model.config.vocab_size, pads=(0, 0, 0))
        labels = ids.clone()
        labels[0, :5] = -100
        loss, tokens = accumulate_gradients(model, [{"input_ids": ids, "labels": labels}], torch.device("cpu"), None)
        grads.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_q, g_q), (loss_ref, g_ref) = grads
    assert abs(loss_q - loss_ref) <= 1e-6 * abs(loss_ref) and g_q.keys() == g_ref.keys() and len(g_q) > 0
    for name in g_q:
        torch.testing.assert_close(g_q[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_run_with_quantized_embeddings_trains_merges_and_reloads(run_model, tmp_path):
    data = make_task_data(tmp_path / "task.jsonl", 120)
    out = tmp_path / "out"
    argv = ["--model", str(run_model), "--data", str(data), "--val-fraction", "0.2", "--output-dir", str(out),
            "--seq-len", "32", "--batch-size", "8", "--seed", "3", "--dtype", "float32", "--method", "qlora",
            "--quantize-embeddings", "--lr", "1e-2", "--max-steps", "12", "--eval-every", "6"]
    assert run_mod.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] < summary["first_val_loss"] - 0.3
    record = json.loads((out / "adapter" / "lora_training.json").read_text())
    assert record["base_quantization"] == "nf4" and record["quantized_embeddings"] is True

    from adapters import load_adapted
    from lora.merge import main as merge_main

    assert merge_main(["--base", str(run_model), "--adapter", str(out / "adapter"), "--output", str(tmp_path / "m")]) == 0
    merged = models.load_pretrained(tmp_path / "m", dtype=torch.float32)
    base = models.load_pretrained(run_model, dtype=torch.float32)
    assert torch.equal(merged.model.embed_tokens.weight, _round_trip(base.model.embed_tokens.weight))
    served = load_adapted(str(run_model), str(out / "adapter"), None, None).model
    assert isinstance(served.model.embed_tokens, NF4Embedding)


def test_quantize_embeddings_needs_qlora(run_model, tmp_path, capsys):
    data = make_task_data(tmp_path / "task.jsonl", 20)
    argv = ["--model", str(run_model), "--data", str(data), "--output-dir", str(tmp_path / "o"), "--method", "lora",
            "--quantize-embeddings"]
    assert run_mod.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize-embeddings" in err[0] and "qlora" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_width_that_is_not_whole_nf4_blocks_is_one_line_and_exit_2(tmp_path, capsys):
    model = make_run_model(tmp_path / "m", hidden_size=96, head_dim=24)  # rows of 96 = 1.5 blocks of 64
    data = make_task_data(tmp_path / "task.jsonl", 20)
    capsys.readouterr()  # drop transformers' progress bar from saving the model
    argv = ["--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "o"), "--method", "qlora",
            "--quantize-embeddings", "--seq-len", "32", "--max-steps", "1", "--dtype", "float32"]
    assert run_mod.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.embed_tokens" in err[0] and "multiple of 64" in err[0]
    assert not (tmp_path / "o").exists()


def test_memory_estimate_counts_the_embedding_in_4_bits():
    cfg = models.ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    plain = estimate_peak_bytes(cfg, Settings("qlora", 1, 256, compute_bytes=2))
    quantized = estimate_peak_bytes(cfg, Settings("qlora", 1, 256, compute_bytes=2, quantize_embeddings=True))
    embed = 151936 * 896
    assert plain.weights - quantized.weights == pytest.approx(embed * (2 - 4.127 / 8), rel=1e-3)
    # a QLoRA run that does not fit is told about the flag when it would make the run fit
    budget = (plain.peak + quantized.peak) // 2
    fixes = alternatives(cfg, Settings("qlora", 1, 256, compute_bytes=2), 1, budget)
    assert [f.split(" (")[0] for f in fixes] == ["--grad-checkpointing", "--quantize-embeddings"]
