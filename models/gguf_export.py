"""Write a Decoder and its Tokenizer as one GGUF file that llama.cpp and Ollama run.

(About 470 lines: config keys, tensor layout, number formats and the tokenizer are written together,
as one file that must agree with itself; the Ollama Modelfile is models.modelfile.)

What goes in is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for the same checkpoint,
through the `gguf` package (GGUFWriter for the file, gguf.quants for the number formats, the
package's key and tensor names):

Architecture
    llama and mistral are written as llama.cpp's `llama` (its converter does the same), qwen2 as
    `qwen2`, qwen3 as `qwen3`. llama.cpp's `llama` rotates adjacent pairs of q/k features (GPT-J
    style) where Hugging Face rotates the two halves of each head, so q_proj and k_proj rows (and
    biases) are permuted per head as the converter does (`permute_rows`); qwen2/qwen3 rotate halves
    in llama.cpp too and are written unpermuted. Llama 3.x rope scaling becomes the `rope_freqs`
    tensor: llama.cpp divides each rotary frequency by it, so it holds plain/scaled per frequency.
    Linear rope scaling is written as the rope.scaling keys. Sliding-window attention has no key in
    these architectures: llama.cpp attends to the whole context, which equals our model while the
    context fits the window (noted in ExportResult.notes).

Number formats (`out_type`)
    f32, f16, bf16, q8_0 for 2-D weights; 1-D tensors (norms, biases, rope_freqs) and every
    "*_norm.weight" stay f32, as the converter keeps them; a q8_0 tensor whose rows are not a
    multiple of 32 (the block size) falls back to f16, as the converter's QuantError fallback does.

Tokenizer (byte-level BPE: tokenizer.ggml.model "gpt2")
    Taken from the tokenizers backend's own JSON, so it is the same whatever files the Tokenizer was
    loaded from: every id's token (ids the model has beyond the tokenizer are "[PAD{id}]", UNUSED),
    token types (added special tokens and <|...|> ones CONTROL, other added tokens USER_DEFINED), the
    BPE merges (without them llama.cpp refuses the file: "cannot find tokenizer merges in model file"),
    `tokenizer.ggml.pre` from the pre-tokenizer's shape (`pre_tokenizer_name`), bos/eos/unknown/padding
    ids, add_bos, and the chat template the Tokenizer renders with (its built-in one when the
    checkpoint has none).

Where generation stops
    llama.cpp ends generation on its end-of-generation set: the eos, eot and eom ids of the file plus
    tokens whose text is on its own list (LLAMA_CPP_EOG_TEXTS). This project stops on
    Tokenizer.stop_ids. So eos is the Tokenizer's eos, eot the token that closes an assistant turn in
    the chat template (found by rendering one), and eom the first stop id that neither covers nor
    llama.cpp's list catches. Any stop id still uncovered is named in the notes (the Modelfile's
    `PARAMETER stop` lines still stop Ollama there).
"""
from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from jinja2.exceptions import TemplateError

from models.checkpoint import export_state_dict
from models.config import ModelConfig
from models.decoder import Decoder, rope_inv_freq
from models.modelfile import modelfile_for, write_modelfile
from models.tokenizer import BUILTIN_CHAT_TEMPLATE, Tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
_Q = gguf.GGMLQuantizationType
# --type -> (general.file_type, the type 2-D weights are stored in)
_FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, _Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, _Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, _Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, _Q.Q8_0),
}
ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,  # llama.cpp has no separate mistral architecture for these
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}
PERMUTED_QK = ("llama", "mistral")  # llama.cpp's LLAMA arch uses GPT-J (adjacent pair) rotary embeddings

# Token texts llama.cpp adds to its end-of-generation set on its own (llama-vocab.cpp, load: special_eog_ids).
LLAMA_CPP_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                       "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for the byte-level BPE pre-tokenizers that these
# model families ship, as the regexes their tokenizer.json splits with (llama.cpp: llama-vocab.cpp).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (split regexes before the byte-level step, whether digits are split one by one first)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": ((_GPT2_REGEX,), False),  # GPT-2's ByteLevel(use_regex=True)
    "smollm": ((_GPT2_REGEX,), True),  # SmolLM/StarCoder: Digits(individual) then GPT-2's regex
    "llama-bpe": ((_LLAMA3_REGEX,), False),  # Llama 3
    "qwen2": ((_QWEN2_REGEX,), False),  # Qwen2, Qwen2.5, Qwen3
}


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as a GGUF llama.cpp runs (one-line message)."""


@dataclass
class ExportResult:
    """What export_gguf wrote and what the caller should know about it."""

    path: Path  # the .gguf file
    modelfile: Path | None  # the Ollama Modelfile beside it
    tensor_types: dict[str, str]  # GGUF tensor name -> stored type ("F32", "F16", "BF16", "Q8_0")
    special_ids: dict[str, int]  # "bos", "eos", "eot", "eom", "pad", "unk" as written
    pre_tokenizer: str  # tokenizer.ggml.pre
    notes: list[str] = field(default_factory=list)  # approximations a user should hear about


@dataclass(frozen=True)
class _Planned:
    """One tensor of the file: its GGUF name, logical shape (numpy order), stored type and source."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    source: Callable[[], torch.Tensor]  # float32 values in llama.cpp's layout, made when written


