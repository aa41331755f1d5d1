"""Find a checkpoint directory: a local path, a cached hub snapshot, or a hub download.

A local directory or an already cached snapshot never touches the network.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download

# What a decoder checkpoint needs; weights in any other format (.bin, .pt) are never fetched or read.
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]


class CheckpointError(ValueError):
    """A checkpoint, adapter or tokenizer that cannot be used; the message names the file (and tensor)."""


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """Return a local directory holding the checkpoint `path_or_hub_id`, or the local `.gguf` file it names.

    Order: an existing local directory or .gguf file (a training run's output directory stands for the
    `model/` inside it); else a complete snapshot already in the hub cache (offline); else a download
    through huggingface_hub (safetensors, configs and tokenizer files only).
    """
    local = Path(path_or_hub_id).expanduser()
    weights = ("model.safetensors", "model.safetensors.index.json")
    if local.is_dir() and not any((local / w).is_file() for w in weights) and (local / "model" / "config.json").is_file():
        return local / "model"  # `train.run --method full` wrote its model there (its config.json is the run's)
    if local.is_dir() or (local.is_file() and local.suffix.lower() == ".gguf"):
        return local
    if local.exists():
        raise CheckpointError(f"{local}: expected a checkpoint directory or a .gguf file, found another file")
    if local.suffix.lower() == ".gguf":
        raise CheckpointError(f"{local}: no such file")
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such directory, and not a hub id of the form 'owner/name'")
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except Exception:
        pass  # not cached yet: fall through to a download
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES))
    except Exception as err:  # network, auth or missing repo: one clear line
        raise CheckpointError(f"{name}: not a local directory and could not be fetched from the hub ({type(err).__name__}: {err})") from None
