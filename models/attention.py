"""Causal grouped-query attention for bf16 training on the CPU: bf16 matmuls where SDPA's CPU kernel is slow.

Why (benchmarks/attention.py, RESULTS.md): PyTorch's CPU flash-attention kernel runs bf16 inputs no faster
than float32 ones (its block matmuls do not reach the bf16 dot-product units on this CPU), so at
SmolLM2-135M's shape it takes ~22 ms per layer forward + backward at 2 x 512 tokens where the same matmuls
as batched bf16 GEMMs take a few ms. This path materialises the scores of a block of BLOCK query positions
at a time instead of tiling them finely, and keeps the elementwise work on them to one softmax pass forward
and one softmax-backward pass backward. For the block of positions [t0, t1), with keys [0, t1):

    forward:  s = bias + (q k^T) / sqrt(D)      one baddbmm; bias is 0 / -inf (causal, on the last columns)
              p = softmax(s)                    bf16 in and out, float32 inside
              y = p v
    backward: p recomputed as in forward (nothing [T, T] is saved, like flash attention)
              dv = p^T dy,  dp = dy v^T,  ds = p * (dp - rowsum(dp * p)),  dq = ds k / sqrt(D),  dk = ds^T q / sqrt(D)
              (dk and dv of the keys [0, t1) summed over the blocks that read them)

Blocks (measured at SmolLM2-135M's shape, one layer forward + backward, 2 x 512 tokens: 24 ms as one [T, T]
block, 12 ms in blocks of 128): a block skips the keys after it, most of the masked upper triangle (10/16 of
the full work at T = 512), and its scores [G*128, <= T] stay in the caches where the whole [G*T, T] does not.

GQA without copies of k and v: the G = H / K query heads that share one kv head are stacked along the rows,
position-major (row t*G + g), q [B,H,T,D] -> [B*K, T*G, D], so a block of positions is a block of rows and
every product is one batched matmul against k, v [B*K, T, D].

Numerics are those of eager attention under bf16 autocast (scores rounded to bf16 before the softmax,
as transformers' eager path does); SDPA keeps them in float32 inside its tiles. Used only for bf16
without mask, cache or prefix, and up to MAX_SEQ tokens; models.decoder.Attention calls SDPA otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Longest T this path takes: measured faster than SDPA's CPU kernel (forward + backward) at 128, 512, 1024 and
# 2048 tokens (1.5x at 2048); longer sequences were not measured and keep SDPA.
MAX_SEQ = 2048
# Query positions per block. Block i of positions [t0, t1) needs keys [0, t1) only, so the masked upper
# triangle is mostly never computed: at T = 512, four blocks do 10/16 of the full [T, T] work.
BLOCK = 128
_BIAS: dict[tuple, Tensor] = {}  # (t0, t1, G, dtype, device) -> causal bias [(t1-t0)*G, t1]


def applies(q: Tensor, k: Tensor) -> bool:
    """Whether this path should run: bf16 on the CPU, q and k of equal length (no cache), at most MAX_SEQ."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] == k.shape[2] <= MAX_SEQ


def blocks(T: int, block: int | None) -> list[tuple[int, int]]:
    """[(t0, t1)]: consecutive query positions, `block` at a time (None: one block of all T)."""
    step = block or max(T, 1)
    return [(t0, min(t0 + step, T)) for t0 in range(0, T, step)]