@dataclass
class _Vocab:
    """The tokenizer as GGUF metadata."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    ids: dict[str, int]  # special token ids by GGUF role
    add_bos: bool
    add_space_prefix: bool
    chat_template: str


def export_gguf(
    model: Decoder,
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    out_type: str = "f16",
    name: str | None = None,
    modelfile: bool = True,
) -> ExportResult:
    """Write `model` and `tokenizer` to the GGUF file `path` (and an Ollama Modelfile beside it).

    out_type: one of GGUF_TYPES. name: general.name (default: the file's stem). Everything is checked
    before anything is written; the file is written under a temporary name and renamed, so a failure
    leaves no partial file (the Modelfile is made before and written after it). Raises GGUFExportError
    for what llama.cpp could not run.
    """
    if out_type not in _FILE_TYPES:
        raise GGUFExportError(f"unsupported GGUF type {out_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    path = Path(path)
    config = model.config
    notes = _architecture_notes(config)
    vocab = _vocab(tokenizer, config.vocab_size, notes)
    plan = _plan_tensors(model, out_type)
    writer = _metadata(config, vocab, out_type, name or path.stem)
    modelfile_text, modelfile_notes = modelfile_for(path, tokenizer, vocab.ids) if modelfile else ("", [])
    notes += modelfile_notes
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write(writer, plan, tmp)
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    written = write_modelfile(path, modelfile_text) if modelfile else None
    return ExportResult(path, written, {p.name: p.qtype.name for p in plan}, vocab.ids, vocab.pre, notes)


def _metadata(config: ModelConfig, vocab: _Vocab, out_type: str, name: str) -> gguf.GGUFWriter:
    """A writer holding every key of the file (general.*, the architecture's, the tokenizer's)."""
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config.model_type]])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hparams(writer, config)
    writer.add_file_type(_FILE_TYPES[out_type][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, vocab)
    return writer


# ---------------------------------------------------------------------------- architecture


def _architecture_notes(config: ModelConfig) -> list[str]:
    """Refuse what llama.cpp's architectures cannot compute; list what they only approximate."""
    if config.model_type not in ARCHITECTURES:
        raise GGUFExportError(f"unsupported model_type {config.model_type!r} for GGUF: supported are "
                              f"{', '.join(ARCHITECTURES)}")
    if config.rope_type == "llama3" and ARCHITECTURES[config.model_type] != gguf.MODEL_ARCH.LLAMA:
        raise GGUFExportError(f"llama3 rope scaling on a {config.model_type} model: llama.cpp's "
                              f"{ARCHITECTURES[config.model_type].name.lower()} architecture has no rope_freqs")
    notes = []
    if config.sliding_window is not None:
        notes.append(f"sliding-window attention ({config.sliding_window} tokens) is not in the GGUF: llama.cpp "
                     f"attends to the whole context, which matches this model up to {config.sliding_window} tokens")
    return notes


def _add_hparams(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """The {arch}.* keys llama.cpp reads to build the model, as the converter writes them."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    # head_dim may differ from hidden/heads (Qwen3): llama.cpp reads it from key/value_length
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))


def permute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows [n_heads*D, ...] from halves order (HF) to adjacent pairs (llama.cpp's llama).

    Within each head, row i < D/2 goes to 2i and row D/2 + i to 2i + 1: the pair that HF rotates
    together (i, i + D/2) becomes the adjacent pair (2i, 2i+1) that GPT-J style rope rotates.
    This is convert_hf_to_gguf.py's LlamaModel.permute; works on weights [rows, C] and biases [rows].
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama3_rope_freqs(config: ModelConfig) -> torch.Tensor:
    """rope_freqs [D/2]: the factor llama.cpp divides each rotary frequency by, plain / llama3-scaled."""
    plain = rope_inv_freq(config.replace(rope_scaling=None))
    return (plain / rope_inv_freq(config)).float()


def _plan_tensors(model: Decoder, out_type: str) -> list[_Planned]:
    """Every tensor of the file, in the converter's order and types, read lazily from the model."""
    config = model.config
    arch = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    weight_type = _FILE_TYPES[out_type][1]
    plan = []
    if config.rope_type == "llama3":
        freqs = llama3_rope_freqs(config)
        plan.append(_Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", tuple(freqs.shape),
                             _Q.F32, lambda: freqs))
    # export_state_dict: the checkpoint's tensors (4-bit layers dequantized, a tied head left out)
    for hf_name, tensor in export_state_dict(model).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"tensor {hf_name!r} has no GGUF name for architecture {arch.name.lower()}")
        heads = _permute_heads(hf_name, config)
        source = (lambda t=tensor, h=heads: permute_rows(t.float(), h)) if heads else (lambda t=tensor: t.float())
        plan.append(_Planned(gguf_name, tuple(tensor.shape), _stored_type(gguf_name, tensor.shape, weight_type), source))
    return plan


