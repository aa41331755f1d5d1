"""GGUF files (llama.cpp's format) as checkpoints: their config, and their tensors under our names.

(About 450 lines: the format's config keys, tensor names and reading are one concept; the tokenizer is
models.gguf_tokenizer.)

A GGUF file holds everything a Hugging Face directory spreads over config.json, model.safetensors
and the tokenizer files: metadata under llama.cpp's key names (`llama.block_count`, ...) and tensors
under llama.cpp's names (`blk.0.attn_q.weight`, ...), most of them quantized in blocks. The `gguf`
package (from llama.cpp) parses the file and dequantizes the blocks; this module maps what it reads
onto a config.json-style dict (for ModelConfig.from_hf_dict) and onto our (= Hugging Face's) tensor
names, and undoes the one layout change llama.cpp's converter makes:

    q/k rows: for the llama architecture (which is also how Mistral models are stored),
    convert_hf_to_gguf.py reorders each head's rows of q_proj and k_proj (weight and bias) from
    rotate-half order (first half of the head, then second half) to interleaved pairs, the order
    llama.cpp's rope kernel wants. qwen2 and qwen3 files are written without this permutation.

Llama 3.x rope scaling is not in the metadata: the converter stores the per-frequency divisors in a
tensor, `rope_freqs.weight` [head_dim / 2]; `llama3_rope_scaling` recovers Hugging Face's parameters
from it. A llama file with `llama.attention.sliding_window` is a Mistral model (model_type mistral). Tensor data is read with plain file reads, a bounded number of rows at a time (never
through a memory map), so loading never holds the file's pages and a dequantized float32 copy of a
whole tensor at once.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from models.config import ModelConfig
from models.hub import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
READ_CHUNK_BYTES = 16 * 2**20  # float32 rows dequantized per step
_FLOAT_TYPES = {GGMLQuantizationType.F16: "float16", GGMLQuantizationType.BF16: "bfloat16"}

# Our (Hugging Face's) names <-> llama.cpp's: whole-model tensors, then the per-block suffixes.
_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_FROM_GGUF_BLOCK = {v: k for k, v in _BLOCK_NAMES.items()}
_FROM_GGUF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_CONSUMED = ("rope_freqs.weight",)  # tensors that become config, not parameters


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a GGUF file and how it is stored."""

    name: str  # llama.cpp's name, e.g. "blk.0.attn_q.weight"
    qtype: GGMLQuantizationType  # F32, F16, BF16, Q8_0, Q4_K, ...
    shape: tuple[int, ...]  # PyTorch order (GGUF's ne reversed): [out, in] for a linear weight
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, tensors by llama.cpp name."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, suffix: str, default: Any = None) -> Any:
        """The architecture's own key, e.g. get("block_count") reads "llama.block_count"."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def require(self, suffix: str) -> Any:
        value = self.get(suffix)
        if value is None:
            raise CheckpointError(f"{self.path}: missing GGUF metadata key {self.architecture}.{suffix!r}")
        return value


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (by its suffix; its content is checked when read)."""
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the metadata and tensor table of a GGUF file (cached while the file is unchanged)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    return _read_gguf_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size, path)


@lru_cache(maxsize=4)
def _read_gguf_cached(resolved: str, mtime_ns: int, size: int, path: Path) -> GGUFFile:
    with open(resolved, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = GGUFReader(resolved)
    except Exception as err:  # the reader raises ValueError, IndexError, ... on malformed bytes
        detail = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({detail})") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: a big-endian GGUF file; only little-endian files are supported")
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: _tensor_info(t) for t in reader.tensors}
    for info in tensors.values():
        if info.offset + info.nbytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {info.name!r} ends at byte "
                                  f"{info.offset + info.nbytes}, the file has {size}")
    return GGUFFile(path, metadata, tensors)


def _tensor_info(t: Any) -> TensorInfo:
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    return TensorInfo(t.name, GGMLQuantizationType(t.tensor_type), shape, int(t.data_offset), int(t.n_bytes))


