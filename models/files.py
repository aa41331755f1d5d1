"""File helpers shared by checkpoints, adapters and tokenizers: JSON read with a clear error, atomic writes."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.hub import CheckpointError


def read_json_object(path: Path, missing: str = "missing") -> dict[str, Any]:
    """The JSON object in `path`; CheckpointError naming the file when it is absent, not JSON or not an object."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {missing}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Run write(tmp_path), then rename it over `path`: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)
