"""Causal-LM cross-entropy that never holds float32 logits for the whole batch.

Only positions with a target (label != -100 after the shift) go through the output head, and
they go in chunks of rows; each chunk is recomputed in backward instead of kept, so the peak is one
chunk of logits [chunk, V] in float32 rather than [B, T, V]. The chunk is sized in bytes, not rows:
2,048 rows of a 152k vocabulary would be 1.2 GB of float32 logits (and as much again for their
gradient), more than a 0.5B model's 4-bit weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of positions without loss (the Hugging Face convention)
CHUNK_BYTES = 128 * 2**20  # float32 logits of one chunk
MAX_CHUNK_ROWS = 2048


def chunk_rows(vocab_size: int) -> int:
    """Rows per loss chunk: as many as fit CHUNK_BYTES of float32 logits, between 64 and MAX_CHUNK_ROWS."""
    return max(64, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab_size)))


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of h [N,C] through the head weight [V,C] against targets [N]."""
    logits = F.linear(h, weight).float()  # (N, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss_sum(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, int]:
    """(summed loss, number of target tokens) for next-token prediction.

    hidden [B,T,C] final normed hidden states; head_weight [V,C]; labels [B,T] with -100 where no
    loss is wanted (the label of position t is predicted from position t-1). Divide the sum by the
    target count of the whole (accumulated) batch to get the mean loss. chunk: rows per chunk
    (default: chunk_rows(V)).
    """
    chunk = chunk or chunk_rows(head_weight.shape[0])
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), C)
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE).nonzero().squeeze(-1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk):
        hs, ys = h[start : start + chunk], y[start : start + chunk]
        if torch.is_grad_enabled() and (hs.requires_grad or head_weight.requires_grad):
            total = total + checkpoint(_chunk_loss, hs, head_weight, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss(hs, head_weight, ys)
    return total, int(y.numel())

