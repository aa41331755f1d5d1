"""Chunked causal-LM loss equals the plain one, value and gradients."""
import pytest
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


@pytest.mark.parametrize("head_trains", [True, False])
@pytest.mark.parametrize("all_targets", [True, False])
def test_loss_gradient_follows_any_scaling_of_the_sum(head_trains, all_targets):
    """The head's gradient is computed in forward; backward must still scale it by what the caller
    multiplies the sum with (the loop's weight / token count), for a trained or frozen head."""
    torch.manual_seed(1)
    hidden = torch.randn(2, 7, 12, requires_grad=True)
    weight = torch.randn(30, 12, requires_grad=head_trains)
    labels = torch.randint(0, 30, (2, 7))
    if not all_targets:
        labels[1, 2:5] = -100
    total, n = causal_lm_loss_sum(hidden, weight, labels, chunk=4)
    (total * 3.0 / n).backward()
    grads = [hidden.grad.clone()] + ([weight.grad.clone()] if head_trains else [])
    hidden.grad = None
    if head_trains:
        weight.grad = None
    ref = F.cross_entropy((hidden @ weight.T)[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), reduction="sum")
    (ref * 3.0 / n).backward()
    assert torch.allclose(total, ref, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6)
    if head_trains:
        assert torch.allclose(grads[1], weight.grad, atol=1e-6)


def test_loss_under_bf16_autocast_matches_autocast_reference():
    """Under autocast the head matmuls run in bfloat16, as autocast would run F.linear."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, n = causal_lm_loss_sum(hidden, weight, labels, chunk=6)
    total.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(hidden, weight).float()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    assert torch.allclose(total, ref, rtol=1e-5)
    # both round the softmax gradient to bf16 before the matmul: d/dhidden is row by row, hence equal;
    # d/dhead sums over rows, which ours accumulates per chunk in float32, autocast in one bf16 matmul
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-6, atol=1e-6)
    assert (got[1] - weight.grad).abs().max() <= 1e-2 * weight.grad.abs().max()


class DenseRows:
    """A frozen head that hands out rows, as quant.embedding.QuantizedHead does for its 4-bit weight."""

    def __init__(self, weight: torch.Tensor, vocab_chunk: int):
        self.weight, self.out_features, self.VOCAB_CHUNK = weight, weight.shape[0], vocab_chunk
        self.calls = []

    def rows(self, start, stop, dtype=None, scratch=False):
        self.calls.append((start, stop))
        return self.weight[start:stop].to(dtype or self.weight.dtype)


@pytest.mark.parametrize("vocab_chunk", [7, 40, 64])  # slices with a short last one, one slice, one larger than V
@pytest.mark.parametrize("all_targets", [True, False])
def test_loss_over_head_rows_equals_cross_entropy(vocab_chunk, all_targets):
    """Online logsumexp over vocabulary slices + a second pass for softmax - onehot: same loss and
    d/dhidden as plain cross-entropy on the dense head, and the head is only ever read by slices."""
    torch.manual_seed(3)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16) * 3  # large logits, so the running max matters
    labels = torch.randint(0, 40, (3, 9))
    labels[:, 2] = 39  # the last row of the head is a target
    if not all_targets:
        labels[0, :4] = -100
    head = DenseRows(weight, vocab_chunk)
    total, n = causal_lm_loss_sum(hidden, head, labels, chunk=5)
    (total * 2.0 / n).backward()
    assert all(hi - lo <= vocab_chunk for lo, hi in head.calls) and max(hi for _, hi in head.calls) == 40
    got = hidden.grad.clone()
    hidden.grad = None
    ref = F.cross_entropy((hidden @ weight.T)[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), reduction="sum")
    (ref * 2.0 / n).backward()
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(total, ref, rtol=1e-6)
    torch.testing.assert_close(got, hidden.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the first pass only
        assert torch.allclose(causal_lm_loss_sum(hidden, head, labels, chunk=4)[0], ref, rtol=1e-6)


def test_loss_over_head_rows_under_bf16_autocast():
    torch.manual_seed(4)
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    weight = torch.randn(50, 32).bfloat16()
    labels = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = causal_lm_loss_sum(hidden, DenseRows(weight, 16), labels, chunk=6)
    total.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(hidden, weight).float()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    assert torch.allclose(total, ref, rtol=1e-5)
    # d/dhidden sums 4 slices' bf16 products in float32 where autocast makes one bf16 matmul: a few bf16 ulps
    assert (got - hidden.grad).abs().max() <= 1e-2 * hidden.grad.abs().max()