def _permute_heads(hf_name: str, config: ModelConfig) -> int:
    """Number of heads to permute `hf_name`'s rows over (0: not permuted)."""
    if config.model_type not in PERMUTED_QK:
        return 0
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.num_key_value_heads
    return 0


def _stored_type(gguf_name: str, shape: torch.Size, weight_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The converter's rule: 1-D tensors, norms and biases in f32; a row that does not fill whole
    quantization blocks in f16 instead."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return _Q.F32
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    return weight_type if shape[-1] % block == 0 else _Q.F16


def _write(writer: gguf.GGUFWriter, plan: list[_Planned], path: Path) -> None:
    """Header, metadata and tensor infos first, then each tensor converted as it is written, so the
    converted copy of the model never exists whole."""
    for p in plan:
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype)))
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in plan:
        values = p.source().detach().cpu().contiguous().numpy()
        writer.write_tensor_data(gguf.quants.quantize(values, p.qtype))


# ---------------------------------------------------------------------------- tokenizer


def _backend_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizers backend as its own JSON: vocabulary, merges, added tokens, pre-tokenizer."""
    return json.loads(tokenizer.backend.to_str())


def _vocab(tokenizer: Tokenizer, vocab_size: int, notes: list[str]) -> _Vocab:
    """The tokenizer's GGUF metadata, refused unless llama.cpp can run it as byte-level BPE."""
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    byte_level = _byte_level_step(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or byte_level is None:
        raise GGUFExportError(f"tokenizer {model.get('type')!r} without a byte-level pre-tokenizer: GGUF export "
                              "writes byte-level BPE tokenizers only (tokenizer.ggml.model 'gpt2')")
    tokens, types = _tokens(tokenizer, spec, vocab_size)
    pre, note = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if note:
        notes.append(note)
    ids = _special_ids(tokenizer, spec, tokens, types, notes)
    if spec.get("normalizer"):
        notes.append(f"the tokenizer's {spec['normalizer'].get('type')} normalizer is not in the GGUF: llama.cpp "
                     "tokenizes text as given (the same for text already normalized)")
    if byte_level.get("add_prefix_space"):
        notes.append("the tokenizer adds a space before the text: llama.cpp's BPE tokenizer does not")
    return _Vocab(tokens, types, _merges(model), pre, ids, tokenizer.add_bos, bool(byte_level.get("add_prefix_space")),
                  tokenizer.chat_template or BUILTIN_CHAT_TEMPLATE)


def _pre_steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def _byte_level_step(pre: dict[str, Any] | None) -> dict[str, Any] | None:
    return next((s for s in _pre_steps(pre) if s.get("type") == "ByteLevel"), None)


def _tokens(tokenizer: Tokenizer, spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """(token text, token type) for ids 0..vocab_size-1, as the converter's get_vocab_base writes them."""
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if max(by_id, default=-1) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} "
                              "embedding rows")
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        tokens.append(text)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].get("special") or _looks_special(text):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def _looks_special(text: str) -> bool:
    """The converter's does_token_look_special: added tokens some models forget to mark special."""
    return (text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")))


def _merges(model: dict[str, Any]) -> list[str]:
    """BPE merges as "left right" strings; pairs in the newer list form have any space spelled as
    chr(ord(' ') + 256), as the converter encodes them."""
    merges = model.get("merges") or []
    if not merges:
        raise GGUFExportError("the BPE tokenizer has no merges: llama.cpp cannot load a BPE vocabulary without them")
    if isinstance(merges[0], str):
        return list(merges)
    return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]


