"""LoRA adapters on disk in PEFT's format, both ways.

A directory holds:
- adapter_config.json: PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha, target_modules, ...).
- adapter_model.safetensors: `base_model.model.<module path>.lora_A.weight` [r,in],
  `...lora_B.weight` [out,r] and, for DoRA, `...lora_magnitude_vector` [out] (PEFT writes the
  magnitude without a `.weight` suffix; we also accept one when reading).
- lora_training.json (ours, PEFT never reads it): how the base was held while training
  (models.weight_format.WeightFormat), plus the caller's `extra` fields.

Only safetensors are read; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lora.inject import (
    ALL_LINEAR,
    LoraConfig,
    adapter_parameters,
    delete_adapter,
    inject_lora,
    lora_layers,
    lora_state_dict,
    set_active_adapter,
)
from models.files import atomic_write, read_json_object
from models.hub import CheckpointError
from models.weight_format import WeightFormat, write_record
from quant import NF4Embedding, NF4Weights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"

# Fields whose non-default values change what the adapter computes and which we do not implement.
_UNSUPPORTED = {
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "exclude_modules": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


def peft_config_dict(model: nn.Module, config: LoraConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json contents PEFT's LoraConfig loads (unlisted PEFT fields take PEFT's defaults)."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        # Record what was wrapped: PEFT's own "all-linear" could differ on another architecture.
        targets = sorted({path.split(".")[-1] for path, layer in lora_layers(model) if config.adapter_name in layer.adapter_names})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def base_format(model: nn.Module, adapter_name: str = "default") -> WeightFormat:
    """How the base under adapter `adapter_name` is held, read from the model's own modules.

    quantize: "nf4" when the layers it adapts are 4-bit (also those a merge set aside), with their
    compute dtype; quantize_embeddings when the embedding is 4-bit too; dtype: that of the base's
    full-precision tensors, which is also the dtype the 4-bit weights were quantized from (the loader
    quantizes each weight as read in that dtype), so a merge can re-quantize the very same 4-bit weights.
    """
    layers = [layer for _, layer in lora_layers(model) if adapter_name in layer.adapter_names]
    quantized = [layer.unmerged_base for layer in layers if isinstance(layer.unmerged_base, NF4Weights)]
    adapter = {id(p) for p in adapter_parameters(model, adapter_name).values()}
    dtype = next((p.dtype for p in model.parameters() if id(p) not in adapter and p.is_floating_point()), torch.float32)
    embeddings = any(isinstance(m, NF4Embedding) for m in model.modules())
    return WeightFormat(dtype, "nf4" if quantized else None, quantized[0].compute_dtype if quantized else None,
                        embeddings)


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    config: LoraConfig,
    base_model_name_or_path: str | os.PathLike | None,
    adapter_name: str = "default",
    extra: dict[str, Any] | None = None,
    base: WeightFormat | None = None,
) -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT LoRA adapter directory; return it.

    `config` describes the adapter (its adapter_name is ignored in favour of `adapter_name`). Beside it
    goes the record of how the base was held (models.weight_format): `base` when the caller loaded it
    and knows, else `base_format(model)`; `extra` fields go into the record too.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(**{**config.__dict__, "adapter_name": adapter_name})
    state = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in lora_state_dict(model, adapter_name).items()}
    base_name = str(base_model_name_or_path) if base_model_name_or_path is not None else None
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _write_json(out / CONFIG_NAME, peft_config_dict(model, config, base_name))
    write_record(out, base or base_format(model, adapter_name), extra)
    return out


# ---------------------------------------------------------------------- reading


def read_adapter_config(adapter_dir: str | os.PathLike, adapter_name: str = "default") -> LoraConfig:
    """Validate adapter_config.json and turn it into a LoraConfig; CheckpointError naming the file otherwise."""
    path = Path(adapter_dir) / CONFIG_NAME
    d = read_json_object(path)
    kind = d.get("peft_type")
    if kind != "LORA":
        if kind in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
            raise CheckpointError(f"{path}: a {kind} adapter adds virtual tokens, not weight deltas: there is nothing to merge or inject as LoRA")
        raise CheckpointError(f"{path}: peft_type is {kind!r}, expected 'LORA'")
    for key, default in _UNSUPPORTED.items():
        value = d.get(key, default)
        if value not in (default, None, {}, []):
            raise CheckpointError(f"{path}: {key}={value!r} is not supported (only {default!r})")
    r, alpha, dropout, targets = d.get("r"), d.get("lora_alpha"), d.get("lora_dropout", 0.0), d.get("target_modules")
    _check_type(path, "r", r, int)
    _check_type(path, "lora_alpha", alpha, (int, float))
    _check_type(path, "lora_dropout", dropout, (int, float))
    for flag in ("use_rslora", "use_dora"):
        _check_type(path, flag, d.get(flag, False), bool)
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(f"{path}: target_modules must be a list of module names or a regex string, got {targets!r}")
    try:
        return LoraConfig(
            r=r,
            alpha=alpha,
            dropout=float(dropout),
            target_modules=targets,
            use_rslora=d.get("use_rslora", False),
            use_dora=d.get("use_dora", False),
            adapter_name=adapter_name,
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default") -> LoraConfig:
    """Inject adapter `adapter_name` into `model` as described by `adapter_dir` and load its weights.

    The new adapter becomes the active one. On any error (CheckpointError naming the file and
    tensor) the model is left as it was.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir}: no such adapter directory")
    config = read_adapter_config(adapter_dir, adapter_name)
    device = next(model.parameters()).device
    install_adapter(model, config, read_adapter_tensors(adapter_dir, device), adapter_dir)
    return config