# --------------------------------------------------------------------------------------------- config
def gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file; CheckpointError naming the file if it is not one we can run."""
    g = read_gguf(path)
    d = hf_config_dict(g)
    try:
        return ModelConfig.from_hf_dict(d)
    except CheckpointError as err:
        raise CheckpointError(f"{g.path}: {err}") from None


def hf_config_dict(g: GGUFFile) -> dict[str, Any]:
    """The config.json that Hugging Face would have for this file (llama / mistral / qwen2 / qwen3)."""
    _check_architecture(g)
    d = _sizes(g)
    window = g.get("attention.sliding_window")
    # llama.cpp stores Mistral models as "llama"; a sliding window is what only Mistral of the two has.
    d["model_type"] = "mistral" if g.architecture == "llama" and window else g.architecture
    if window:
        d["sliding_window"] = int(window)
    d.update(_token_ids(g), **_biases(g), hidden_act="silu", torch_dtype=_stored_dtype(g),
             tie_word_embeddings="output.weight" not in g.tensors)
    scaling = _rope_scaling(g, d["rope_theta"], d["head_dim"])
    if scaling is not None:
        d["rope_scaling"] = scaling
    return d


def _sizes(g: GGUFFile) -> dict[str, Any]:
    """Widths, counts, epsilon, rope base and context length."""
    heads = int(g.require("attention.head_count"))
    hidden = int(g.require("embedding_length"))
    head_dim = int(g.get("attention.key_length") or hidden // heads)
    _check_head_dims(g, head_dim)
    return {
        "vocab_size": _tensor(g, "token_embd.weight").shape[0],
        "hidden_size": hidden,
        "intermediate_size": int(g.require("feed_forward_length")),
        "num_hidden_layers": int(g.require("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": _kv_heads(g, heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_value(g.require("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(g.get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g.get("context_length", 4096)),
    }


def _float32_value(value: float) -> float:
    """The shortest decimal that a float32 metadata value rounds from: 1e-05, not 9.999999747378752e-06."""
    return float(np.format_float_scientific(np.float32(value), unique=True))


def _check_architecture(g: GGUFFile) -> None:
    if g.architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{g.path}: unsupported GGUF architecture {g.architecture!r}: supported are "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mistral models are stored as llama)")
    if g.get("expert_count") or any("_exps." in name for name in g.tensors):
        raise CheckpointError(f"{g.path}: a mixture-of-experts model; only dense decoders are supported")


def _check_head_dims(g: GGUFFile, head_dim: int) -> None:
    value_dim = g.get("attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise CheckpointError(f"{g.path}: value head width {value_dim} differs from the key's {head_dim}")
    rotary = g.get("rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise CheckpointError(f"{g.path}: rope over {rotary} of {head_dim} head dimensions (partial rotary) "
                              "is not supported")


def _kv_heads(g: GGUFFile, heads: int) -> int:
    value = g.get("attention.head_count_kv", heads)
    if isinstance(value, list):  # per-layer counts: fine only if all equal
        if len(set(value)) != 1:
            raise CheckpointError(f"{g.path}: per-layer key/value head counts {sorted(set(value))} are not supported")
        value = value[0]
    return int(value)


def _tensor(g: GGUFFile, name: str) -> TensorInfo:
    if name not in g.tensors:
        raise CheckpointError(f"{g.path}: missing tensor {name!r}")
    return g.tensors[name]


def _stored_dtype(g: GGUFFile) -> str | None:
    """float16 / bfloat16 when every matrix is stored so; None (float32) for F32 and quantized files."""
    kinds = {info.qtype for info in g.tensors.values() if len(info.shape) > 1}
    return _FLOAT_TYPES.get(kinds.pop()) if len(kinds) == 1 else None


def _token_ids(g: GGUFFile) -> dict[str, int]:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    found = {ours: g.metadata.get(f"tokenizer.ggml.{theirs}") for ours, theirs in keys.items()}
    return {k: int(v) for k, v in found.items() if v is not None}


def _biases(g: GGUFFile) -> dict[str, bool]:
    """llama's attention_bias / mlp_bias switches, from which bias tensors block 0 has."""
    if g.architecture != "llama":
        return {}  # qwen2's q/k/v biases and qwen3's lack of them follow from the model type
    has = {name.split(".")[2] for name in g.tensors if name.startswith("blk.0.") and name.endswith(".bias")}
    return {"attention_bias": "attn_q" in has, "mlp_bias": "ffn_gate" in has}


