"""Chunked causal-LM loss equals the plain one, value and gradients."""
import torch
import torch.nn.functional as F

from train.data import count_target_tokens
from train.loss import CHUNK_BYTES, MAX_CHUNK_ROWS, causal_lm_loss_sum, chunk_rows


def test_chunked_loss_and_grads_equal_full_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (3, 9))
    labels[0, :4] = -100
    labels[2, 6:] = -100
    total, n = causal_lm_loss_sum(hidden, weight, labels, chunk=5)
    assert n == count_target_tokens(labels) == int((labels[:, 1:] != -100).sum())
    (total / n).backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    assert torch.allclose(total / n, ref, atol=1e-6)
    assert torch.allclose(g_h, hidden.grad, atol=1e-6) and torch.allclose(g_w, weight.grad, atol=1e-6)


def test_loss_chunks_are_sized_in_bytes_for_large_vocabularies():
    assert chunk_rows(8192) == MAX_CHUNK_ROWS  # small vocabularies keep the largest chunk
    for vocab in (49_152, 128_256, 151_936):  # SmolLM2, Llama 3, Qwen2.5
        rows = chunk_rows(vocab)
        assert 64 <= rows < MAX_CHUNK_ROWS and rows * vocab * 4 <= CHUNK_BYTES < (rows + 1) * vocab * 4
    assert chunk_rows(10**7) == 64  # a floor, so a huge head still goes in usable matmuls
