"""NF4Weights: the base class of every frozen weight held in NF4 (linear layers, embedding tables).

What all 4-bit weights share, and the one type the rest of the project checks for (isinstance, never
duck typing): the four buffers of quant.nf4's format, the dtype they dequantize to (`compute_dtype`),
`dequantize()` of the whole weight, its byte count, and buffers that keep their bits through
Module.to(dtype).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from quant.backend import dequantize
from quant.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, NF4Tensor

# Float32 statistics that Module.to(dtype) / .half() must not round (see NF4Weights._apply).
_FLOAT_STATE = ("nested_absmax", "absmax_offset")


class NF4Weights(nn.Module):
    """A frozen weight held in NF4: the four buffers and what only needs them. Base of NF4Linear and
    quant.embedding.NF4Embedding.

    Buffers (format: quant.nf4), for n = weight_shape.numel() in row-major order: `weight_packed` uint8
    [ceil(n/2)], `absmax_q` uint8 [ceil(n/64)], `nested_absmax` float32 [ceil(n/16384)], `absmax_offset`
    float32 []. compute_dtype: the default dtype of the dequantized weight. backend: see dequantize().
    Subclasses define `weight_shape`.
    """

    def __init__(self, numel: int, compute_dtype: torch.dtype, device: torch.device | str | None) -> None:
        """Empty (uninitialised) buffers for `numel` weights, e.g. to load a state_dict into."""
        super().__init__()
        self.compute_dtype = compute_dtype
        self.backend = "auto"
        blocks = -(-numel // BLOCKSIZE)
        self.register_buffer("weight_packed", torch.empty(-(-numel // 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax_q", torch.empty(blocks, dtype=torch.uint8, device=device))
        nested = -(-blocks // NESTED_BLOCKSIZE)
        self.register_buffer("nested_absmax", torch.empty(nested, dtype=torch.float32, device=device))
        self.register_buffer("absmax_offset", torch.empty((), dtype=torch.float32, device=device))

    @property
    def weight_shape(self) -> torch.Size:
        raise NotImplementedError

    def num_params(self) -> int:
        """Logical parameter count: 4-bit weights count as parameters (as PEFT counts bitsandbytes' packed ones)."""
        return self.weight_shape.numel()

    @staticmethod
    def default_compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
        """The weight's dtype if float32 or bfloat16, else bfloat16 (float16 overflows too easily)."""
        return weight_dtype if weight_dtype in (torch.float32, torch.bfloat16) else torch.bfloat16

    def _take_quantized(self, state: NF4Tensor) -> None:
        """Make `state`'s tensors our buffers (no copy): from_weight builds on the meta device, then this."""
        self.weight_packed, self.absmax_q = state.packed, state.absmax_q
        self.nested_absmax, self.absmax_offset = state.nested_absmax, state.offset

    def quant_state(self, dtype: torch.dtype | None = None) -> NF4Tensor:
        """Our buffers as an NF4Tensor (no copy); `dtype` is what it dequantizes to by default."""
        return NF4Tensor(
            self.weight_packed,
            self.absmax_q,
            self.nested_absmax,
            self.absmax_offset,
            self.weight_shape,
            dtype or self.compute_dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole weight [*weight_shape] in `dtype` (default: compute_dtype)."""
        return dequantize(self.quant_state(dtype), dtype, self.backend)

    def weight_bytes(self) -> int:
        """Resident bytes of the quantized weight (a bias and the shared code tables not included).

        = ceil(n/2) + ceil(n/64) + 4*ceil(n/16384) + 4 for n weights (quant.nf4.nf4_nbytes).
        """
        return self.quant_state().nbytes

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .half(), .bfloat16() cast every floating buffer; the float32 double-quant
        # statistics must keep their bits, so they travel as int32 (moved, never cast).
        for name in _FLOAT_STATE:
            self._buffers[name] = self._buffers[name].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in _FLOAT_STATE:
                self._buffers[name] = self._buffers[name].view(torch.float32)
