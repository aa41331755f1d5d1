"""The demo's base model: a tiny Llama that learned English from the standard library, built once.

Nothing is downloaded. On first use the base is built by this project's own trainer: a tokenizer (a
byte-level BPE of DEMO_VOCAB_SIZE ids) is trained on demo.corpus's prose, a tiny Llama
(DEMO_MODEL_CONFIG) with random weights is fully fine-tuned on that prose, and the result is written
in Hugging Face format to the cache (demo_cache_dir()); from then on it loads like any checkpoint.
The tokenizer files load in models.tokenizer and transformers.AutoTokenizer alike.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from demo.corpus import demo_corpus, demo_text_corpus
from models.checkpoint import save_pretrained
from models.config import ModelConfig
from models.decoder import Decoder
from models.tokenizer import load_tokenizer
from train.config import TrainConfig
from train.run import train

PROJECT_NAME = "ftkit"
BASE_SEED = 1234
BASE_STEPS = 800  # pretraining steps of the demo base: about 2.5 minutes on 2 CPU cores
BASE_VERSION = 1  # bump to rebuild caches made by an older recipe

# Byte-level BPE settings. Ids 0-4 are the special tokens, in this order.
DEMO_VOCAB_SIZE = 2048
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEMO_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)
# ChatML, opened by BOS so that transformers' apply_chat_template(tokenize=True) has it too;
# models.tokenizer never adds a second one.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEMO_MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": DEMO_VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "bos_token_id": DEMO_SPECIAL_TOKENS.index(BOS_TOKEN),
    "eos_token_id": DEMO_SPECIAL_TOKENS.index(EOS_TOKEN),
    "pad_token_id": DEMO_SPECIAL_TOKENS.index(PAD_TOKEN),
    "torch_dtype": "float32",
}


def demo_cache_dir() -> Path:
    """Where demo artefacts live: $FT_DEMO_CACHE, else ~/.cache/ftkit/demo."""
    env = os.environ.get("FT_DEMO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / PROJECT_NAME / "demo"


# --- the tokenizer --------------------------------------------------------------------------------
def _train_tokenizer():
    """A byte-level BPE on demo_text_corpus(); deterministic for a given corpus and tokenizers version."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB_SIZE, special_tokens=list(DEMO_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(demo_text_corpus(), trainer)
    bos_id = DEMO_SPECIAL_TOKENS.index(BOS_TOKEN)
    # Llama 3's layout: the post-processor prepends BOS, and tokenizer_config says so too.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                                      special_tokens=[(BOS_TOKEN, bos_id)]),
    ])
    return tok


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": DEMO_MODEL_CONFIG["max_position_embeddings"],
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": DEMO_CHAT_TEMPLATE,
    }


def build_demo_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Train the demo tokenizer and write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                   "additional_special_tokens": [IM_START, IM_END]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out


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