def pre_tokenizer_name(pre: dict[str, Any] | None) -> tuple[str, str | None]:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, and a note when only the closest was found.

    The pre-tokenizer is reduced to (split regexes, digits split one by one) and looked up in
    PRE_TOKENIZERS; failing an exact match, the name whose regex is most alike (difflib) is taken.
    """
    regexes, digits = [], False
    for step in _pre_steps(pre):
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern") or {}
            regexes.append(pattern.get("Regex") or re.escape(pattern.get("String", "")))
        elif kind == "Digits":
            digits = digits or bool(step.get("individual_digits"))
        elif kind == "ByteLevel" and step.get("use_regex", True):
            regexes.append(_GPT2_REGEX)
    signature = (tuple(regexes), digits)
    for name, known in PRE_TOKENIZERS.items():
        if known == signature:
            return name, None

    def likeness(name: str) -> float:
        known_regexes, known_digits = PRE_TOKENIZERS[name]
        text = difflib.SequenceMatcher(None, "|".join(known_regexes), "|".join(regexes)).ratio()
        return text + (0.1 if known_digits == digits else 0.0)

    closest = max(PRE_TOKENIZERS, key=likeness)
    return closest, (f"the tokenizer's pre-tokenizer is not one llama.cpp knows; wrote the closest, "
                     f"tokenizer.ggml.pre={closest!r}: llama.cpp may split some texts differently")


def end_of_turn_id(tokenizer: Tokenizer, types: list[int]) -> int | None:
    """The control token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>), if any."""
    marker = "ftkit-end-of-turn-probe"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.render_chat(messages)
    except (TemplateError, TypeError, ValueError):
        return None  # a template that refuses this conversation has no turn end we can find
    after = text.partition(marker)[2]
    ids = tokenizer.encode(after, add_bos=False) if after else []
    if ids and ids[0] < len(types) and types[ids[0]] == gguf.TokenType.CONTROL:
        return ids[0]
    return None


def _special_ids(tokenizer: Tokenizer, spec: dict[str, Any], tokens: list[str], types: list[int],
                 notes: list[str]) -> dict[str, int]:
    """bos/eos/unk/pad and the end-of-generation ids (eos, eot, eom) covering Tokenizer.stop_ids."""
    ids: dict[str, int] = {"eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        ids["bos"] = tokenizer.bos_id
    # the converter's unknown token: tokenizer_config's unk_token (as the Tokenizer read it), else the BPE model's
    unk = tokenizer.named_tokens.get("unk_token") or (spec.get("model") or {}).get("unk_token")
    if unk is not None and tokenizer.backend.token_to_id(unk) is not None:
        ids["unk"] = tokenizer.backend.token_to_id(unk)
    others = sorted(tokenizer.stop_ids - {tokenizer.eos_id})
    turn_end = end_of_turn_id(tokenizer, types)
    ids["eot"] = turn_end if turn_end is not None else (others.pop(0) if others else tokenizer.eos_id)
    others = [i for i in others if i != ids["eot"]]
    # eom for a stop id llama.cpp would not catch by its text, else for any: keys, not its heuristics
    unrecognised = [i for i in others if tokens[i] not in LLAMA_CPP_EOG_TEXTS]
    if others:
        ids["eom"] = (unrecognised or others)[0]
    missed = [i for i in unrecognised if i != ids.get("eom")]
    if missed:
        notes.append(f"stop ids {missed} have no GGUF key (eos, eot and eom are taken): llama.cpp will not "
                     "stop on them; the Modelfile's PARAMETER stop lines make Ollama stop there")
    return ids


def eog_ids(ids: dict[str, int], tokens: list[str]) -> set[int]:
    """llama.cpp's end-of-generation set for a file with these special ids and tokens."""
    return {ids[k] for k in ("eos", "eot", "eom") if k in ids} | {i for i, t in enumerate(tokens) if t in LLAMA_CPP_EOG_TEXTS}


def _add_vocab(writer: gguf.GGUFWriter, vocab: _Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for role, token_id in vocab.ids.items():
        getattr(writer, {"unk": "add_unk_token_id", "pad": "add_pad_token_id"}.get(role, f"add_{role}_token_id"))(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)  # Tokenizer.encode never appends EOS; callers add it where a target ends
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_chat_template(vocab.chat_template)