def causal_bias(t0: int, t1: int, G: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[(t1-t0)*G, t1]: row (t - t0)*G + g (position t, query head g of its group) is 0 where it may attend to
    key j (j <= t), -inf above the diagonal."""
    key = (t0, t1, G, dtype, device)
    bias = None if torch.compiler.is_compiling() else _BIAS.get(key)
    if bias is None:
        t = torch.arange(t0, t1, device=device).repeat_interleave(G)
        above = torch.arange(t1, device=device)[None, :] > t[:, None]
        bias = torch.zeros(above.shape, dtype=dtype, device=device).masked_fill_(above, float("-inf"))
        if not torch.compiler.is_compiling():
            if len(_BIAS) >= 32:  # training sees a few lengths (4 blocks each); evaluation and odd batches add more
                _BIAS.clear()
            _BIAS[key] = bias
    return bias


def _probs(q: Tensor, k: Tensor, t0: int, G: int, scale: float) -> Tensor:
    """softmax(bias + q k^T * scale) for one block: q [N, (t1-t0)*G, D], k [N, t1, D] -> p [N, (t1-t0)*G, t1]."""
    N, rows, _ = q.shape
    t1 = k.shape[1]
    bias = causal_bias(t0, t1, G, q.dtype, q.device).expand(N, rows, t1)
    return torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale), dim=-1)


class _GroupedCausalAttention(torch.autograd.Function):
    """y = softmax(causal(q k^T / sqrt(D))) v on grouped layouts, block by block; saves q, k, v only.

    q [N, T*G, D] (row t*G + g), k and v [N, T, D] -> y [N, T*G, D].
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, G: int, block: int | None) -> Tensor:
        ys = []
        for t0, t1 in blocks(k.shape[1], block):
            p = _probs(q[:, t0 * G : t1 * G], k[:, :t1], t0, G, scale)
            ys.append(torch.bmm(p, v[:, :t1]))
        ctx.save_for_backward(q, k, v)
        ctx.meta = (scale, G, block)
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        q, k, v = ctx.saved_tensors
        scale, G, block = ctx.meta
        dy = dy.contiguous()
        parts = blocks(k.shape[1], block)
        # dk and dv sum over blocks: one block writes them whole; several add up in float32
        dk = dv = None
        if len(parts) > 1:
            dk, dv = (torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2))
        dq = []
        for t0, t1 in parts:
            qi, dyi, ki, vi = q[:, t0 * G : t1 * G], dy[:, t0 * G : t1 * G], k[:, :t1], v[:, :t1]
            p = _probs(qi, ki, t0, G, scale)  # recomputed: one batched matmul and one softmax pass
            dv_i = torch.bmm(p.transpose(1, 2), dyi)  # (N, t1, D): sums the G query heads of each kv head
            ds = torch._softmax_backward_data(torch.bmm(dyi, vi.transpose(1, 2)), p, -1, p.dtype)
            dq.append(torch.bmm(ds, ki).mul_(scale))
            dk_i = torch.bmm(ds.transpose(1, 2), qi).mul_(scale)
            if dk is None:
                dk, dv = dk_i, dv_i
            else:
                dk[:, :t1] += dk_i
                dv[:, :t1] += dv_i
        dq = dq[0] if len(dq) == 1 else torch.cat(dq, dim=1)
        return dq, dk.to(q.dtype), dv.to(q.dtype), None, None, None


def grouped_causal_attention(q: Tensor, k: Tensor, v: Tensor, block: int | None = BLOCK) -> Tensor:
    """Causal attention: q [B,H,T,D], k and v [B,K,T,D] (H a multiple of K) -> [B,H,T,D], as SDPA's is_causal.

    block: query positions per block (None: all T at once, the full [T, T] scores).
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    G = H // K
    # (B*K, T*G, D), position-major: the G query heads of kv head `kv` (h = kv*G + g) of one position are
    # adjacent rows, so a block of positions is a block of rows
    qg = q.reshape(B, K, G, T, D).transpose(2, 3).reshape(B * K, T * G, D)
    kg, vg = k.contiguous().view(B * K, T, D), v.contiguous().view(B * K, T, D)
    y = _GroupedCausalAttention.apply(qg, kg, vg, D**-0.5, G, block)
    # one copy into [B, T, H, D] memory, returned as the [B, H, T, D] view: the decoder's transpose back for
    # o_proj is then free
    return y.view(B, K, T, G, D).permute(0, 2, 1, 3, 4).reshape(B, T, H, D).transpose(1, 2)
