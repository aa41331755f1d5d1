"""silu(gate) * up as one autograd function that keeps only its two inputs for backward.

Written as two ops, autograd keeps gate (for silu's backward) plus silu(gate) and up (for the
product's): three intermediate-width tensors per token, the largest activations of a block. This
function keeps gate and up and recomputes silu(gate) in backward. Both directions call the same
kernels in the same order as the two-op version (silu, mul; mul, silu_backward), so outputs and
gradients are bit-identical to it (tests/test_swiglu.py).

Shapes: gate, up [..., I] -> [..., I].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up with a backward that keeps gate and up only: [..., I], [..., I] -> [..., I]."""
    return _SwiGLU.apply(gate, up)
