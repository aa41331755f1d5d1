"""How NF4 bytes become dense weights: the bitsandbytes and pure-PyTorch backends, and scratch buffers.

Backends, identical to the last bit (tests/test_nf4.py):
- "torch": quant.nf4.dequantize_nf4, the reference, any device, any shape.
- "bnb": bitsandbytes' kernels on a QuantState built from our buffers (nothing copied): on CPU its
  native AVX-512 table lookup, called through ctypes to write into a given buffer. Used only when the
  last dimension is whole 64-blocks: bitsandbytes' CPU kernel indexes absmax per row as
  row * (cols // 64) + col // 64, which is wrong when a block straddles two rows (e.g. [10, 80]).
`DEFAULT_BACKEND` picks "bnb" on CPU and CUDA (measured: benchmarks/NF4_SPEED.md), "torch" elsewhere.

Scratch buffers: on CPU every dequantized weight would be a fresh allocation of up to tens of MiB, made
twice per layer per step and freed at once. Interleaved with the activations autograd keeps, such
blocks fragment glibc's heap (at Qwen2.5-0.5B's shape the resident set grew ~250 MiB above the live
tensors, benchmarks/RESULTS.md), so the 4-bit matmuls dequantize into one buffer per thread and dtype
that the next call overwrites. CUDA's caching allocator already reuses such blocks.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import threading
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from quant.nf4 import (
    BLOCKSIZE,
    SUPPORTED_DTYPES,
    NF4Tensor,
    dequantize_4bit_blocks,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_code,
    nf4_code,
)

DEFAULT_BACKEND: dict[str, str] = {"cpu": "bnb", "cuda": "bnb"}
BACKENDS = ("auto", "torch", "bnb")


def import_bitsandbytes():
    """Import bitsandbytes without its warning about an optional CPU kernel package we do not use."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Imported on first use, after the line above: it is slow to import and warns at import time.
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
    QuantState = import_bitsandbytes().functional.QuantState

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
    dequantize_4bit = import_bitsandbytes().functional.dequantize_4bit

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
def _native_cpu_library() -> ctypes.CDLL | None:
    """bitsandbytes' native CPU library, loaded by path without importing the Python package, or None.

    Importing bitsandbytes pulls in about 1,400 modules (sympy, networkx, jinja2, ...) and costs ~120 MiB
    of resident memory, more than a small model's 4-bit weights; the training matmuls need one C function.
    """
    try:
        spec = importlib.util.find_spec("bitsandbytes")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(folder).glob("libbitsandbytes_cpu.*")):
            try:
                return ctypes.CDLL(str(path))
            except OSError:  # a library built for another platform or missing its dependencies
                continue
    return None


@lru_cache(maxsize=None)
def bnb_cpu_kernel(dtype: torch.dtype):
    """bitsandbytes' native CPU NF4 dequantizer writing into a given buffer, or None where it is missing."""
    lib = _native_cpu_library()
    if lib is None:  # an unusual layout: the library the package itself loads
        if not _bnb_available():
            return None
        from bitsandbytes.cextension import lib
    try:
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
    # NF4's blocks run over the flattened weight, so the native kernel decodes it as one row of `numel`
    # columns: exact whenever the weight is whole blocks, whatever its last dimension (row by row it
    # needs in_features % 64 == 0, which a down_proj of 1,376 inputs is not: the table lookup is ~10x slower)
    bnb = wants_cpu_kernel(backend, state, state.numel)
    cols = state.numel if bnb else (state.shape[-1] if len(state.shape) else 1)
    out = decode_blocks(state.packed, dequantize_absmax(state), state.numel // cols, cols, dtype,
                        scratch(state.numel, dtype), bnb)
    return out.view(state.shape)


def wants_cpu_kernel(backend: str, state: NF4Tensor, cols: int) -> bool:
    """Whether decode_blocks may use bitsandbytes' CPU kernel on `state` decoded `cols` columns per row.

    True when `backend` asks for "bnb" ("auto": DEFAULT_BACKEND's CPU choice) and the kernel is exact there:
    whole 64-blocks per row, a supported dtype. Unlike resolve_backend it imports nothing (decode_blocks
    falls back to the table lookup where the kernel is missing).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    wanted = DEFAULT_BACKEND.get("cpu", "torch") if backend == "auto" else backend
    return wanted == "bnb" and cols % BLOCKSIZE == 0 and state.dtype in SUPPORTED_DTYPES


def decode_blocks(
    packed: Tensor, scales: Tensor, rows: int, cols: int, dtype: torch.dtype, out: Tensor | None, bnb: bool
) -> Tensor:
    """packed uint8 [ceil(rows*cols/2)], scales float32 [ceil(rows*cols/64)] -> [rows, cols] in `dtype`.

    `out`: a flat buffer of rows*cols elements to write into (else a new tensor). bnb: use bitsandbytes'
    native CPU kernel where it exists; only exact when cols % 64 == 0 (wants_cpu_kernel decides).
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