def _rope_scaling(g: GGUFFile, theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = g.get("rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_value(g.require("rope.scaling.factor"))}
    if kind not in (None, "none"):
        raise CheckpointError(f"{g.path}: rope scaling {kind!r} is not supported (only linear and Llama 3's)")
    if "rope_freqs.weight" not in g.tensors:
        return None
    with GGUFTensors(g) as source:
        factors = source.read_raw("rope_freqs.weight").double()
    return llama3_rope_scaling(factors, theta, head_dim, g.path)


# Llama 3's own values; tried first so that a real Llama 3.x file gets back its exact config.
_LLAMA3_LOW, _LLAMA3_HIGH = 1.0, 4.0


def llama3_rope_scaling(factors: torch.Tensor, theta: float, head_dim: int, path: Path) -> dict[str, Any] | None:
    """Hugging Face's llama3 rope parameters that give the frequency divisors `factors` [head_dim/2].

    llama.cpp divides frequency i by factors[i]; Llama 3 scaling divides it by 1 at short wavelengths,
    by `factor` at long ones, and in between by 1 / ((1 - s) / factor + s) with
    s = (L / wavelength - low) / (high - low), L the original context. So s is a line in 1/wavelength,
    clipped to [0, 1]: only its slope L / (high - low) and offset low / (high - low) are determined by
    the factors. Llama 3's low = 1, high = 4 are tried first; otherwise low = 1 and a fitted line.
    """
    factors = factors.double()
    if torch.allclose(factors, torch.ones_like(factors)):
        return None
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if factors.shape != inv_freq.shape:
        raise CheckpointError(f"{path}: rope_freqs.weight has {factors.numel()} entries, "
                              f"the heads need {inv_freq.numel()}")
    factor = float(factors.max())
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 1 where unscaled, 0 where divided by `factor`
    for slope, offset in _llama3_line_candidates(x, s):
        if offset <= 0 or slope <= 0:
            continue
        params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": _LLAMA3_LOW,
                  "high_freq_factor": _LLAMA3_LOW + _LLAMA3_LOW / offset,
                  "original_max_position_embeddings": slope / offset * _LLAMA3_LOW}
        params = _rounded(params)
        if torch.allclose(_llama3_divisors(inv_freq, params), factors, rtol=1e-6, atol=0):
            return params
    raise CheckpointError(f"{path}: rope_freqs.weight is not a Llama 3 rope scaling (no parameters reproduce it)")


def _llama3_line_candidates(x: torch.Tensor, s: torch.Tensor):
    """(slope, offset) pairs of s = slope * x - offset to try: Llama 3's offset 1/3, then a free fit."""
    tol = 1e-6
    medium = (s > tol) & (s < 1 - tol)
    high, low = x[s >= 1 - tol], x[s <= tol]
    third = _LLAMA3_LOW / (_LLAMA3_HIGH - _LLAMA3_LOW)
    if medium.any():  # slope from the blended frequencies, with Llama 3's offset
        yield float(((s[medium] + third) / x[medium]).mean()), third
    else:  # L = 8192 (all Llama 3.x), if the unblended split allows it
        yield 8192 / (_LLAMA3_HIGH - _LLAMA3_LOW), third
    if int(medium.sum()) >= 2:  # least squares over the blended frequencies
        a = torch.stack([x[medium], -torch.ones_like(x[medium])], dim=1)
        slope, offset = torch.linalg.lstsq(a, s[medium].unsqueeze(1)).solution.squeeze(1).tolist()
        yield slope, offset
    elif len(high) and len(low):  # any line through the point(s) that keeps both ends on their side
        xm, sm = (float(x[medium][0]), float(s[medium][0])) if medium.any() else (float(low.max()), 0.0)
        slope = max((1 - sm) / (float(high.min()) - xm), sm / (xm - float(low.max())) if xm > low.max() else 0.0)
        yield slope, slope * xm - sm


def _rounded(params: dict[str, Any]) -> dict[str, Any]:
    """Snap values that are integers or simple fractions up to float noise (8191.9999 -> 8192)."""
    out = dict(params)
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        near = round(out[key] * 4) / 4
        if abs(out[key] - near) <= 1e-6 * max(1.0, abs(near)):
            out[key] = near
    if float(out["original_max_position_embeddings"]).is_integer():
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


def _llama3_divisors(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """inv_freq / (Hugging Face's llama3-scaled inv_freq), in float64."""
    factor, low, high, ctx = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                              p["original_max_position_embeddings"])
    s = ((ctx * inv_freq / (2 * math.pi)) - low) / (high - low)
    return 1 / ((1 - s.clamp(0, 1)) / factor + s.clamp(0, 1))


# ------------------------------------------------------------------------------------------- tensors
def to_gguf_name(name: str) -> str | None:
    """Our tensor name -> llama.cpp's ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    module, _, kind = name.rpartition(".")
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{kind}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"blk.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{kind}"
    return None


def from_gguf_name(name: str) -> str | None:
    """llama.cpp's tensor name -> ours, or None for a tensor we have no parameter for."""
    module, _, kind = name.rpartition(".")
    if module in _FROM_GGUF_GLOBAL:
        return f"{_FROM_GGUF_GLOBAL[module]}.{kind}"
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _FROM_GGUF_BLOCK:
        return f"model.layers.{m.group(1)}.{_FROM_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


class GGUFTensors:
    """The tensors of a GGUF file under our names, read one at a time: dequantized, q/k rows restored.

    The same interface as the safetensors source in models.checkpoint: `where` (the file to name in
    errors), names(), shape(name), file_of(name), read(name, dtype, device), close(); a context
    manager. `ignored` lists the file's tensors that no parameter takes.
    """

    def __init__(self, g: GGUFFile, num_heads: int = 0, num_kv_heads: int = 0) -> None:
        self.where = g.path
        self._g = g
        self._names = {ours: info for info in g.tensors.values()
                       if (ours := from_gguf_name(info.name)) is not None}
        for info in self._names.values():  # refuse an unreadable file before reading any of it
            check_dequantizable(self.where, info)
        self.ignored = [n for n in g.tensors if from_gguf_name(n) is None and n not in _CONSUMED]
        # llama.cpp interleaved the rows of each q and k head for the llama architecture only
        self._heads = {"q_proj": num_heads, "k_proj": num_kv_heads} if g.architecture == "llama" else {}
        self._file: BinaryIO | None = None

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._names[name].shape

    def file_of(self, name: str) -> Path:
        return self.where

    def read(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Tensor `name` (ours) dequantized to `dtype` on `device`, in Hugging Face's row order."""
        tensor = self._dequantized(self._names[name], dtype)
        heads = self._heads.get(name.split(".")[-2], 0)
        if heads:
            tensor = unpermute_qk(tensor, heads)
        return tensor.to(device)

    def read_raw(self, gguf_name: str) -> torch.Tensor:
        """A tensor by llama.cpp's name, dequantized to float32 as stored (e.g. rope_freqs.weight)."""
        return self._dequantized(_tensor(self._g, gguf_name), torch.float32)

    def _dequantized(self, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize `info` into a new CPU tensor of `dtype`, a bounded number of rows at a time."""
        out = torch.empty(info.shape, dtype=dtype)
        rows = out.view(-1, info.shape[-1])  # [R, C]: GGUF quantizes along C in whole blocks
        n_rows, row_bytes = rows.shape[0], info.nbytes // rows.shape[0]
        step = max(1, READ_CHUNK_BYTES // (4 * info.shape[-1]))
        buf = np.empty((min(step, n_rows), row_bytes), dtype=np.uint8)
        f = self._open()
        f.seek(info.offset)
        for start in range(0, n_rows, step):
            chunk = buf[: min(step, n_rows - start)]
            if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise CheckpointError(f"{self.where}: truncated while reading tensor {info.name!r}")
            rows[start : start + len(chunk)] = torch.from_numpy(dequantize(chunk, info.qtype))
        return out

    def _open(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.where, "rb")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> GGUFTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's q/k row order: w [n_heads * D, ...] with each head's rows as
    interleaved pairs (0, D/2, 1, D/2+1, ...) -> rotate-half order (0, 1, ..., D-1)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_dequantizable(path: Path, info: TensorInfo) -> None:
    """CheckpointError naming the file and tensor if the gguf package has no dequantizer for its type."""
    if not _can_dequantize(info.qtype):
        raise CheckpointError(f"{path}: tensor {info.name!r} is stored as {info.qtype.name}, "
                              "which the gguf package cannot dequantize")


@lru_cache(maxsize=None)
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf.quants.dequantize handles `qtype` (tried on one all-zero block)."""
    _, size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):  # integer and F64 tensors, types with no Python kernel
        return False
    return True
