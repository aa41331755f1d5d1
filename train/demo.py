"""The embedded default: a tiny base model and a task, both made on this machine with no download.

The base is built on first use by this project's own full fine-tuning: a tiny Llama with random
weights learns plain English from the standard library's docstrings, is written in Hugging Face
format to the cache (models.demo.demo_cache_dir()), and from then on loads through the same path
as any hub checkpoint. The demo task then teaches it, with QLoRA by default, to answer a function
signature with the first line of its docstring.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from models.checkpoint import save_pretrained
from models.config import ModelConfig
from models.decoder import Decoder
from models.demo import DEMO_MODEL_CONFIG, build_demo_tokenizer, demo_cache_dir, demo_corpus, demo_text_corpus
from models.tokenizer import load_tokenizer

BASE_SEED = 1234
BASE_STEPS = 800  # pretraining steps of the demo base: about 2.5 minutes on 2 CPU cores
BASE_VERSION = 1  # bump to rebuild caches made by an older recipe

# (section, field, value) used by a run on the demo data where the user left the field at its default.
DEMO_RUN_DEFAULTS = [
    ("data", "val_fraction", 0.1),
    ("data", "seq_len", 96),
    ("data", "batch_size", 16),
    ("optim", "max_steps", 150),
    ("optim", "warmup_ratio", 0.05),
    ("eval", "eval_every", 30),
    ("eval", "task", "generation"),
    ("checkpoint", "save_every", 50),
]
DEMO_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}  # a tiny model learning in 150 steps wants big steps


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return path


def ensure_demo_data() -> Path:
    """The demo task as JSONL ({"prompt": signature, "completion": docstring line}), written once."""
    path = demo_cache_dir() / "docstrings.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path, demo_corpus())
    return path


def _init_base(out_dir: Path) -> Path:
    """Random tiny Llama (GPT-2-style N(0, 0.02) init) plus the demo tokenizer, in HF format."""
    build_demo_tokenizer(out_dir)
    hf = {**DEMO_MODEL_CONFIG, "vocab_size": load_tokenizer(out_dir).vocab_size}
    torch.manual_seed(BASE_SEED)
    model = Decoder(ModelConfig.from_hf_dict(hf))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, out_dir, tokenizer_dir=out_dir)
    return out_dir


def ensure_demo_base() -> Path:
    """Path of the cached demo base model, building it first if needed (about two minutes on a CPU)."""
    final = demo_cache_dir() / f"base-v{BASE_VERSION}"
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    from train.config import TrainConfig
    from train.run import train

    work = demo_cache_dir() / f".building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    init = _init_base(work / "init")
    text = _write_jsonl(work / "text.jsonl", [{"text": t} for t in demo_text_corpus()])
    print(f"Building the demo base model once (cached in {final}): full fine-tuning of a random tiny "
          "Llama on the standard library's docstrings...", file=sys.stderr)
    cfg = TrainConfig.from_dict({
        "run": {"method": "full", "model": str(init), "output_dir": str(work / "run"), "seed": BASE_SEED},
        "data": {"data": str(text), "seq_len": 128, "pack": True, "batch_size": 16},
        "optim": {"lr": 3e-3, "max_steps": BASE_STEPS, "warmup_ratio": 0.05, "weight_decay": 0.1},
        "eval": {"eval_every": 0},
        "checkpoint": {"save_every": 0, "keep_last": 1},
    })
    train(cfg, samples=False)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(work / "run" / "model", final)
    shutil.rmtree(work, ignore_errors=True)
    return final
