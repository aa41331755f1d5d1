"""Shared fixtures: tiny random-weight Hugging Face checkpoints made with transformers.

transformers is the reference implementation here; the package under test never imports it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 96

# Tiny shapes that still exercise grouped-query attention (4 query heads share 2 kv heads).
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (model_type, extra config fields, how rope is spelled in config.json)
VARIANTS = {
    "llama": ("llama", {"tie_word_embeddings": False}, "new"),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, "new"),
    "llama3_rope_new": ("llama", {"rope_parameters": LLAMA3_ROPE}, "new"),
    "llama3_rope_old": ("llama", {"rope_parameters": LLAMA3_ROPE}, "old"),
    "mistral": ("mistral", {"sliding_window": 6}, "new"),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}, "new"),
    "qwen3": ("qwen3", {"head_dim": 24}, "new"),
}


def left_padded_batch(vocab: int, seed: int = 1, length: int = 14, pads: tuple[int, ...] = (0, 5, 9)):
    """Random ids [len(pads), length] and mask (1 = real token), row i padded on the left by pads[i]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_classes(model_type: str):
    import transformers

    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[model_type]


def _to_old_rope_spelling(config_path: Path) -> None:
    """Rewrite `rope_parameters` as the older `rope_theta` + `rope_scaling` pair."""
    cfg = json.loads(config_path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    config_path.write_text(json.dumps(cfg, indent=2))


def make_hf_checkpoint(out_dir: Path, variant: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """Create a random-weight transformers model of `variant`, save it to `out_dir`, return (dir, hf_model)."""
    model_type, extra, spelling = VARIANTS[variant]
    config_cls, model_cls = _hf_classes(model_type)
    fields = {**BASE, **extra, **overrides}
    torch.manual_seed(seed)
    config = config_cls(**fields)
    model = model_cls(config).to(dtype).eval()
    # Random biases (Qwen2 q/k/v) and norm weights so that a missed term shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if spelling == "old":
        _to_old_rope_spelling(out_dir / "config.json")
    return out_dir, model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory fixture: hf_checkpoint(variant, **config_overrides) -> (dir, transformers model)."""

    def make(variant: str = "llama", **overrides):
        return make_hf_checkpoint(tmp_path / variant, variant, **overrides)

    return make


# --- a tiny model with a real tokenizer, for trainer tests ---------------------------------------
TASK_WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def make_tokenizer_files(out_dir: Path) -> int:
    """A byte-level BPE trained on a fixed text, with <pad>/<s>/</s>; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tm

    tok = Tokenizer(tm.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = [f"the {a} {b} is {c}. " * 3 for a in TASK_WORDS for b in TASK_WORDS for c in TASK_WORDS[:3]]
    tok.train_from_iterator(text, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return tok.get_vocab_size()


def make_run_model(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny llama (random weights, saved by transformers) with the tokenizer above."""
    vocab = make_tokenizer_files(out_dir)
    make_hf_checkpoint(out_dir, "llama", seed=seed, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       **overrides)
    return out_dir


def make_task_data(path: Path, n: int, seed: int = 0) -> Path:
    """A learnable prompt/completion task: 'colour of X?' -> a fixed word per X."""
    import random

    rng = random.Random(seed)
    answer = {w: TASK_WORDS[(i * 3 + 1) % len(TASK_WORDS)] for i, w in enumerate(TASK_WORDS)}
    lines = []
    for _ in range(n):
        w = rng.choice(TASK_WORDS)
        lines.append(json.dumps({"prompt": f"the {w} is", "completion": f" {answer[w]}."}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def run_model(tmp_path_factory) -> Path:
    return make_run_model(tmp_path_factory.mktemp("run_model"))
