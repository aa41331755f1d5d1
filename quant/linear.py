"""NF4Linear: a frozen linear layer whose weight is held in NF4 (4.127 bits per weight).

The quantized weight lives in four buffers (never parameters, so nothing can train them, and
state_dict / .to(device) carry them): `weight_packed` uint8 [ceil(out*in/2)], `absmax_q` uint8
[ceil(out*in/64)], `nested_absmax` float32 [ceil(out*in/16384)], `absmax_offset` float32 [], plus an
optional frozen `bias` [out] buffer in the checkpoint's dtype. Format: see quant.nf4.

forward dequantizes on the fly and multiplies in `compute_dtype`; its backward (w.r.t. the input
only, for LoRA on top = QLoRA) dequantizes again instead of keeping a dense copy alive.

Dequantization backends, identical to the last bit (tests/test_nf4.py):
- "torch": quant.nf4.dequantize_nf4, the reference, any device, any shape.
- "bnb": bitsandbytes.functional.dequantize_4bit on a QuantState built from our buffers. Used only
  when in_features % 64 == 0: bitsandbytes' AVX-512 CPU kernel indexes absmax per row as
  row * (in // 64) + col // 64, which is wrong when a 64-block straddles two rows (e.g. [10, 80]).
Default (`DEFAULT_BACKEND`), measured with benchmarks/nf4_speed.py on this project's CPU machine
(AMD EPYC with AVX-512, OMP_NUM_THREADS=1, torch 2.13, bitsandbytes 0.50.2), ms, median of 7:

    layer        operation                  ours ms    bnb ms  ours/bnb
    2048x2048    quantize (fp32 in)            96.1     105.8      0.91   (bnb: quantize_4bit)
    2048x2048    dequantize -> bf16             5.0       0.6      8.68
    2048x2048    dequantize -> fp32             4.8       0.7      6.48
    2048x2048    forward bf16, 8 tok           10.0       1.0     10.01
    2048x2048    fwd+bwd bf16, 8 tok           11.8       2.7      4.32
    4096x11008   quantize (fp32 in)           925.8    1209.4      0.77   (bnb: quantize_4bit)
    4096x11008   dequantize -> bf16            84.4      37.8      2.23
    4096x11008   dequantize -> fp32           113.3      69.2      1.64
    4096x11008   forward bf16, 8 tok           90.6      43.7      2.07
    4096x11008   fwd+bwd bf16, 8 tok          184.2      90.9      2.03

so "bnb" on CPU: its AVX-512 table lookup beats our gather + multiply 2x (memory-bound) to 9x
(in cache). Quantizing is always ours (bitsandbytes' CPU quantize_4bit is PyTorch code too, and
slower). CUDA: "bnb" (one fused kernel against our gather and multiply; not measured, no GPU was
available; tests/test_nf4.py has a GPU check that both backends give the CPU bits). Other devices: "torch".
"""
from __future__ import annotations

import ctypes
import logging
import threading
from functools import lru_cache

import torch
from torch import Tensor, nn

from quant.nf4 import (
    BLOCKSIZE,
    NESTED_BLOCKSIZE,
    SUPPORTED_DTYPES,
    NF4Tensor,
    dequantize_4bit_blocks,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_code,
    nf4_code,
    quantize_nf4,
)

DEFAULT_BACKEND: dict[str, str] = {"cpu": "bnb", "cuda": "bnb"}
BACKENDS = ("auto", "torch", "bnb")
# Float32 statistics that Module.to(dtype) / .half() must not round (see NF4Weights._apply).
_FLOAT_STATE = ("nested_absmax", "absmax_offset")


def import_bitsandbytes():
    """Import bitsandbytes without its warning about an optional CPU kernel package we do not use."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401

    return bitsandbytes


@lru_cache(maxsize=None)
def _bnb_available() -> bool:
    try:
        import_bitsandbytes()
    except Exception:  # an ImportError, or a broken native library
        return False
    return True


def bnb_quant_state(state: NF4Tensor, dtype: torch.dtype):
    """A bitsandbytes QuantState that shares our tensors (nothing is copied)."""
    from bitsandbytes.functional import QuantState

    nested = QuantState(
        absmax=state.nested_absmax,
        code=dynamic_code(state.device),
        blocksize=state.nested_blocksize,
        dtype=torch.float32,
    )
    return QuantState(
        absmax=state.absmax_q,
        shape=state.shape,
        code=nf4_code(state.device),
        blocksize=state.blocksize,
        quant_type="nf4",
        dtype=dtype,
        offset=state.offset,
        state2=nested,
    )


def dequantize_bnb(state: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """dequantize_nf4 through bitsandbytes' kernels: [*state.shape] in `dtype` (default: state.dtype)."""
    from bitsandbytes.functional import dequantize_4bit

    # Packed as [ceil(n/2), 1], bitsandbytes' own layout. Still, for n <= 2 (one byte) bitsandbytes
    # returns the transpose and for a 1-D shape a [1, n] tensor: reshape puts both right.
    out = dequantize_4bit(state.packed.view(-1, 1), bnb_quant_state(state, dtype or state.dtype))
    return out.reshape(state.shape)


