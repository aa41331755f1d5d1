"""WeightFormat: how a base model's weights are held in memory, and its record beside an adapter.

An adapter is trained against the base exactly as it was held: a QLoRA adapter against 4-bit weights
quantized from a particular dtype, possibly with a 4-bit embedding and head. To compute what was
trained, generation, serving and merging must load the base the same way, so the adapter directory
carries that fact in a small file of ours (PEFT never reads it; an extra key in adapter_config.json
would make PEFT warn):

    lora_training.json   {"base_quantization": "nf4" | null, "base_dtype": "bfloat16",
                          "compute_dtype": "bfloat16", "quantized_embeddings": true, ...}

compute_dtype appears only for a 4-bit base, quantized_embeddings only when true; other keys (the
caller's extras) are kept as they are. An adapter made elsewhere has no record: `read_record` gives
None and the caller loads the base as it likes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.config import dtype_from_name
from models.files import atomic_write, read_json_object
from models.hub import CheckpointError

RECORD_NAME = "lora_training.json"
QUANTIZATIONS = ("nf4",)


@dataclass(frozen=True)
class WeightFormat:
    """What `models.load_pretrained` was asked for, resolved: enough to load the same base again."""

    dtype: torch.dtype  # full-precision tensors; also the dtype 4-bit weights were quantized from
    quantize: str | None = None  # "nf4": the decoder blocks' linear layers are 4-bit
    compute_dtype: torch.dtype | None = None  # dtype the 4-bit weights dequantize to (4-bit only)
    quantize_embeddings: bool = False  # the embedding and output head are 4-bit too (4-bit only)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of models.load_pretrained that load a base held this way."""
        return {"dtype": self.dtype, "quantize": self.quantize, "compute_dtype": self.compute_dtype,
                "quantize_embeddings": self.quantize_embeddings}

    def to_record(self) -> dict[str, Any]:
        """The lora_training.json fields."""
        record: dict[str, Any] = {"base_quantization": self.quantize, "base_dtype": _name(self.dtype)}
        if self.quantize:
            record["compute_dtype"] = _name(self.compute_dtype)
        if self.quantize_embeddings:
            record["quantized_embeddings"] = True
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], where: Path | str) -> WeightFormat | None:
        """The format in a record (None when it names no base dtype); CheckpointError naming `where` if malformed."""
        quantize = record.get("base_quantization")
        if quantize not in (None, *QUANTIZATIONS):
            raise CheckpointError(f"{where}: base_quantization must be null or one of {QUANTIZATIONS}, got {quantize!r}")
        try:
            dtype = dtype_from_name(record.get("base_dtype"))
            compute = dtype_from_name(record.get("compute_dtype"))
        except ValueError as err:
            raise CheckpointError(f"{where}: {err}") from None
        if dtype is None:
            return None
        return cls(dtype, quantize, compute if quantize else None, bool(quantize and record.get("quantized_embeddings")))


def _name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def write_record(directory: str | os.PathLike, fmt: WeightFormat, extra: dict[str, Any] | None = None) -> Path:
    """Write lora_training.json into `directory`: `extra` fields plus `fmt`'s (which win)."""
    path = Path(directory) / RECORD_NAME
    record = {**(extra or {}), **fmt.to_record()}
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(record, indent=2) + "\n"))
    return path


def read_record(directory: str | os.PathLike) -> WeightFormat | None:
    """The format recorded in `directory`, or None for an adapter made elsewhere (no record file)."""
    path = Path(directory) / RECORD_NAME
    return WeightFormat.from_record(read_json_object(path), path) if path.is_file() else None
