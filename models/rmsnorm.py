"""RMSNorm as one autograd function: the forward of the plain formula, a backward that keeps only x and rstd.

The plain formula, y = weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype) with x32 = x.float(),
written as separate tensor ops makes autograd keep x32 (4 bytes per element, even for a bf16 x)
and, when the weight trains, the normalised x as well. This function keeps x in its own dtype (2
bytes per element under bf16) and rstd [..., 1] in float32, and recomputes the rest in backward.

The forward runs exactly the ops of the plain formula, so outputs are bit-identical to it. The
backward is the analytic gradient, computed in float32 like autograd's would be:

    n = x32 · rstd,  gn = (g · weight) rounded to x's dtype, then float32
    dx = rstd · (gn - n · mean(gn · n))          dweight = Σ_rows g · n.to(x.dtype)

It agrees with autograd through the plain formula to float32 rounding (tests/test_fused_ops.py).
"""
from __future__ import annotations

import torch
from torch import Tensor


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_w = None
        n32 = x.float() * rstd  # (..., C), recomputed instead of kept
        if ctx.needs_input_grad[1]:
            n = n32.to(x.dtype)
            rows = tuple(range(grad.dim() - 1))
            grad_w = (grad * n).sum(rows).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # The gradient reaching the normalised x is rounded to x's dtype, as the plain formula's
            # cast back (float32 -> x.dtype) makes autograd do.
            gn = (grad * weight).to(x.dtype).float()
            grad_x = (rstd * (gn - n32 * (gn * n32).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / rms(x), statistics in float32: x [..., C], weight [C] -> [..., C]."""
    return _RMSNorm.apply(x, weight, eps)
