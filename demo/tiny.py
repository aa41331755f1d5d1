"""A tiny Llama shape and a tokenizer trained here on the standard library's prose, for tests and benchmarks.

Nothing is downloaded: build_demo_tokenizer() trains a byte-level BPE of DEMO_VOCAB_SIZE ids on
demo.corpus's prose and writes tokenizer.json + tokenizer_config.json + special_tokens_map.json, which
models.tokenizer and transformers.AutoTokenizer load alike; DEMO_MODEL_CONFIG is a tiny Llama's
config.json. Random models of this shape with a real tokenizer make benchmarks and tests quick; the
demo itself runs on a real pretrained model (demo.base).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from demo.corpus import demo_text_corpus

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
