"""Safetensors checkpoints read tensor by tensor: headers checked, shards indexed, bounded memory.

Tensors are read with plain file reads rather than a memory map, so the process never holds the
file's pages and a converted copy at once; a tensor stored in another dtype is converted through a
small staging buffer. Weights are only ever read from safetensors: nothing is unpickled.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from models.hub import CheckpointError

SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class TensorEntry:
    """Where one tensor lives: file, byte range of its data, dtype and shape."""

    file: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a .safetensors header and check every tensor's byte range lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            start, end = (8 + n + int(o) for o in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end}, file has {size}")
        if end - start != nbytes:
            raise CheckpointError(f"{path}: corrupt: tensor {name!r} has {end - start} bytes, shape needs {nbytes}")
        entries[name] = TensorEntry(path, start, end, dtype, shape)
    return entries


def index_checkpoint(model_dir: Path) -> dict[str, TensorEntry]:
    """Tensor name -> entry across all shards (`model.safetensors` or the sharded index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {', '.join(others)}: pickle formats are never loaded; convert to safetensors)" if others else ""
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in the index is missing")
        entries.update(read_safetensors_header(path))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(entries))
        if missing:
            raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but absent from {weight_map[missing[0]]}")
    return entries


READ_CHUNK_BYTES = 16 * 2**20  # staging buffer when a tensor changes dtype while read


def read_tensor(f: BinaryIO, entry: TensorEntry, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Read one tensor from an open file into a new tensor of `dtype` on `device`.

    A tensor stored in another dtype is converted piece by piece on the CPU, so reading a float32
    embedding into bfloat16 peaks at the bfloat16 tensor plus 16 MiB, not at both whole copies.
    """
    f.seek(entry.start)
    if entry.dtype == dtype or device.type != "cpu":
        out = torch.empty(entry.shape, dtype=entry.dtype)
        _read_into(f, out.reshape(-1), entry)
        return out.to(device=device, dtype=dtype)
    out = torch.empty(entry.shape, dtype=dtype)
    flat = out.reshape(-1)
    step = max(1, READ_CHUNK_BYTES // entry.dtype.itemsize)
    staging = torch.empty(min(step, flat.numel()), dtype=entry.dtype)
    for start in range(0, flat.numel(), step):
        piece = staging[: min(step, flat.numel() - start)]
        _read_into(f, piece, entry)
        flat[start : start + piece.numel()] = piece
    return out


def _read_into(f: BinaryIO, flat: torch.Tensor, entry: TensorEntry) -> None:
    """Fill the contiguous 1-D tensor `flat` with the next bytes of `f`."""
    buf = flat.view(torch.uint8).numpy() if flat.numel() else bytearray()
    if f.readinto(memoryview(buf)) != len(buf):
        raise CheckpointError(f"{entry.file}: truncated while reading a tensor")


class SafetensorsSource:
    """The tensors of a checkpoint directory (one safetensors file or shards), read one at a time.

    GGUFTensors (models.gguf) is the other source; both offer where, names(), shape(name),
    file_of(name), read(name, dtype, device), close(), and are context managers.
    """

    def __init__(self, model_dir: Path) -> None:
        self.entries = index_checkpoint(model_dir)
        index = model_dir / "model.safetensors.index.json"
        self.where = index if index.exists() else model_dir / "model.safetensors"
        self.ignored: list[str] = []
        self._handles: dict[Path, BinaryIO] = {}

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def file_of(self, name: str) -> Path:
        return self.entries[name].file

    def read(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        entry = self.entries[name]
        f = self._handles.get(entry.file) or self._handles.setdefault(entry.file, open(entry.file, "rb"))
        return read_tensor(f, entry, dtype, device)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
