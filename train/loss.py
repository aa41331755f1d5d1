"""Causal-LM cross-entropy that never holds float32 logits for the whole batch.

Only positions with a target (label != -100 after the shift) go through the output head, and
they go in chunks of `chunk` rows; each chunk is recomputed in backward instead of kept, so the
peak is one chunk of logits [chunk, V] in float32 rather than [B, T, V].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of positions without loss (the Hugging Face convention)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of h [N,C] through the head weight [V,C] against targets [N]."""
    logits = F.linear(h, weight).float()  # (N, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss_sum(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk: int = 2048
) -> tuple[torch.Tensor, int]:
    """(summed loss, number of target tokens) for next-token prediction.

    hidden [B,T,C] final normed hidden states; head_weight [V,C]; labels [B,T] with -100 where no
    loss is wanted (the label of position t is predicted from position t-1). Divide the sum by the
    target count of the whole (accumulated) batch to get the mean loss.
    """
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

