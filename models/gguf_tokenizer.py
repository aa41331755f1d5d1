"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers.Tokenizer` plus Hugging Face's config files.

A GGUF file has no tokenizer.json; llama.cpp keeps the vocabulary in its metadata:

    tokenizer.ggml.model        "gpt2": byte-level BPE (tokens spelled in GPT-2's byte alphabet, with
                                merges); "llama": SentencePiece-style BPE (tokens with U+2581 for a
                                space, scores instead of merges, <0xNN> byte tokens)
    tokenizer.ggml.pre          how text is split before BPE: a name for one of llama.cpp's regex
                                sequences, which PRE_TOKENIZERS copies
    tokenizer.ggml.tokens / token_type / merges / scores
    tokenizer.ggml.{bos,eos,unknown,padding,eot,eom}_token_id, add_bos_token, add_eos_token,
    add_space_prefix; tokenizer.chat_template

`gguf_tokenizer` turns these into the backend plus the tokenizer_config.json, special_tokens_map.json
and generation_config.json a Hugging Face directory would have, so models.tokenizer.Tokenizer reads
them with the same rules as a directory; `write_hf_tokenizer` writes those files (and tokenizer.json)
next to a model saved from a GGUF file. Token types 3 (control) become special added tokens and 4
(user-defined) plain added tokens, matched whole in text as llama.cpp does. generation_config's
eos_token_id lists every end-of-generation id the file names (eos, eot, eom), llama.cpp's stop set.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from models.files import atomic_write
from models.gguf import GGUFFile, read_gguf
from models.hub import CheckpointError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)

# llama.cpp's pre-tokenizers (llama-vocab.cpp, chosen by tokenizer.ggml.pre), spelled as the original
# tokenizer.json files spell them, so a tokenizer.json written from a GGUF file looks like the original.
# (One known difference: "(?i:'s|...)" also takes "'ſ" (long s) as a contraction, as the original
# tokenizers do; llama.cpp's ASCII spelling '[sS] does not.)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# What llama.cpp runs for "default" (a tokenizer its converter did not recognise; it warns that quality
# may suffer): these four regexes in turn, GPT-2's second. transformers uses GPT-2's alone there.
_LLAMA_CPP_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+",
                      r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                      r"\p{N}+", "[0-9][0-9][0-9]")


def _bytes(gpt2_regex: bool) -> pre_tokenizers.PreTokenizer:
    """The byte alphabet step; with gpt2_regex it first splits by GPT-2's own regex."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)


def _split(*regexes: str) -> list[pre_tokenizers.PreTokenizer]:
    """Each regex in turn splits the pieces the one before left (matches and the text between kept)."""
    return [*(pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes), _bytes(False)]


def _gpt2() -> list[pre_tokenizers.PreTokenizer]:
    return [_bytes(True)]


def _digits_then_gpt2() -> list[pre_tokenizers.PreTokenizer]:
    """Every digit on its own, then GPT-2's regex (StarCoder, SmolLM)."""
    return [pre_tokenizers.Digits(individual_digits=True), _bytes(True)]


def _llama3() -> list[pre_tokenizers.PreTokenizer]:
    return _split(_LLAMA3)


def _qwen2() -> list[pre_tokenizers.PreTokenizer]:
    return _split(_QWEN2)


def _llama_cpp_default() -> list[pre_tokenizers.PreTokenizer]:
    return _split(*_LLAMA_CPP_DEFAULT)


# llama.cpp's Llama 3 family: that split, a whole pre-token taken from the vocabulary before any merge
# (ignore_merges, as Llama 3's tokenizer.json says too), and BOS added unless the file says otherwise.
_LLAMA3_FAMILY = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
PRE_TOKENIZERS: dict[str, Callable[[], list[pre_tokenizers.PreTokenizer]]] = {
    "default": _llama_cpp_default,
    "gpt-2": _gpt2,
    "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2, "refact": _digits_then_gpt2,
    "qwen2": _qwen2, "deepseek-r1-qwen": _qwen2,
    **dict.fromkeys(_LLAMA3_FAMILY, _llama3),
}


@dataclass
class GGUFTokenizer:
    """A GGUF file's tokenizer: the backend and the JSON files a Hugging Face directory would hold."""

    backend: Tokenizer
    files: dict[str, dict[str, Any]]  # "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"


def gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizer:
    """Build the tokenizer of the GGUF file `path`; CheckpointError naming the file if it has none we read."""
    g = read_gguf(path)
    m = g.metadata
    kind = m.get("tokenizer.ggml.model")
    tokens = m.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{g.path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
    if kind == "gpt2":
        backend = _byte_level_bpe(g)
    elif kind == "llama":
        backend = _sentencepiece_bpe(g)
    else:
        raise CheckpointError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported "
                              "(gpt2: byte-level BPE; llama: SentencePiece BPE)")
    _add_special_tokens(backend, g, byte_level=kind == "gpt2")
    special = _special_tokens(g)
    add_bos, add_eos = _add_bos_eos(g, kind)
    backend.post_processor = _post_processor(g, special, add_bos, add_eos)
    files = {
        "tokenizer_config.json": _tokenizer_config(g, backend, special, add_bos, add_eos),
        "special_tokens_map.json": special,
        "generation_config.json": _generation_config(g),
    }
    return GGUFTokenizer(backend, files)


def write_hf_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json
    for the GGUF file `path` into `out_dir`, each atomically: what transformers loads as this tokenizer."""
    tok = gguf_tokenizer(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "tokenizer.json", lambda p: tok.backend.save(p))
    for name, content in tok.files.items():
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        atomic_write(out / name, lambda p, t=text: Path(p).write_text(t, encoding="utf-8"))


# ------------------------------------------------------------------------------------------ backends
def _byte_level_bpe(g: GGUFFile) -> Tokenizer:
    """GPT-2-style BPE over bytes, split first by the file's pre-tokenizer (tokenizer.ggml.pre)."""
    m = g.metadata
    pre = m.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{g.path}: tokenizer.ggml.pre {pre!r} is not a known pre-tokenizer "
                              f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    vocab = {_byte_spelling(t): i for i, t in enumerate(m["tokenizer.ggml.tokens"])}
    merges = [_merge_pair(g, line) for line in m.get("tokenizer.ggml.merges") or []]
    try:
        model = BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=pre in _LLAMA3_FAMILY)
    except Exception as err:  # a merge naming a token the vocabulary lacks
        raise CheckpointError(f"{g.path}: inconsistent BPE vocabulary and merges ({err})") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[pre]())
    tok.decoder = decoders.ByteLevel()
    return tok


def _merge_pair(g: GGUFFile, line: str) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 2:
        raise CheckpointError(f"{g.path}: malformed merge {line!r} in tokenizer.ggml.merges")
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's printable spelling of each byte: printable Latin-1 as itself, the others from U+0100 on."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return tuple(chr(b) if b in keep else chr(next(others)) for b in range(256))


@lru_cache(maxsize=1)
def _byte_alphabet() -> frozenset[str]:
    return frozenset(_byte_chars())


def _byte_spelling(token: str) -> str:
    """A token in the byte alphabet as it is; one written in plain text (a llama.cpp slip) respelled."""
    if _byte_alphabet().issuperset(token):
        return token
    return "".join(_byte_chars()[b] for b in token.encode("utf-8"))


def _sentencepiece_bpe(g: GGUFFile) -> Tokenizer:
    """SentencePiece BPE: U+2581 for spaces, merges ranked by the merged token's score, unknown
    characters as <0xNN> byte tokens."""
    m = g.metadata
    tokens = m["tokenizer.ggml.tokens"]
    scores = m.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise CheckpointError(f"{g.path}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = m.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = BPE(vocab, spm_merges(tokens, scores, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    # Spaces become U+2581 and, as SentencePiece and llama.cpp do, one more goes in front of the text and
    # after every special token (a normalizer runs on each stretch between added tokens), even where the
    # text already starts with a space. (Metaspace's "first" scheme, which transformers uses, adds none there.)
    prefix = m.get("tokenizer.ggml.add_space_prefix", True)
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scores: every split of a token into two vocabulary
    tokens, ranked by the whole token's score (higher first), then by longer left and right parts;
    splits of one token in vocabulary-id order. (The order transformers derives as well.)"""
    ranked = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked += [(score, len(left), len(right), left, right) for left, right in pairs]
    ranked.sort(key=lambda r: r[:3], reverse=True)  # stable: ties keep the order above
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tok: Tokenizer, g: GGUFFile, byte_level: bool) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens (matched whole)."""
    m = g.metadata
    tokens, types = m["tokenizer.ggml.tokens"], m.get("tokenizer.ggml.token_type") or []
    alphabet = _byte_alphabet()
    # In a byte-level vocabulary a token outside the byte alphabet was respelled above; as written it is
    # not in the vocabulary, and adding it would grow the vocabulary past the model's rows.
    usable = [not byte_level or alphabet.issuperset(t) for t in tokens]
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind, ok in zip(tokens, types, usable) if kind == CONTROL and ok]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind, ok in zip(tokens, types, usable) if kind == USER_DEFINED and ok]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


