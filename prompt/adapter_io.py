"""Prompt- and prefix-tuning adapters on disk in PEFT's format, both ways.

A directory holds:
- adapter_config.json: PEFT's PromptTuningConfig / PrefixTuningConfig fields (peft_type
  PROMPT_TUNING or PREFIX_TUNING, task_type CAUSAL_LM, num_virtual_tokens, token_dim, num_layers,
  num_attention_heads, num_transformer_submodules 1, ...). For prefix tuning on a grouped-query
  model PEFT sets token_dim = K·D and num_attention_heads = K (the kv heads), not the query heads.
- adapter_model.safetensors: one tensor `prompt_embeddings`, [N, C] for prompt tuning and
  [N, L·2·K·D] for prefix tuning (layout in prompt.virtual_tokens.PrefixEncoder).

A prefix trained through the reparameterisation MLP is saved folded (prefix_projection false), which
is also what PEFT saves as the tensor. Only safetensors are read; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.decoder import Decoder
from models.files import atomic_write, read_json_object
from models.hub import CheckpointError
from prompt.virtual_tokens import PrefixEncoder, PromptEmbedding, VirtualTokens, attach

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TENSOR = "prompt_embeddings"
PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")


def peft_config_dict(model: Decoder, module: VirtualTokens, base: str | None, init_text: str | None) -> dict[str, Any]:
    """adapter_config.json contents PEFT loads (unlisted fields take PEFT's defaults)."""
    c = model.config
    common = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "num_virtual_tokens": module.num_virtual_tokens,
        "num_layers": c.num_hidden_layers,
        "num_transformer_submodules": 1,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    if isinstance(module, PrefixEncoder):
        token_dim = c.num_key_value_heads * c.head_dim
        return {"peft_type": "PREFIX_TUNING", **common, "token_dim": token_dim,
                "num_attention_heads": c.num_key_value_heads, "encoder_hidden_size": token_dim,
                "prefix_projection": False}
    # PEFT rebuilds a TEXT init with AutoTokenizer from the base (then loads the weights over it): say TEXT
    # only where it can (a directory or hub id, not a GGUF file), RANDOM otherwise.
    text = bool(init_text) and base is not None and not base.endswith(".gguf")
    return {"peft_type": "PROMPT_TUNING", **common, "token_dim": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "prompt_tuning_init": "TEXT" if text else "RANDOM",
            "prompt_tuning_init_text": init_text if text else None,
            "tokenizer_name_or_path": base if text else None, "tokenizer_kwargs": None}


def save_virtual_tokens(model: Decoder, out_dir: str | os.PathLike, base_model_name_or_path: str | os.PathLike | None,
                        init_text: str | None = None) -> Path:
    """Write `model.virtual_tokens` as a PEFT adapter directory; return it."""
    module = model.virtual_tokens
    if module is None:
        raise ValueError("model has no virtual tokens to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = str(base_model_name_or_path) if base_model_name_or_path is not None else None
    state = {TENSOR: module.peft_tensor().float().contiguous().cpu()}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    config = peft_config_dict(model, module, base, init_text)
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def is_virtual_token_adapter(adapter_dir: str | os.PathLike) -> bool:
    """True when adapter_config.json says PROMPT_TUNING or PREFIX_TUNING."""
    path = Path(adapter_dir) / CONFIG_NAME
    return path.is_file() and read_json_object(path).get("peft_type") in PEFT_TYPES


def load_virtual_tokens(model: Decoder, adapter_dir: str | os.PathLike) -> VirtualTokens:
    """Attach the adapter in `adapter_dir` (ours or PEFT's) to `model`; CheckpointError naming the file otherwise."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    d = read_json_object(path)
    kind = d.get("peft_type")
    if kind not in PEFT_TYPES:
        raise CheckpointError(f"{path}: peft_type is {kind!r}, expected one of {PEFT_TYPES}")
    n = d.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{path}: num_virtual_tokens must be a positive int, got {n!r}")
    if d.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(f"{path}: num_transformer_submodules must be 1 for a decoder-only model")
    if d.get("task_type") not in ("CAUSAL_LM", None):
        raise CheckpointError(f"{path}: task_type {d.get('task_type')!r} is not CAUSAL_LM")
    _check_fits(path, d, model)
    module = PrefixEncoder(n, model.config) if kind == "PREFIX_TUNING" else PromptEmbedding(n, model.config.hidden_size)
    tensor = _read_tensor(adapter_dir / WEIGHTS_NAME)
    want = tuple(module.embedding.shape)
    if tuple(tensor.shape) != want:
        raise CheckpointError(f"{adapter_dir / WEIGHTS_NAME}: tensor {TENSOR!r} has shape {list(tensor.shape)}, the model needs {list(want)}")
    with torch.no_grad():
        module.embedding.copy_(tensor.float())
    attach(model, module)
    return module.requires_grad_(False)


def _check_fits(path: Path, d: dict[str, Any], model: Decoder) -> None:
    """The recorded layer count and widths must be this model's (a prefix is per layer and kv head)."""
    c = model.config
    if d["peft_type"] == "PREFIX_TUNING":
        want = {"num_layers": c.num_hidden_layers, "token_dim": c.num_key_value_heads * c.head_dim}
    else:
        want = {"token_dim": c.hidden_size}
    for key, value in want.items():
        if d.get(key, value) != value:
            raise CheckpointError(f"{path}: {key} is {d.get(key)!r}, this model has {value}")


def _read_tensor(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (pickle files are never loaded)")
    try:
        with safe_open(str(path), framework="pt") as f:
            if TENSOR not in f.keys():
                raise CheckpointError(f"{path}: no tensor {TENSOR!r} (found {sorted(f.keys())[:3]})")
            return f.get_tensor(TENSOR)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' own parse errors: truncated or corrupt file
        raise CheckpointError(f"{path}: not a valid safetensors file ({type(err).__name__}: {err})") from None
