"""The LoRA update s · B A drop(x) as one autograd function that keeps as little as possible for backward.

Written as plain modules (x cast to the adapter's float32, dropout, then two nn.Linear under
autocast), autograd keeps per adapted linear dropout's float32 noise tensor and the bf16 copy
autocast makes of the dropped x for A's matmul: 4 + 2 = 6 bytes per input element, and the float32
copy of x (4 more) lives through the forward of each adapter. The frozen base layer keeps nothing
of x (it needs no weight gradient).

`lora_delta` keeps instead: x in the compute dtype (no copy when x already has it, and one tensor
for all adapters that read the same input, as q, k and v do), a one-byte keep mask per adapter, and
A's output [N, r] (rank-sized, small). drop(x) is recomputed in backward from x and the mask, one
elementwise pass. The mask and its scale come from lora.dropout (independent Bernoulli keep-masks,
drawn much faster than nn.Dropout's on a CPU, and not the same draws); the maths and rounding are
otherwise those of the module version with that mask: x times the mask times the scale in float32,
then matmuls in the autocast dtype when autocast is on, else in the adapter weights' dtype.

Shapes: x [..., in], A [r, in], B [out, r] -> delta [..., out] in the compute dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lora.dropout import keep_mask


def compute_dtype(x: Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the adapter's matmuls run in: autocast's when it is on for x's device, else the weights'."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return weight_dtype


def drop(x: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """x times the 0/1 mask, then times the scale (in opmath float, one rounding), as x * (mask * scale).

    The bool mask is read as uint8: bf16 * uint8 runs vectorised, about 3x faster on the CPU than
    torch.where(mask, x, 0) on a bool mask, and gives nn.Dropout's values (x * 0 keeps the sign of x).
    """
    return x if mask is None else x.mul(mask.view(torch.uint8)).mul_(scale)


class _LoRADelta(torch.autograd.Function):
    """delta = s · (drop(x) A^T) B^T; saves x (compute dtype), the bool mask and h = drop(x) A^T."""

    @staticmethod
    def forward(ctx, x, a_weight, b_weight, mask, scaling, drop_scale, dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)  # a no-op under autocast when x is already bf16: shared with the base layer
            a, b = a_weight.to(dtype), b_weight.to(dtype)
            h = F.linear(drop(xc, mask, drop_scale), a)  # (..., r)
            delta = F.linear(h, b) * scaling  # (..., out)
        ctx.save_for_backward(xc, mask, h, a, b)
        ctx.meta = (scaling, drop_scale, x.dtype, a_weight.dtype, b_weight.dtype)
        return delta

    @staticmethod
    def backward(ctx, grad):
        xc, mask, h, a, b = ctx.saved_tensors
        scaling, drop_scale, x_dtype, a_dtype, b_dtype = ctx.meta
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            g = (grad.to(a.dtype) * scaling).reshape(-1, b.shape[0])  # (N, out)
            h2 = h.reshape(-1, h.shape[-1])  # (N, r)
            if need_b:
                grad_b = (g.t() @ h2).to(b_dtype)
            gh = g @ b  # (N, r)
            if need_a:
                xd = drop(xc, mask, drop_scale).reshape(-1, xc.shape[-1])  # recomputed, freed right after
                grad_a = (gh.t() @ xd).to(a_dtype)
            if need_x:
                gx = (gh @ a).reshape(xc.shape)
                grad_x = drop(gx, mask, drop_scale).to(x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None


def lora_delta(x: Tensor, a_weight: Tensor, b_weight: Tensor, scaling: float, p: float, training: bool) -> Tensor:
    """s · B A drop(x): x [..., in], A [r, in], B [out, r] -> [..., out] in the compute dtype.

    p is the dropout probability, applied only when `training` (as nn.Dropout in train mode).
    """
    dtype = compute_dtype(x, a_weight.dtype)
    mask = None
    drop_scale = 1.0
    if training and p > 0:
        mask, drop_scale = keep_mask(x.shape, p, x.device)  # a bool: 1 byte per element where noise takes 4
    return _LoRADelta.apply(x, a_weight, b_weight, mask, scaling, drop_scale, dtype)
