"""Causal attention and the frozen projections at SmolLM2-135M's shape: every candidate path, timed in one process.

    OMP_NUM_THREADS=2 python -m benchmarks.attention [--rounds 9] [--seqs 128,512] [--json PATH]

Issue #19 measured attention at ~10 % of the bf16 matmul rate. This times one layer's attention, forward +
backward, for B=2, 9 query heads, 3 kv heads, head dim 64, as models.decoder.Attention sees it under bf16
autocast: q, k, v are [B,heads,T,D] views of [B,T,heads*D] projections (transposed, not contiguous). The
candidates alternate round by round in one process (the machine is shared, so drift hits all alike); each
entry is the best (minimum) and the median over --rounds of one call (after one untimed call). Other processes
on the 2 shared cores only ever add time (two OpenMP threads slow down many-fold when one is descheduled), so
the minimum is the estimate of a quiet machine and the report uses it. Candidates:

- sdpa (before): F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) on the bf16 views, what the
  decoder called before models.attention;
- models.attention, blocks of 128 (now): the decoder's path (bf16 batched matmuls, one softmax pass each way,
  128 query positions at a time); one [T, T] block, blocks of 64 and 256: the same with other block sizes;
- + contiguous / + repeat_interleave k,v / + explicit bool mask / fp32 inputs: one change each;
- math backend: the same call under sdpa_kernel(MATH) (what SDPA falls back to);
- manual, naive: bf16 matmuls with q grouped per kv head, float32 copies of the scores for the softmax and its
  gradient, saved probabilities (a first attempt: the extra [T, T] passes cost what the matmuls gained);
- 1 thread: the current call with torch.set_num_threads(1), for the threading question (timed after the
  rounds of the others, since resizing the thread pool slows whatever runs next).

Also timed, as the ceiling: the bf16 and fp32 batched matmuls of one attention (Q K^T at [B*H,T,D] x [B*H,D,T]),
and the frozen q/k/v (and gate/up) projections of one layer as separate matmuls vs one matmul on the
concatenated weight, forward + the input gradient (frozen weights need no weight gradient).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.vs_hf import SHAPES, machine, versions
from models.attention import grouped_causal_attention

ROOT = Path(__file__).resolve().parents[1]
SHAPE, BATCH = "smollm2-135m", 2
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def projections(T: int, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """q [B,H,T,D], k and v [B,K,T,D]: transposed views of [B,T,heads*D] tensors, as the decoder makes them."""
    s = SHAPES[SHAPE]
    H, K, D = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    g = torch.Generator().manual_seed(seed)
    out = []
    for heads in (H, K, K):
        x = torch.randn(BATCH, T, heads * D, generator=g).to(dtype)
        out.append(x.view(BATCH, T, heads, D).transpose(1, 2).requires_grad_())
    return tuple(out)


class GroupedAttention(torch.autograd.Function):
    """Causal softmax(q k^T / sqrt(D)) v with bf16 matmuls and a float32 softmax; saves the probabilities.

    q [B,H,T,D] is viewed as [B,K,G*T,D] (G = H/K query heads per kv head), so k and v [B,K,T,D] are used
    as they are, never repeated.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, D = q.shape
        K = k.shape[1]
        qs = (q * D**-0.5).reshape(B, K, H // K * T, D)  # (B, K, G*T, D)
        s = (qs @ k.transpose(-1, -2)).view(B, K, H // K, T, T).float()  # (B, K, G, T, T)
        s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu_(1), float("-inf"))
        p = torch.softmax(s, -1).to(q.dtype).view(B, K, H // K * T, T)
        y = (p @ v).view(B, H, T, D)
        ctx.save_for_backward(qs, k, v, p, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        qs, k, v, p, y = ctx.saved_tensors
        B, H, T, D = y.shape
        dyg = dy.reshape(qs.shape)  # (B, K, G*T, D)
        dv = p.transpose(-1, -2) @ dyg
        dp = dyg @ v.transpose(-1, -2)  # (B, K, G*T, T)
        rowdot = (dy.float() * y.float()).sum(-1).reshape(B, k.shape[1], -1, 1)
        ds = (p.float() * (dp.float() - rowdot)).to(qs.dtype)  # masked entries have p = 0
        dq = (ds @ k).view(B, H, T, D) * D**-0.5
        dk = ds.transpose(-1, -2) @ qs
        return dq, dk, dv


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _repeat(q, k, v):
    g = q.shape[1] // k.shape[1]
    return _sdpa(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)


def _masked(q, k, v):
    T = q.shape[2]
    return _sdpa(q, k, v, attn_mask=torch.ones(T, T, dtype=torch.bool).tril(), enable_gqa=True)


def _math(q, k, v):
    with sdpa_kernel([SDPBackend.MATH]):
        return _sdpa(q, k, v, is_causal=True, enable_gqa=True)


def _one_thread(q, k, v):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = _sdpa(q, k, v, is_causal=True, enable_gqa=True)
        y.backward(torch.ones_like(y))  # backward inside, so it runs on one thread too
        return None
    finally:
        torch.set_num_threads(n)


CANDIDATES: dict[str, Callable] = {
    "sdpa (before)": lambda q, k, v: _sdpa(q, k, v, is_causal=True, enable_gqa=True),
    "models.attention, blocks of 128 (now)": grouped_causal_attention,
    "models.attention, one [T, T] block": lambda q, k, v: grouped_causal_attention(q, k, v, block=None),
    "models.attention, blocks of 64": lambda q, k, v: grouped_causal_attention(q, k, v, block=64),
    "models.attention, blocks of 256": lambda q, k, v: grouped_causal_attention(q, k, v, block=256),
    "sdpa, contiguous q,k,v": lambda q, k, v: _sdpa(q.contiguous(), k.contiguous(), v.contiguous(),
                                                    is_causal=True, enable_gqa=True),
    "sdpa, repeat_interleave k,v": _repeat,
    "sdpa, explicit bool mask": _masked,
    "sdpa, fp32 inputs": lambda q, k, v: _sdpa(q.float(), k.float(), v.float(), is_causal=True,
                                               enable_gqa=True).to(q.dtype),
    "sdpa, math backend": _math,
    "manual, naive (fp32 score copies)": lambda q, k, v: GroupedAttention.apply(q.contiguous(), k.contiguous(),
                                                                                  v.contiguous()),
}
ONE_THREAD = "sdpa, 1 thread"  # timed after the others: changing the thread count stalls the next calls


def call_ms(fn: Callable, T: int, backward: bool = True) -> float:
    """One forward (+ backward with a ones gradient) on fresh inputs, in ms."""
    q, k, v = projections(T, torch.bfloat16)
    t0 = time.perf_counter()
    if backward:
        y = fn(q, k, v)
        if y is not None:  # None: fn ran its own backward
            y.backward(torch.ones_like(y))
    else:
        with torch.no_grad():
            fn(q, k, v)
    return 1e3 * (time.perf_counter() - t0)


def summary(ts: list[float], key: str) -> dict[str, float]:
    """{key: minimum, key_median: median} of a list of timings."""
    return {key: min(ts), f"{key}_median": statistics.median(ts)}


def attention_ms(T: int, rounds: int) -> dict[str, dict[str, float]]:
    """{candidate: {"fwd_bwd", "fwd" (best ms), "fwd_bwd_median", "fwd_median"}}, alternating round by round."""
    times: dict[str, dict[str, list[float]]] = {n: {"fwd_bwd": [], "fwd": []} for n in CANDIDATES}
    for fn in CANDIDATES.values():
        call_ms(fn, T)
    for _ in range(rounds):
        for name, fn in CANDIDATES.items():
            times[name]["fwd_bwd"].append(call_ms(fn, T))
            times[name]["fwd"].append(call_ms(fn, T, backward=False))
    out = {n: {**summary(d["fwd_bwd"], "fwd_bwd"), **summary(d["fwd"], "fwd")} for n, d in times.items()}
    out[ONE_THREAD] = summary([call_ms(_one_thread, T) for _ in range(rounds)], "fwd_bwd")
    return out


def attention_gflop(T: int) -> float:
    """Causal attention's matmul FLOPs for one layer, forward + backward (2 + 4 matmuls, half the T x T)."""
    s = SHAPES[SHAPE]
    full = 2 * BATCH * s["num_attention_heads"] * T * T * s["head_dim"]  # one [T,D] x [D,T] product per head
    return 6 * full / 2 / 1e9


def bmm_gflops(T: int, dtype: torch.dtype, reps: int = 20) -> float:
    """Best-of-reps rate of Q K^T for one attention ([B*H,T,D] x [B*H,D,T]) in `dtype`, GFLOP/s."""
    s = SHAPES[SHAPE]
    n, D = BATCH * s["num_attention_heads"], s["head_dim"]
    q, k = torch.randn(n, T, D, dtype=dtype), torch.randn(n, D, T, dtype=dtype)
    q @ k
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        q @ k
        best = min(best, time.perf_counter() - t0)
    return 2 * n * T * T * D / best / 1e9


def projection_ms(T: int, rounds: int) -> dict[str, dict[str, float]]:
    """Frozen projections of one layer (bf16, [B*T, C] input): separate matmuls vs one on the concatenated weight.

    Forward + the input gradient, as for a frozen base under LoRA; best and median ms over `rounds` alternating rounds.
    """
    s = SHAPES[SHAPE]
    C, D = s["hidden_size"], s["head_dim"]
    groups = {"q,k,v": [s["num_attention_heads"] * D] + 2 * [s["num_key_value_heads"] * D],
              "gate,up": 2 * [s["intermediate_size"]]}
    g = torch.Generator().manual_seed(0)
    out = {}
    for group, widths in groups.items():
        ws = [(torch.randn(w, C, generator=g) * 0.02).bfloat16() for w in widths]
        cat = torch.cat(ws)
        x = torch.randn(BATCH * T, C, generator=g).bfloat16().requires_grad_()
        grads = [torch.randn(BATCH * T, w, generator=g).bfloat16() for w in widths]

        def separate():
            torch.autograd.backward([F.linear(x, w) for w in ws], grads)

        def concatenated():
            torch.autograd.backward(list(F.linear(x, cat).split(widths, -1)), grads)

        paths = {"separate": separate, "concatenated": concatenated}
        times: dict[str, list[float]] = {n: [] for n in paths}
        for _ in range(rounds + 1):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
                x.grad = None
        out[group] = {k: v for n, ts in times.items() for k, v in summary(ts[1:], n).items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seqs", default="128,512,1024,2048", help="comma-separated sequence lengths")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "attention.json")
    args = ap.parse_args(argv)
    seqs = [int(t) for t in args.seqs.split(",")]
    result = {
        "command": "python -m benchmarks.attention" + (f" --rounds {args.rounds}" if args.rounds != 9 else "")
        + (f" --seqs {args.seqs}" if args.seqs != "128,512,1024,2048" else ""),
        "shape": SHAPE, "batch": BATCH, "layers": SHAPES[SHAPE]["num_hidden_layers"], "machine": machine(),
        "versions": versions(), "seqs": {},
    }
    for T in seqs:
        entry = {"attention_ms": attention_ms(T, args.rounds), "gflop_fwd_bwd": attention_gflop(T),
                 "bmm_gflops": {"bf16": bmm_gflops(T, torch.bfloat16), "fp32": bmm_gflops(T, torch.float32)},
                 "projection_ms": projection_ms(T, args.rounds)}
        result["seqs"][str(T)] = entry
        print(T, json.dumps(entry, indent=1), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