def read_adapter_tensors(adapter_dir: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """adapter_model.safetensors as `adapter_parameters` keys -> tensors on `device`, the model untouched
    (a server reads an adapter this way while its model keeps running). CheckpointError naming the file."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in path.parent.glob("adapter_model.bin")]
        hint = f" (found {pickled[0]}: pickle files are never loaded; re-save with safetensors)" if pickled else ""
        raise CheckpointError(f"{path}: missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {_model_key(path, k): f.get_tensor(k).to(device) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' own parse errors: truncated or corrupt file
        raise CheckpointError(f"{path}: not a valid safetensors file ({type(err).__name__}: {err})") from None


def install_adapter(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor],
                    adapter_dir: str | os.PathLike) -> None:
    """Inject `config.adapter_name` into `model`, fill it from `tensors` (read_adapter_tensors) and make it
    the active adapter. Every tensor is checked (missing, unexpected, shape: CheckpointError naming the
    file in `adapter_dir`); on any error the model is left as it was."""
    name, path = config.adapter_name, Path(adapter_dir) / WEIGHTS_NAME
    if any(name in layer.adapter_names for _, layer in lora_layers(model)):
        raise ValueError(f"model already has an adapter named {name!r}: load under another adapter_name")
    previous = {layer.active_adapter for _, layer in lora_layers(model)} - {None}
    try:
        inject_lora(model, config)
    except ValueError as err:
        raise CheckpointError(f"{Path(adapter_dir) / CONFIG_NAME}: {err}") from None
    try:
        _copy_tensors(adapter_parameters(model, name), tensors, path)
    except BaseException:
        delete_adapter(model, name)
        if len(previous) == 1:
            set_active_adapter(model, previous.pop())
        raise


def _copy_tensors(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], path: Path) -> None:
    missing = [k for k in params if k not in tensors]
    unexpected = [k for k in tensors if k not in params]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {PEFT_PREFIX + missing[0]!r}" + _more(missing))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {PEFT_PREFIX + unexpected[0]!r}" + _more(unexpected)
                              + " (adapter does not fit this model)")
    with torch.no_grad():
        for key, p in params.items():
            value = tensors[key]
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: tensor {PEFT_PREFIX + key!r} has shape {list(value.shape)}, "
                                      f"the model needs {list(p.shape)}")
            p.copy_(value.to(p.dtype))


def _model_key(path: Path, file_key: str) -> str:
    """PEFT file key -> our adapter_parameters key (prefix dropped; `lora_magnitude_vector.weight` accepted)."""
    if not file_key.startswith(PEFT_PREFIX):
        raise CheckpointError(f"{path}: tensor {file_key!r} does not start with {PEFT_PREFIX!r} (not a PEFT adapter?)")
    key = file_key[len(PEFT_PREFIX):]
    return key.removesuffix(".weight") if key.endswith(MAGNITUDE + ".weight") else key


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _check_type(path: Path, key: str, value: Any, types) -> None:
    # bool is an int subclass: `"r": true` must not pass as a rank.
    wrong_bool = isinstance(value, bool) and types is not bool
    if wrong_bool or not isinstance(value, types):
        raise CheckpointError(f"{path}: {key} must be {getattr(types, '__name__', 'a number')}, got {value!r}")


def _write_json(path: Path, d: dict[str, Any]) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(d, indent=2) + "\n"))

