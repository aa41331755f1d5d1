"""NF4 4-bit quantization with double quantization, as pure functions, bit-exact with bitsandbytes.

Format (bitsandbytes `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`):

    w [*shape], n = w.numel() elements, flattened in row-major order
    blocks of 64 consecutive elements:   absmax[b] = max |w| in block b             float32 [ceil(n/64)]
    each element:                        code = nearest NF4 value to w / absmax[b]  4 bits
    two codes per byte:                  byte = (code[2i] << 4) | code[2i+1]        uint8 [ceil(n/2)]
    double quantization of the absmax:   offset = mean(absmax)                      float32 []
                                         absmax - offset -> 8-bit "dynamic" codes   uint8 [ceil(n/64)]
                                         in blocks of 256, with their own absmax    float32 [ceil(n/16384)]

    dequantize:  absmax[b] = DYNAMIC[qabsmax[b]] * nested_absmax[b // 256] + offset   (float32)
                 w[i]      = NF4[code[i]] * absmax[i // 64]   (float32, then one rounding to dtype)

Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per element, plus 4 bytes of offset (exactly, when n is
a multiple of 64*256; see `nf4_nbytes`).

Facts taken from bitsandbytes 0.50 (functional.py, backends/default/ops.py, csrc/cpu_ops.cpp) that
matter for bit-exactness; each is reproduced below, not improved on:
- 4-bit codes: the scale is applied as `w * (1/absmax)` for full blocks but as `w / absmax` for a
  partial last block; the code is found by comparing with float32 midpoints of neighbouring NF4
  values, a value exactly on a midpoint taking the lower code. absmax is clamped to >= 1e-38 before
  scaling, but only the partial last block *stores* the clamped value (an all-zero full block
  stores 0, an all-zero tail block stores 1e-38).
- Odd n: the packed tensor gets one extra nibble, the code of 0.0 (7), in the low half of the last byte.
- The 8-bit quantization of the absmax on CPU is not nearest-value: bitsandbytes maps the scaled value
  to one of 65536 evenly spaced bins over [-1, 1] and takes the code nearest to the bin's value (a
  lookup table), which differs from true nearest for about 0.1 % of inputs. An all-zero block gets
  code 0 (a code of -0.993, times an absmax of 0). Like the 4-bit level, full blocks scale by the
  reciprocal of their absmax. CUDA uses exact nearest instead, so quantizing on
  CPU and on GPU with bitsandbytes can differ; we always produce the CPU bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Quantiles of N(0, 1) rescaled to [-1, 1] (QLoRA, appendix E), exactly as bitsandbytes lists them.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_ZERO_CODE = NF4_VALUES.index(0.0)

# Elements quantized per step: bounds the float32 temporaries (~4 x 16 MiB) for huge layers.
_CHUNK = BLOCKSIZE * 65536
# Elements dequantized per step on CPU (float32 temporaries of 1 MiB stay in L2).
_DEQUANT_CHUNK = 1 << 18
# Bins of bitsandbytes' CPU 8-bit quantizer lookup table over [-1, 1].
_LUT_BINS = 65536


@dataclass(frozen=True)
class NF4Tensor:
    """A weight in NF4 with double-quantized absmax; every tensor lives on the same device.

    packed:         uint8 [ceil(n/2)]            two 4-bit codes per byte, first element in the high nibble
    absmax_q:       uint8 [ceil(n/64)]           per-64-block absmax, 8-bit dynamic codes of (absmax - offset)
    nested_absmax:  float32 [ceil(n/64/256)]     scale of each 256-block of absmax_q
    offset:         float32 []                   mean of the float32 absmax, added back after dequantizing
    shape, dtype:   of the original weight (dtype: the default dequantization dtype)
    """

    packed: Tensor
    absmax_q: Tensor
    nested_absmax: Tensor
    offset: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = BLOCKSIZE
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the four tensors (the shared code tables are not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax_q, self.nested_absmax, self.offset))


def nf4_nbytes(numel: int) -> int:
    """Exact storage of an NF4Tensor of `numel` elements, in bytes.

    ceil(n/2) + ceil(n/64) + 4*ceil(n/(64*256)) + 4; for n a multiple of 16384 this is
    n * (1/2 + 1/64 + 4/16384) + 4, i.e. 4.127 bits per element plus the float32 offset.
    """
    blocks = -(-numel // BLOCKSIZE)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4


# ---------------------------------------------------------------------- code tables


@lru_cache(maxsize=None)
def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The 16 NF4 values, float32 [16], index = 4-bit code."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def _nf4_pair_table(device: torch.device | str = "cpu") -> Tensor:
    """float32 [256, 2]: byte -> (value of its high nibble, value of its low nibble)."""
    code = nf4_code(device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


@lru_cache(maxsize=None)
def _nf4_midpoints(device: torch.device | str = "cpu") -> Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


@lru_cache(maxsize=None)
def dynamic_code(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), sorted float32 [256].

    For exponent e = 0..6: 2^e fraction steps between 0.1 and 1 (midpoints of an evenly spaced grid),
    times 10^(e-6), with both signs; plus 0 and 1. The arithmetic (float32 linspace and products)
    follows bitsandbytes so that every value is the same float32.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (e - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device | str = "cpu") -> Tensor:
    """uint8 [65536]: bin i (value -1 + 2i/65535, float32) -> index of the nearest dynamic code, ties low."""
    code = dynamic_code(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = torch.arange(_LUT_BINS, dtype=torch.float32, device=device)
    centre = -1.0 + (2.0 * bins) / (_LUT_BINS - 1)
    return torch.searchsorted(midpoints, centre, right=False).to(torch.uint8)


# ---------------------------------------------------------------------- 4-bit level


def _nf4_codes(x: Tensor, tail: bool) -> tuple[Tensor, Tensor]:
    """Codes for float32 `x` [k*64 (+ partial tail block if `tail`)] -> (codes int32 [len], absmax float32 [blocks])."""
    full = x.numel() - x.numel() % BLOCKSIZE if tail else x.numel()
    blocks = x[:full].view(-1, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    scaled = [(blocks * torch.reciprocal(absmax.clamp(min=1e-38))[:, None]).view(-1)]
    if full < x.numel():
        # bitsandbytes divides here instead of multiplying by the reciprocal, and stores the clamped max.
        tail_max = x[full:].abs().amax().clamp(min=1e-38)
        scaled.append(x[full:] / tail_max)
        absmax = torch.cat([absmax, tail_max[None]])
    scaled_all = torch.cat(scaled) if len(scaled) > 1 else scaled[0]
    codes = torch.bucketize(scaled_all.clamp_(-1, 1), _nf4_midpoints(x.device), out_int32=True)
    return codes, absmax


def pack_nibbles(codes: Tensor) -> Tensor:
    """int [k] codes in 0..15 -> uint8 [ceil(k/2)], element 2i in the high nibble; odd k padded with code 7."""
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_4bit_blocks(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [*] (float32/bf16/fp16) -> (packed uint8 [ceil(n/2)], absmax float32 [ceil(n/64)]).

    Works through the flattened weight `_CHUNK` elements at a time so that the float32 copy and the
    code temporaries of one chunk, not of the whole layer, are what quantizing costs in memory.
    """
    flat = w.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // BLOCKSIZE), dtype=torch.float32, device=w.device)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        codes, chunk_absmax = _nf4_codes(flat[start:stop].float(), tail=stop == n)
        packed[start // 2 : -(-stop // 2)] = pack_nibbles(codes)
        absmax[start // BLOCKSIZE : start // BLOCKSIZE + chunk_absmax.numel()] = chunk_absmax
    return packed, absmax


def dequantize_4bit_blocks(
    packed: Tensor, absmax: Tensor, numel: int, dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """packed uint8 [ceil(n/2)], absmax float32 [ceil(n/64)] -> flat [n] in `dtype` (into `out` if given).

    Value times scale in float32, then a single round-to-nearest-even to `dtype`, as bitsandbytes does
    (torch.mul into a lower-precision `out` computes in float32 and rounds once). On CPU the work is
    done in chunks that stay in cache: about 2x faster than one pass over the layer (measured).
    """
    table = _nf4_pair_table(packed.device)
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    full = numel - numel % BLOCKSIZE
    chunk = _DEQUANT_CHUNK if packed.device.type == "cpu" else max(full, BLOCKSIZE)
    for start in range(0, full, chunk):
        stop = min(start + chunk, full)
        values = table.index_select(0, packed[start // 2 : stop // 2].to(torch.int32)).view(-1, BLOCKSIZE)
        torch.mul(values, absmax[start // BLOCKSIZE : stop // BLOCKSIZE, None], out=out[start:stop].view(-1, BLOCKSIZE))
    if full < numel:
        values = table.index_select(0, packed[full // 2 :].to(torch.int32)).view(-1)[: numel - full]
        torch.mul(values, absmax[-1], out=out[full:])
    return out


# ---------------------------------------------------------------------- 8-bit level (the absmax)


def quantize_blockwise_8bit(x: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """float32 x [k] -> (codes uint8 [k], absmax float32 [ceil(k/blocksize)]), bitsandbytes' CPU rule.

    scaled = x * (1/absmax) clamped to [-1, 1]; bin = trunc((scaled + 1) * 0.5 * 65535 + 0.5) in
    float32; code = lookup[bin]. Whether the C++ compiler fuses `t * 65535 + 0.5` into an FMA does not
    change any bin: t = (scaled + 1) / 2 has no bits below 2^-25, and for such t one rounding or two
    truncate to the same integer (checked against bitsandbytes at every bin edge in the tests).
    """
    k = x.numel()
    blocks = -(-k // blocksize)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * blocksize - k)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    # An all-zero block gives 0 * inf = NaN; bitsandbytes writes code 0 there, which is where -1 lands.
    scaled = (padded * torch.reciprocal(absmax)[:, None]).nan_to_num_(nan=-1.0).clamp_(-1, 1)
    bins = (((scaled + 1.0) * 0.5) * (_LUT_BINS - 1) + 0.5).to(torch.int64)
    return _dynamic_lut(x.device)[bins].view(-1)[:k], absmax


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> Tensor:
    """uint8 codes [k], float32 absmax [ceil(k/blocksize)] -> float32 [k] = DYNAMIC[code] * absmax[block]."""
    k = codes.numel()
    values = dynamic_code(codes.device)[codes.to(torch.int64)]
    values = torch.nn.functional.pad(values, (0, absmax.numel() * blocksize - k))
    return (values.view(-1, blocksize) * absmax[:, None]).view(-1)[:k]


# ---------------------------------------------------------------------- the public pair


def quantize_nf4(w: Tensor) -> NF4Tensor:
    """Quantize a float32/bfloat16/float16 tensor to NF4 with double-quantized absmax.

    w: any shape, n > 0 elements. Returns an NF4Tensor on w's device that keeps no reference to w.
    """
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"quantize_nf4: expected one of {SUPPORTED_DTYPES}, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("quantize_nf4: cannot quantize an empty tensor")
    packed, absmax = quantize_4bit_blocks(w)
    offset = absmax.mean()
    absmax_q, nested_absmax = quantize_blockwise_8bit(absmax - offset)
    return NF4Tensor(packed, absmax_q, nested_absmax, offset, torch.Size(w.shape), w.dtype)


def dequantize_absmax(state: NF4Tensor) -> Tensor:
    """The per-64-block scales the weights are computed with, float32 [ceil(n/64)]."""
    return dequantize_blockwise_8bit(state.absmax_q, state.nested_absmax, state.nested_blocksize) + state.offset


def dequantize_nf4(state: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """NF4Tensor -> dense tensor [*state.shape] in `dtype` (default: the original dtype)."""
    dtype = dtype or state.dtype
    flat = dequantize_4bit_blocks(state.packed, dequantize_absmax(state), state.numel, dtype)
    return flat.view(state.shape)