def resolve_backend(backend: str, state: NF4Tensor) -> str:
    """"torch" or "bnb" for this weight: "auto" picks DEFAULT_BACKEND[device], where bnb is exact."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = DEFAULT_BACKEND.get(state.device.type, "torch")
    bnb_exact = state.shape[-1] % BLOCKSIZE == 0 and state.dtype in SUPPORTED_DTYPES
    if backend == "bnb" and not (bnb_exact and _bnb_available()):
        return "torch"
    return backend


def dequantize(state: NF4Tensor, dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """[*state.shape] in `dtype` (default: state.dtype) with the chosen backend; all give the same bits."""
    if resolve_backend(backend, state) == "bnb":
        return dequantize_bnb(state, dtype)
    return dequantize_nf4(state, dtype)


# ---------------------------------------------------------------------- scratch dequantization (CPU)
#
# On CPU every dequantized weight is a fresh allocation of up to tens of MiB, made twice per layer per
# step and freed at once. Interleaved with the activations autograd keeps, these blocks fragment
# glibc's heap: at the Qwen2.5-0.5B shape the resident set grew ~250 MiB above the live tensors
# (benchmarks/RESULTS.md). So the matmuls dequantize into one buffer per thread and dtype that the next
# call overwrites. CUDA's caching allocator already reuses such blocks; there the plain path is kept.

_BNB_CPU_KERNELS = {
    torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16",
    torch.float32: "cdequantize_blockwise_cpu_nf4_fp32",
    torch.float16: "cdequantize_blockwise_cpu_nf4_fp16",
}


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, Tensor] = {}


_SCRATCH = _Scratch()


@lru_cache(maxsize=None)
def bnb_cpu_kernel(dtype: torch.dtype):
    """bitsandbytes' native CPU NF4 dequantizer writing into a given buffer, or None where it is missing."""
    if not _bnb_available():
        return None
    try:
        from bitsandbytes.cextension import lib

        return getattr(lib, _BNB_CPU_KERNELS[dtype])
    except Exception:  # a build without the CPU kernels, or a mock library object
        return None


def scratch(numel: int, dtype: torch.dtype) -> Tensor:
    """A flat CPU buffer of `numel` elements owned by this thread; the next call may hand out the same memory."""
    buf = _SCRATCH.buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        _SCRATCH.buffers.pop(dtype, None)  # free the small one before allocating the large one
        buf = _SCRATCH.buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def dequantize_scratch(state: NF4Tensor, dtype: torch.dtype, backend: str = "auto") -> Tensor:
    """dequantize(state, dtype, backend)'s bits in a reused buffer: valid only until the next call.

    For the matmuls of _NF4Matmul, which use the weight at once and keep no reference. Off CPU, or for
    a dtype the kernels lack, it is dequantize().
    """
    if state.device.type != "cpu" or dtype not in _BNB_CPU_KERNELS:
        return dequantize(state, dtype, backend)
    cols = state.shape[-1] if len(state.shape) else 1
    bnb = resolve_backend(backend, state) == "bnb"
    out = decode_blocks(state.packed, dequantize_absmax(state), state.numel // cols, cols, dtype,
                        scratch(state.numel, dtype), bnb)
    return out.view(state.shape)


def decode_blocks(
    packed: Tensor, scales: Tensor, rows: int, cols: int, dtype: torch.dtype, out: Tensor | None, bnb: bool
) -> Tensor:
    """packed uint8 [ceil(rows*cols/2)], scales float32 [ceil(rows*cols/64)] -> [rows, cols] in `dtype`.

    `out`: a flat buffer of rows*cols elements to write into (else a new tensor). bnb: use bitsandbytes'
    native CPU kernel where it exists; only exact when cols % 64 == 0 (resolve_backend decides).
    """
    if out is None:
        out = torch.empty(rows * cols, dtype=dtype, device=packed.device)
    kernel = bnb_cpu_kernel(dtype) if bnb and packed.device.type == "cpu" and rows > 0 else None
    if kernel is None:
        dequantize_4bit_blocks(packed, scales, rows * cols, dtype, out=out)
    else:
        kernel(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(scales.data_ptr()), ctypes.c_void_p(out.data_ptr()),
               ctypes.c_longlong(BLOCKSIZE), ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out.view(rows, cols)


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
        return self.in_features * self.out_features + (self.bias.numel() if self.bias is not None else 0)

    # ------------------------------------------------------------------ compute

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
