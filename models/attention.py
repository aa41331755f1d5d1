"""Causal grouped-query attention for bf16 training on the CPU: bf16 matmuls where SDPA's CPU kernel is slow.

Why (benchmarks/attention.py, RESULTS.md): PyTorch's CPU flash-attention kernel runs bf16 inputs no faster
than float32 ones (its block matmuls do not reach the bf16 dot-product units on this CPU), so at
SmolLM2-135M's shape it takes ~22 ms per layer forward + backward at 2 x 512 tokens where the same matmuls
as batched bf16 GEMMs take a few ms. This path materialises the [T, T] scores per head instead of tiling
them, and keeps the elementwise work on them to one softmax pass forward and one softmax-backward pass
backward:

    forward:  s = bias + (q k^T) / sqrt(D)      one baddbmm; bias is 0 / -inf (causal)
              p = softmax(s)                    bf16 in and out, float32 inside
              y = p v
    backward: p recomputed as in forward (nothing [T, T] is saved, like flash attention)
              dv = p^T dy,  dp = dy v^T,  ds = p * (dp - rowsum(dp * p)),  dq = ds k / sqrt(D),  dk = ds^T q / sqrt(D)

GQA without copies: the G = H / K query heads that share one kv head are stacked along the rows,
q [B,H,T,D] -> [B*K, G*T, D], so every product is one batched matmul against k, v [B*K, T, D].

Numerics are those of eager attention under bf16 autocast (scores rounded to bf16 before the softmax,
as transformers' eager path does); SDPA keeps them in float32 inside its tiles. Used only for bf16
without mask, cache or prefix, and up to MAX_SEQ tokens (beyond it the [G*T, T] scores outgrow the caches and
SDPA's tiles win); models.decoder.Attention calls SDPA otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Longest T this path takes: measured faster than SDPA at 128 and 512 tokens, slower at 1024 (there 2 x 9 heads
# x 1024^2 bf16 scores are 38 MiB per transient tensor, far beyond the caches; SDPA's tiles stay in them).
MAX_SEQ = 512
_BIAS: dict[tuple, Tensor] = {}  # (T, G, dtype, device) -> causal bias [G*T, T]; one or two lengths in training


def applies(q: Tensor, k: Tensor) -> bool:
    """Whether this path should run: bf16 on the CPU, q and k of equal length (no cache), at most MAX_SEQ."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] == k.shape[2] <= MAX_SEQ


def causal_bias(T: int, G: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[G*T, T]: 0 where row t mod T may attend to key j (j <= t), -inf above the diagonal; G copies stacked."""
    key = (T, G, dtype, device)
    bias = None if torch.compiler.is_compiling() else _BIAS.get(key)
    if bias is None:
        above = torch.ones(T, T, dtype=torch.bool, device=device).triu_(1)
        bias = torch.zeros(T, T, dtype=dtype, device=device).masked_fill_(above, float("-inf")).repeat(G, 1)
        if not torch.compiler.is_compiling():
            if len(_BIAS) >= 8:  # training sees a few lengths; evaluation and odd batches may add more
                _BIAS.clear()
            _BIAS[key] = bias
    return bias


def _probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax(bias + q k^T * scale): q [N, G*T, D], k [N, T, D] -> p [N, G*T, T] in q's dtype."""
    N, GT, _ = q.shape
    T = k.shape[1]
    bias = causal_bias(T, GT // T, q.dtype, q.device).expand(N, GT, T)
    return torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale), dim=-1)


class _GroupedCausalAttention(torch.autograd.Function):
    """y = softmax(causal(q k^T / sqrt(D))) v on grouped layouts; saves q, k, v only."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        p = _probs(q, k, scale)  # (N, G*T, T)
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return torch.bmm(p, v)  # (N, G*T, D)

    @staticmethod
    def backward(ctx, dy: Tensor):
        q, k, v = ctx.saved_tensors
        p = _probs(q, k, ctx.scale)  # recomputed: one batched matmul and one softmax pass
        dy = dy.contiguous()
        dv = torch.bmm(p.transpose(1, 2), dy)  # (N, T, D): sums the G query heads of each kv head
        ds = torch._softmax_backward_data(torch.bmm(dy, v.transpose(1, 2)), p, -1, p.dtype)  # (N, G*T, T)
        dq = torch.bmm(ds, k).mul_(ctx.scale)
        dk = torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale)
        return dq, dk, dv, None


def grouped_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention: q [B,H,T,D], k and v [B,K,T,D] (H a multiple of K) -> [B,H,T,D], as SDPA's is_causal."""
    B, H, T, D = q.shape
    K = k.shape[1]
    qg = q.contiguous().view(B * K, H // K * T, D)  # (B*K, G*T, D): heads h = kv*G + g share kv head `kv`
    kg, vg = k.contiguous().view(B * K, T, D), v.contiguous().view(B * K, T, D)
    y = _GroupedCausalAttention.apply(qg, kg, vg, D**-0.5)
    return y.view(B, H, T, D)
