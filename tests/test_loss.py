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
