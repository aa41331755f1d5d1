"""The one adapter loader: any adapter directory, ours or PEFT's, put on a model.

    adapted = load_adapted("Qwen/Qwen2.5-0.5B", "runs/qlora/adapter")   # the base held as trained, adapter on
    adapter = attach(model, "runs/sql/adapter", name="sql")              # onto a base already loaded

Kinds, told apart by adapter_config.json's peft_type: LORA (with DoRA / rsLoRA) goes into the model's
linear layers under a name (lora.read_adapter_tensors + lora.install_adapter); PROMPT_TUNING and
PREFIX_TUNING become the model's virtual tokens (prompt.load_virtual_tokens; a model holds one set at a
time). The record of how the base was held while training (models.weight_format, written by train)
travels in `Adapter.base`: `load_adapted` loads a 4-bit base exactly as it was trained on, since
re-quantizing from another dtype would give other 4-bit codes than those the adapter learned against.

Loading is two steps so that a server can load while it decodes: `prepare` reads and checks the files
and builds the tensors without changing the model; `install` puts them on it (a few module insertions
and device-local copies), the only part that must not overlap a forward. `attach` does both.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora.adapter_io import CONFIG_NAME, install_adapter, read_adapter_config, read_adapter_tensors
from lora.inject import LoraConfig
from models.checkpoint import load_checkpoint
from models.config import dtype_from_name
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
class Prepared:
    """An adapter read from disk and checked, not yet on the model (`prepare` -> `install`)."""

    adapter: Adapter
    config: LoraConfig | None = None  # LoRA: the layers to inject
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA: adapter_parameters key -> value, on the device


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


def prepare(model: Decoder, directory: str | os.PathLike, name: str = "default") -> Prepared:
    """Read the adapter in `directory` for `model` without changing `model` (safe while it runs forwards):
    LoRA weights are read onto the model's device, a prompt/prefix module is built and filled.
    CheckpointError naming the file on anything malformed."""
    directory = adapter_dir(directory)
    kind = adapter_kind(directory)
    adapter = Adapter(name, directory, kind, read_record(directory))
    if kind != "lora":
        adapter.virtual_tokens = _virtual_tokens(model, directory)
        return Prepared(adapter)
    config = read_adapter_config(directory, name)
    return Prepared(adapter, config, read_adapter_tensors(directory, _device(model)))


def install(model: Decoder, prepared: Prepared) -> Adapter:
    """Put a prepared adapter on `model` (eval mode) and make it the active one. LoRA: injected under its
    name beside any others; prompt / prefix tuning: the model's virtual tokens, replacing any set before.
    On an error the model is left as it was."""
    adapter = prepared.adapter
    if adapter.kind == "lora":
        install_adapter(model, prepared.config, prepared.tensors, adapter.directory)
    else:
        model.virtual_tokens = adapter.virtual_tokens
    model.eval()  # new modules start in training mode (LoRA's dropout on)
    return adapter


def attach(model: Decoder, directory: str | os.PathLike, name: str = "default") -> Adapter:
    """Put the adapter in `directory` (or in a training run's output directory) on `model` (eval mode) and
    make it the active one: `install(model, prepare(...))`.

    LoRA: injected under `name` beside any others. Prompt / prefix tuning: attached as the model's
    virtual tokens, replacing any set before. On an error (CheckpointError naming the file and
    tensor) the model is left as it was.
    """
    return install(model, prepare(model, directory, name))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _virtual_tokens(model: Decoder, directory: Path) -> nn.Module:
    """The prompt/prefix module of `directory`, built by prompt.load_virtual_tokens on a shallow copy of
    `model`: the copy shares every weight but has its own table of submodules, so the module it attaches
    never appears on `model` itself (which may be running another adapter's virtual tokens)."""
    shell = copy.copy(model)
    shell._modules = dict(model._modules)
    return load_virtual_tokens(shell, directory)


def trained_base(directory: str | os.PathLike) -> WeightFormat | None:
    """The 4-bit base a LoRA adapter must run on, from its record; None when any base serves (a
    full-precision LoRA, prompt or prefix tuning, or an adapter made elsewhere). Re-quantizing from another
    dtype would give other 4-bit codes than those the adapter learned against."""
    directory = adapter_dir(directory)
    fmt = read_record(directory) if adapter_kind(directory) == "lora" else None
    return fmt if fmt is not None and fmt.quantize else None


def describe(fmt: WeightFormat) -> str:
    """A base format in words, for messages: "nf4 quantized from bfloat16 (compute bfloat16)", "float32"."""
    name = lambda d: str(d).removeprefix("torch.")
    if not fmt.quantize:
        return name(fmt.dtype)
    embeddings = ", 4-bit embeddings" if fmt.quantize_embeddings else ""
    return f"{fmt.quantize} quantized from {name(fmt.dtype)} (compute {name(fmt.compute_dtype)}{embeddings})"


def load_adapted(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> Adapted:
    """Load `base` and put `adapter` (a directory, or None) on it, for inference.

    dtype: the base's dtype (default: the checkpoint's). An adapter trained on a 4-bit base gets the
    base it was trained on (its record's dtype, 4-bit format and compute dtype); a `dtype` other than
    the one its 4-bit weights were quantized from is refused (ValueError naming both), never ignored.
    """
    fmt = trained_base(adapter) if adapter is not None else None
    if fmt is not None:
        asked = dtype_from_name(dtype)
        if asked is not None and asked != fmt.dtype:
            raise ValueError(f"dtype {describe(WeightFormat(asked))} contradicts adapter {adapter_dir(adapter)}: it was "
                             f"trained on a base held as {describe(fmt)}; leave the dtype out (or give "
                             f"{describe(WeightFormat(fmt.dtype))})")
        loaded = load_checkpoint(base, device=device, **fmt.load_kwargs())
    else:
        loaded = load_checkpoint(base, dtype=dtype, device=device)
    attached = attach(loaded.model, adapter) if adapter is not None else None
    return Adapted(loaded.model, attached, loaded.format)
