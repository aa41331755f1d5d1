"""Causal-LM cross-entropy that never holds float32 logits for the whole batch.

Only positions with a target (label != -100 after the shift) go through the output head, and they go
in chunks of rows. For each chunk the forward pass also computes the gradient of its summed loss,
d/dlogits = softmax - onehot, and turns it straight into d/dhidden (and d/dhead when the head trains);
then the chunk's logits are dropped. Backward only scales those saved gradients by the incoming one,
so the head matmul runs once per chunk instead of being recomputed, and the peak is one chunk of
float32 logits [chunk, V] rather than [B, T, V]. The chunk is sized in bytes, not rows: 2,048 rows of
a 152k vocabulary would be 1.2 GB of float32 logits, more than a 0.5B model's 4-bit weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lora.lowrank import compute_dtype
from quant.embedding import vocab_slices

IGNORE_INDEX = -100  # label of positions without loss (the Hugging Face convention)
CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk
MAX_CHUNK_ROWS = 2048


def chunk_rows(vocab_size: int) -> int:
    """Rows per loss chunk: as many as fit CHUNK_BYTES of float32 logits, between 64 and MAX_CHUNK_ROWS."""
    return max(64, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab_size)))


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) for h [N, C], W [V, C], y [N]; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = compute_dtype(h, h.dtype)  # autocast's, as F.linear would run (autocast is off in here)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, h.shape[0], rows):
                hs, ys = h[start : start + rows].to(dtype), targets[start : start + rows]
                logits = F.linear(hs, w).float()  # (n, V)
                # one fused log-softmax pass (logsumexp alone made three full-size temporaries), then the
                # softmax in the same memory: the loss is -log p of each target
                logp = torch._log_softmax(logits, -1, False)
                del logits
                total -= logp.gather(1, ys[:, None]).sum()
                probs = logp.exp_()  # softmax, in the log-probabilities' memory
                probs[torch.arange(ys.numel(), device=h.device), ys] -= 1.0  # d(sum CE)/d(logits)
                d_logits = probs.to(dtype)
                if need_h:
                    grad_h[start : start + rows] = d_logits @ w
                if need_w:
                    grad_w += (d_logits.t() @ hs).float()
                del logp, probs, d_logits  # else they live on while the next chunk's are made: 2x the peak
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


class _RowsCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) for a frozen head W [V, C] that only hands out rows: `head.rows(a, b)`.

    For a 4-bit head (quant.embedding.QuantizedHead) whose dense weight must never exist at once. Per
    chunk of target rows, pass 1 runs over the vocabulary VOCAB_CHUNK head rows at a time, keeping a
    running max and sum of exponentials (an online logsumexp) and the target logits; pass 2 recomputes
    each vocabulary slice's logits, turns them into softmax - onehot with the final logsumexp and adds
    their product with the slice to d/dhidden. Three head matmuls instead of two, and the peak is one
    [rows, VOCAB_CHUNK] float32 block plus one dequantized slice instead of the whole [V, C] weight.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, head, rows: int) -> torch.Tensor:
        total, grad_h = _rows_loss_sum(h, targets, head, rows, want_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None), None, None, None


def _rows_loss_sum(h, targets, head, rows: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed loss, its gradient w.r.t. h [N, C] or None) over chunks of `rows` target rows."""
    dtype = compute_dtype(h, h.dtype)  # autocast's, as F.linear would run (autocast is off in here)
    grad_h = torch.empty_like(h) if want_grad else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, h.shape[0], rows):
            hs, ys = h[start : start + rows].to(dtype), targets[start : start + rows]
            lse, picked = _online_logsumexp(hs, ys, head, dtype)
            total += (lse - picked).sum()
            if grad_h is not None:
                grad_h[start : start + rows] = _softmax_grad_times_head(hs, ys, lse, head, dtype)
    return total, grad_h


def _online_logsumexp(hs, ys, head, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp over the vocabulary [n], logit of each target [n]), float32, one head slice at a time."""
    n = hs.shape[0]
    running_max = torch.full((n,), float("-inf"), device=hs.device)
    sum_exp = torch.zeros(n, device=hs.device)
    picked = torch.zeros(n, device=hs.device)
    for lo, hi in vocab_slices(head.out_features, head.VOCAB_CHUNK):
        logits = F.linear(hs, head.rows(lo, hi, dtype, scratch=True)).float()  # (n, hi - lo)
        inside = ((ys >= lo) & (ys < hi)).nonzero().squeeze(1)
        picked[inside] = logits[inside, ys[inside] - lo]
        new_max = torch.maximum(running_max, logits.amax(dim=1))
        sum_exp = sum_exp * (running_max - new_max).exp() + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        running_max = new_max
    return running_max + sum_exp.log(), picked


def _softmax_grad_times_head(hs, ys, lse, head, dtype) -> torch.Tensor:
    """(softmax(hs W^T) - onehot(ys)) @ W, [n, C], summed over the head's slices in float32."""
    grad = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device)
    rows = torch.arange(hs.shape[0], device=hs.device)
    for lo, hi in vocab_slices(head.out_features, head.VOCAB_CHUNK):
        w = head.rows(lo, hi, dtype, scratch=True)
        probs = F.linear(hs, w).float().sub_(lse[:, None]).exp_()
        inside = (ys >= lo) & (ys < hi)
        probs[rows[inside], ys[inside] - lo] -= 1.0
        grad += probs.to(dtype) @ w
    return grad.to(hs.dtype)


def causal_lm_loss_sum(
    hidden: torch.Tensor, head_weight, labels: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, int]:
    """(summed loss, number of target tokens) for next-token prediction.

    hidden [B,T,C] final normed hidden states; head_weight [V,C], or a frozen head that hands out its
    rows (quant.embedding.QuantizedHead: `rows(a, b, dtype, scratch)`, `out_features`, `VOCAB_CHUNK`),
    whose loss goes slice by slice over the vocabulary; labels [B,T] with -100 where no
    loss is wanted (the label of position t is predicted from position t-1). Divide the sum by the
    target count of the whole (accumulated) batch to get the mean loss; the sum may only be scaled
    (as the training loop does), since its gradient is computed in forward. chunk: rows per chunk
    (default: chunk_rows(V)).
    """
    dense = isinstance(head_weight, torch.Tensor)
    chunk = chunk or chunk_rows(head_weight.shape[0] if dense else head_weight.VOCAB_CHUNK)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), C)
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    if not bool(keep.all()):  # packed rows are targets almost everywhere: skip the copy then
        index = keep.nonzero().squeeze(-1)
        h, y = h.index_select(0, index), y.index_select(0, index)
    if not dense:
        if torch.is_grad_enabled() and h.requires_grad:
            return _RowsCrossEntropy.apply(h, y, head_weight, chunk), int(y.numel())
        return _rows_loss_sum(h, y, head_weight, chunk, want_grad=False)[0], int(y.numel())
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        return _HeadCrossEntropy.apply(h, head_weight, y, chunk), int(y.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk):
        logits = F.linear(h[start : start + chunk], head_weight).float()
        total = total + F.cross_entropy(logits, y[start : start + chunk], reduction="sum")
    return total, int(y.numel())