# ------------------------------------------------------------------------------------ config files
def _special_tokens(g: GGUFFile) -> dict[str, str]:
    """bos/eos/unk/pad token text from the file's ids (special_tokens_map.json)."""
    m = g.metadata
    tokens = m["tokenizer.ggml.tokens"]
    keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}
    found = {}
    for name, key in keys.items():
        token_id = m.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            found[name] = tokens[token_id]
    return found


def _add_bos_eos(g: GGUFFile, kind: str) -> tuple[bool, bool]:
    """The file's flags; without one, llama.cpp adds BOS for SentencePiece and Llama 3 vocabularies."""
    m = g.metadata
    default = kind == "llama" or m.get("tokenizer.ggml.pre") in _LLAMA3_FAMILY
    add_bos = m.get("tokenizer.ggml.add_bos_token", default)
    return bool(add_bos), bool(m.get("tokenizer.ggml.add_eos_token", False))


def _post_processor(g: GGUFFile, special: dict[str, str], add_bos: bool, add_eos: bool):
    """BOS / EOS around each sequence as the flags say (transformers reads add_bos from here)."""
    m = g.metadata
    bos = [(special["bos_token"], m["tokenizer.ggml.bos_token_id"])] if add_bos and "bos_token" in special else []
    eos = [(special["eos_token"], m["tokenizer.ggml.eos_token_id"])] if add_eos and "eos_token" in special else []
    if not bos and not eos:
        return None
    first = [f"{t}:0" for t, _ in bos] + ["$A:0"] + [f"{t}:0" for t, _ in eos]
    second = [f"{t}:1" for t, _ in bos] + ["$B:1"] + [f"{t}:1" for t, _ in eos]
    specials = list(dict(bos + eos).items())
    return processors.TemplateProcessing(single=first, pair=first + second, special_tokens=specials)


def _tokenizer_config(g: GGUFFile, backend: Tokenizer, special: dict[str, str], add_bos: bool,
                      add_eos: bool) -> dict[str, Any]:
    m = g.metadata
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(backend.get_added_tokens_decoder().items())
        },
    }
    context = m.get(f"{m.get('general.architecture')}.context_length")
    if context:
        config["model_max_length"] = int(context)
    template = _chat_template(m)
    if template is not None:
        config["chat_template"] = template
    return config


def _chat_template(m: dict[str, Any]) -> str | list[dict[str, str]] | None:
    """tokenizer.chat_template, or with named variants (tokenizer.chat_template.NAME) the list form."""
    default = m.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {key[len(prefix):]: value for key, value in m.items() if key.startswith(prefix) and isinstance(value, str)}
    if not named:
        return default if isinstance(default, str) and default else None
    listed = [{"name": "default", "template": default}] if isinstance(default, str) and default else []
    return listed + [{"name": name, "template": text} for name, text in named.items()]


def _generation_config(g: GGUFFile) -> dict[str, Any]:
    m = g.metadata
    ids = {key: m.get(f"tokenizer.ggml.{key}") for key in ("bos_token_id", "eos_token_id", "padding_token_id")}
    stops = [m.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    stops = list(dict.fromkeys(s for s in stops if s is not None))
    config: dict[str, Any] = {}
    if ids["bos_token_id"] is not None:
        config["bos_token_id"] = ids["bos_token_id"]
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if ids["padding_token_id"] is not None:
        config["pad_token_id"] = ids["padding_token_id"]
    return config
