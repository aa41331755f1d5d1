"""NF4Linear: a frozen linear layer whose weight is held in NF4 (4.127 bits per weight).

The quantized weight lives in four buffers (never parameters, so nothing can train them, and
state_dict / .to(device) carry them): `weight_packed` uint8 [ceil(out*in/2)], `absmax_q` uint8
[ceil(out*in/64)], `nested_absmax` float32 [ceil(out*in/16384)], `absmax_offset` float32 [], plus an
optional frozen `bias` [out] buffer in the checkpoint's dtype. Format: see quant.nf4; backends and
scratch buffers: quant.backend.

forward dequantizes on the fly and multiplies in `compute_dtype`; its backward (w.r.t. the input
only, for LoRA on top = QLoRA) dequantizes again instead of keeping a dense copy alive.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from quant.backend import dequantize_scratch
from quant.nf4 import BLOCKSIZE, NF4Tensor, quantize_nf4
from quant.weights import NF4Weights


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W.T (+ b) in `dtype`, W dequantized from (packed, absmax_q, nested_absmax, offset).

    Saves only the 4-bit buffers for backward, where W is dequantized again; grad flows to x only.
    Autocast is off inside: the caller has already decided the dtype, and a second cast would round.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax_q, nested_absmax, offset, bias, shape, dtype, out_dtype, backend):
        state = NF4Tensor(packed, absmax_q, nested_absmax, offset, shape, dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = x.to(dtype) @ dequantize_scratch(state, dtype, backend).t()
            if bias is not None:
                out = out + bias.to(dtype)
        ctx.save_for_backward(packed, absmax_q, nested_absmax, offset)
        ctx.meta = (shape, dtype, x.dtype, backend)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        shape, dtype, x_dtype, backend = ctx.meta
        grad_x = None
        if ctx.needs_input_grad[0]:
            state = NF4Tensor(*ctx.saved_tensors, shape, dtype)
            with torch.autocast(grad_out.device.type, enabled=False):
                grad_x = (grad_out.to(dtype) @ dequantize_scratch(state, dtype, backend)).to(x_dtype)
        return grad_x, None, None, None, None, None, None, None, None, None



class NF4Linear(NF4Weights):
    """y = x W^T + b with W [out, in] frozen in NF4; see the module docstring for storage and backends.

    compute_dtype: dtype of the dequantized weight and of the matmul (bfloat16 or float32 usually).
    Outside autocast, forward returns x's dtype; under autocast, the autocast dtype (computing in it).
    backend: "auto" (per device, measured), "torch" (reference) or "bnb".
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        """An NF4Linear with empty (uninitialised) buffers of the right sizes, e.g. to load a state_dict."""
        super().__init__(in_features * out_features, compute_dtype, device)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_weight(
        cls, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype | None = None
    ) -> NF4Linear:
        """Quantize weight [out, in] (float32/bf16/fp16); bias [out] or None is copied as is.

        compute_dtype defaults to the weight's dtype if float32 or bfloat16, else bfloat16. Keeps no
        reference to `weight`, so a loader can drop each full-precision weight right after this call.
        """
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear.from_weight: weight must be [out, in], got shape {list(weight.shape)}")
        out_features, in_features = weight.shape
        compute_dtype = compute_dtype or cls.default_compute_dtype(weight.dtype)
        state = quantize_nf4(weight)
        # Built on the meta device (no allocation), then handed the quantized tensors.
        layer = cls(in_features, out_features, bias is not None, compute_dtype, device="meta")
        layer._take_quantized(state)
        layer.bias = None if bias is None else bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantize an nn.Linear (which is left untouched)."""
        return cls.from_weight(linear.weight, linear.bias, compute_dtype)

    # ------------------------------------------------------------------ the weight

    @property
    def weight_shape(self) -> torch.Size:
        """[out, in]."""
        return torch.Size((self.out_features, self.in_features))

    def num_params(self) -> int:
        """Logical parameter count, in*out (+ out for the bias): 4-bit weights count as parameters."""
        return super().num_params() + (self.bias.numel() if self.bias is not None else 0)

    # ------------------------------------------------------------------ compute

    # torch.compile (train.run --compile) runs this layer as it is: bitsandbytes' native dequantizer is a ctypes
    # call the compiler cannot trace, so a compiled block's graph breaks around each 4-bit linear.
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = out_dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype, out_dtype = self.compute_dtype, x.dtype
        return _NF4Matmul.apply(
            x,
            self.weight_packed,
            self.absmax_q,
            self.nested_absmax,
            self.absmax_offset,
            self.bias,
            torch.Size((self.out_features, self.in_features)),
            dtype,
            out_dtype,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}, nf4 blocksize={BLOCKSIZE}"
        )
