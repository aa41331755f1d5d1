"""The one adapter loader: any adapter directory, ours or PEFT's, put on a model.

    adapted = load_adapted("Qwen/Qwen2.5-0.5B", "runs/qlora/adapter")   # the base held as trained, adapter on
    adapter = attach(model, "runs/sql/adapter", name="sql")              # onto a base already loaded

Kinds, told apart by adapter_config.json's peft_type: LORA (with DoRA / rsLoRA) goes into the model's
linear layers under a name (lora.load_adapter); PROMPT_TUNING and PREFIX_TUNING become the model's
virtual tokens (prompt.load_virtual_tokens; a model holds one set at a time). The record of how the
base was held while training (models.weight_format, written by train) travels in `Adapter.base`:
`load_adapted` loads a 4-bit base exactly as it was trained on, since re-quantizing from another
dtype would give other 4-bit codes than those the adapter learned against.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora.adapter_io import CONFIG_NAME, load_adapter
from models.checkpoint import load_checkpoint
from models.decoder import Decoder
from models.files import read_json_object
from models.hub import CheckpointError
from models.weight_format import WeightFormat, read_record
from prompt.adapter_io import load_virtual_tokens

KINDS = {"LORA": "lora", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}


@dataclass
class Adapter:
    """An adapter directory as loaded onto a model."""

    name: str  # its name in the model (LoRA layers hold several side by side)
    directory: Path
    kind: str  # "lora", "prompt" or "prefix"
    base: WeightFormat | None  # how the base was held while training; None when not recorded (e.g. PEFT's)
    virtual_tokens: nn.Module | None = None  # prompt / prefix tuning: the module now on model.virtual_tokens


@dataclass
class Adapted:
    """A base model with an adapter on it, as `load_adapted` built it."""

    model: Decoder
    adapter: Adapter | None
    format: WeightFormat  # how the base is held


def adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter directory `path` names: itself, or the `adapter/` inside a training run's output directory."""
    path = Path(path)
    inside = path / "adapter"
    return inside if not (path / CONFIG_NAME).is_file() and (inside / CONFIG_NAME).is_file() else path


def adapter_kind(directory: str | os.PathLike) -> str:
    """"lora", "prompt" or "prefix" from adapter_config.json; CheckpointError naming the file otherwise."""
    directory = adapter_dir(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such adapter directory")
    path = directory / CONFIG_NAME
    peft_type = read_json_object(path).get("peft_type")
    if peft_type not in KINDS:
        raise CheckpointError(f"{path}: peft_type {peft_type!r} is not one of {', '.join(KINDS)}")
    return KINDS[peft_type]


def attach(model: Decoder, directory: str | os.PathLike, name: str = "default") -> Adapter:
    """Put the adapter in `directory` (or in a training run's output directory) on `model` (eval mode) and
    make it the active one.

    LoRA: injected under `name` beside any others. Prompt / prefix tuning: attached as the model's
    virtual tokens, replacing any set before. On an error (CheckpointError naming the file and
    tensor) the model is left as it was.
    """
    directory = adapter_dir(directory)
    kind = adapter_kind(directory)
    base = read_record(directory)
    virtual = None
    if kind == "lora":
        load_adapter(model, directory, adapter_name=name)
    else:
        virtual = load_virtual_tokens(model, directory)
    model.eval()  # new modules start in training mode (LoRA's dropout on)
    return Adapter(name, directory, kind, base, virtual)


def trained_base(directory: str | os.PathLike) -> WeightFormat | None:
    """The 4-bit base a LoRA adapter must run on, from its record; None when any base serves (a
    full-precision LoRA, prompt or prefix tuning, or an adapter made elsewhere). Re-quantizing from another
    dtype would give other 4-bit codes than those the adapter learned against."""
    directory = adapter_dir(directory)
    fmt = read_record(directory) if adapter_kind(directory) == "lora" else None
    return fmt if fmt is not None and fmt.quantize else None


def load_adapted(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> Adapted:
    """Load `base` and put `adapter` (a directory, or None) on it, for inference.

    dtype: the base's dtype (default: the checkpoint's). An adapter trained on a 4-bit base gets the
    base it was trained on (its record's dtype, 4-bit format and compute dtype), whatever `dtype` says.
    """
    fmt = trained_base(adapter) if adapter is not None else None
    if fmt is not None:
        loaded = load_checkpoint(base, device=device, **fmt.load_kwargs())
    else:
        loaded = load_checkpoint(base, dtype=dtype, device=device)
    attached = attach(loaded.model, adapter) if adapter is not None else None
    return Adapted(loaded.model, attached, loaded.format)
