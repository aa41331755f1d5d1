"""The checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library, plus the special
tokens and chat template from the files beside it. transformers is never imported. A `.gguf` file
has no such files: models.gguf_tokenizer builds the backend and the same files' contents from its
metadata, and the rules below apply to them unchanged.

Special tokens
    bos/eos/pad/unk come from tokenizer_config.json; in a config without "added_tokens_decoder"
    (the legacy layout) special_tokens_map.json overrides it, as transformers does. A value may be a
    string or a dict with "content". A token the tokenizer files do not name falls back to
    generation_config.json's *_token_id (an int, or a list whose first entry counts), then to
    config.json's. The pad token falls back to the EOS token. As in transformers, the named special
    tokens are registered as special added tokens of the backend (appended when missing from the
    vocabulary), so they are matched whole in text and skipped by decode(skip_special_tokens=True).

BOS
    `add_bos` is tokenizer_config.json's "add_bos_token" when present, else whether tokenizer.json's
    post-processor prepends the BOS token. This is what transformers 4.x's LlamaTokenizerFast did and
    what transformers 5.x does when given add_bos_token explicitly; transformers 5.x loading a
    directory with default arguments ignores "add_bos_token" whenever tokenizer.json exists and
    follows the post-processor alone (the two only differ where the files disagree).
    encode() builds ids from the text alone (the post-processor's other additions, e.g. an EOS, are
    left out: callers append EOS where a target ends) and then prepends BOS unless the text already
    starts with it, so a chat template that renders `bos_token` never yields two.

Chat template
    From chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list of
    {"name", "template"} from which "default" is taken), else chat_template.json's "chat_template".
    It is rendered like transformers' apply_chat_template(tokenize=False): jinja2's immutable sandbox
    with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not
    HTML-escape, `strftime_now`, `namespace`, a no-op `{% generation %}` block, and the variables
    messages, tools (None), documents (None), add_generation_prompt and the checkpoint's own special
    tokens (bos_token, eos_token, ... only those it names). Message keys whose value is None are dropped
    and reasoning is copied under reasoning_content and thinking, as transformers does.
    A checkpoint without a template gets BUILTIN_CHAT_TEMPLATE, a ChatML-style layout:

        <|im_start|>system\\n{content}<|im_end|>\\n
        <|im_start|>user\\n{content}<|im_end|>\\n
        <|im_start|>assistant\\n{content}<|im_end|>\\n
        <|im_start|>assistant\\n          (the generation prompt, when asked for)

    The markers are plain text unless the vocabulary has them as tokens.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from models.files import read_json_object
from models.gguf import is_gguf
from models.gguf_tokenizer import gguf_tokenizer, write_hf_tokenizer
from models.hub import CheckpointError, resolve_model_dir

BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The files a tokenizer is made of; save() copies those that exist.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a chat template sees as variables.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_object(path: Path, required: bool = False) -> dict:
    if not required and not path.is_file():
        return {}
    return read_json_object(path, missing=f"missing ({path.name} is required to load the tokenizer)")


def _token_text(value: Any) -> str | None:
    """A special token as written in the configs: "<s>", {"content": "<s>", ...} or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first_id(value: Any) -> int | None:
    """generation_config-style id: an int, or a list whose first entry is the main one."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _all_ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _named_tokens(config: dict, special_map: dict) -> dict[str, str]:
    """Named special tokens, with transformers' precedence between the two files."""
    merged = dict(config)
    if "added_tokens_decoder" not in config:
        merged.update(special_map)  # transformers reads special_tokens_map.json only in this legacy case
    named = {key: _token_text(merged.get(key)) for key in NAMED_TOKENS}
    return {key: text for key, text in named.items() if text is not None}


def _extra_tokens(config: dict, special_map: dict) -> list[str]:
    """additional_special_tokens / extra_special_tokens, which transformers also registers as special."""
    found: list[str] = []
    for source in (config, special_map):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = source.get(key)
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
            found += [t for t in map(_token_text, items) if t and t not in found]
    return found


def _chat_template(root: Path | None, config: dict) -> str | None:
    """The checkpoint's default template, in transformers' order of precedence (see module docstring);
    root None: no files beside the config to look at."""
    jinja = root / "chat_template.jinja" if root is not None else None
    if jinja is not None and jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{jinja}: unreadable ({err})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    template = _read_object(root / "chat_template.json").get("chat_template") if root is not None else None
    return template if isinstance(template, str) and template else None


@lru_cache(maxsize=1)
def _generation_extension() -> type:
    """jinja2 extension for `{% generation %}...{% endgeneration %}` (assistant-mask markers): renders the body."""

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return GenerationBlock


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile a chat template in an environment equivalent to transformers' (see module docstring)."""

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes, which would change what templates render
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateNamespace(jinja2.utils.Namespace):
        # templates come from the hub: no dunder/private attributes that could reach CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates cannot set underscore attributes on a namespace ({name!r})")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_generation_extension(), jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


class Tokenizer:
    """A checkpoint's tokenizer; build it with load_tokenizer(). See the module docstring for the rules."""

    vocab_size: int  # ids the tokenizer can produce: base vocabulary plus added tokens
    bos_id: int | None
    eos_id: int
    pad_id: int  # the EOS id when the checkpoint names no pad token
    bos_token: str | None
    eos_token: str
    add_bos: bool
    chat_template: str | None  # the checkpoint's own; None means BUILTIN_CHAT_TEMPLATE is used
    stop_ids: set[int]  # eos_id plus generation_config.json's extra eos ids

    def __init__(self, root: str | os.PathLike, backend: _Backend | None = None,
                 files: dict[str, dict] | None = None) -> None:
        """root: a checkpoint directory, whose files are read. Or, given `backend` and `files` (file
        name -> JSON object, e.g. what models.gguf_tokenizer builds from a GGUF file), the file they
        describe: nothing more is read from disk."""
        self.root = Path(root)
        self._files = files
        self._backend = self._load_backend() if backend is None else _unbounded(backend)
        config = self._object("tokenizer_config.json")
        special_map = self._object("special_tokens_map.json")
        generation = self._object("generation_config.json")
        model_config = self._object("config.json")
        self._named = _named_tokens(config, special_map)
        self._register_special_tokens(list(self._named.values()) + _extra_tokens(config, special_map))
        self.vocab_size = max(self._backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._set_ids(generation, model_config)
        self.add_bos = self._resolve_add_bos(config)
        self.stop_ids = {self.eos_id, *_all_ids(generation.get("eos_token_id"))}
        self.chat_template = _chat_template(self.root if files is None else None, config)
        # transformers only cleans up decoded spaces for non-BPE models, and only when asked to
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and self._model_type() != "BPE"

    # --- loading -------------------------------------------------------------------------------------
    def _object(self, name: str) -> dict:
        if self._files is not None:
            return self._files.get(name, {})
        return _read_object(self.root / name)

    def _load_backend(self) -> _Backend:
        path = self.root / "tokenizer.json"
        _read_object(path, required=True)  # a clear error for missing or non-JSON files first
        try:
            backend = _Backend.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception on a schema mismatch
            raise CheckpointError(f"{path}: not a tokenizer the tokenizers library can load ({err})") from None
        return _unbounded(backend)

    def _register_special_tokens(self, tokens: list[str]) -> None:
        """Mark the configs' special tokens as special added tokens, as transformers does on load."""
        known = {t.content for t in self._backend.get_added_tokens_decoder().values() if t.special}
        missing = [t for t in dict.fromkeys(tokens) if t not in known]
        if missing:
            self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    def _id_of(self, key: str, generation: dict, model_config: dict) -> tuple[str | None, int | None]:
        """(token, id) of `key` ("bos"/"eos"/"pad"): the tokenizer files first, then the model configs."""
        text = self._named.get(f"{key}_token")
        if text is not None:
            return text, self._backend.token_to_id(text)
        for source in (generation, model_config):
            token_id = _first_id(source.get(f"{key}_token_id"))
            if token_id is not None and 0 <= token_id < self.vocab_size:
                return self._backend.id_to_token(token_id), token_id
        return None, None

    def _set_ids(self, generation: dict, model_config: dict) -> None:
        self.bos_token, self.bos_id = self._id_of("bos", generation, model_config)
        eos_token, eos_id = self._id_of("eos", generation, model_config)
        if eos_token is None or eos_id is None:
            raise CheckpointError(f"{self.root / 'tokenizer_config.json'}: no eos_token (nor an eos_token_id in "
                                  "generation_config.json or config.json)")
        self.eos_token, self.eos_id = eos_token, eos_id
        _, pad_id = self._id_of("pad", generation, model_config)
        self.pad_id = self.eos_id if pad_id is None else pad_id

    def _resolve_add_bos(self, config: dict) -> bool:
        if self.bos_id is None:
            return False
        if isinstance(config.get("add_bos_token"), bool):
            return config["add_bos_token"]
        # No setting: whatever tokenizer.json's post-processor does (Llama 3 adds BOS there, Qwen does not).
        probe = "a"
        plain = self._backend.encode(probe, add_special_tokens=False).ids
        full = self._backend.encode(probe, add_special_tokens=True).ids
        return full[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

    def _model_type(self) -> str:
        return type(self._backend.model).__name__

    # --- public API ----------------------------------------------------------------------------------
    @property
    def backend(self) -> _Backend:
        """The `tokenizers.Tokenizer` underneath: vocabulary, merges, pre-tokenizer (e.g. to export them)."""
        return self._backend

    @property
    def named_tokens(self) -> dict[str, str]:
        """Role -> token text, as the checkpoint names them ("bos_token", "eos_token", "unk_token", ...)."""
        return dict(self._named)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when `add_bos` (None: the checkpoint's add_bos), never twice."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special tokens (BOS, EOS, pad, template markers) are dropped by default."""
        # int(): accept tensors and numpy arrays, whose elements the Rust side rejects
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """`messages` rendered with the chat template, as transformers' apply_chat_template(tokenize=False)."""
        template = _compile_template(self.chat_template or BUILTIN_CHAT_TEMPLATE)
        messages = [_normalize_message(m) for m in messages]
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **self._named)

    def save(self, out_dir: str | os.PathLike) -> None:
        """Copy the tokenizer files that exist into `out_dir` (created if needed); for a GGUF file's
        tokenizer, write the Hugging Face files built from it."""
        out = Path(out_dir)
        if is_gguf(self.root):
            write_hf_tokenizer(self.root, out)
            return
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() == self.root.resolve():
            return
        for name in TOKENIZER_FILES:
            if (self.root / name).is_file():
                shutil.copyfile(self.root / name, out / name)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.root)!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, add_bos={self.add_bos})")


# Names a message's reasoning goes by; templates read the first (Qwen3) or "thinking" (gpt-oss).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_message(message: Any) -> Any:
    """As transformers: drop keys whose value is None, and copy reasoning under the names templates read."""
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts, got {type(message).__name__}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization (WordPiece-era space fixes), same replacements in the same order."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def _unbounded(backend: _Backend) -> _Backend:
    """Callers decide about length and padding; a limit baked into tokenizer.json would cut silently."""
    backend.no_truncation()
    backend.no_padding()
    return backend


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint directory, hub id or `.gguf` file (resolved by
    models.hub.resolve_model_dir; a GGUF file's is built from its metadata by models.gguf_tokenizer)."""
    location = resolve_model_dir(path_or_hub_id)
    if is_gguf(location):
        built = gguf_tokenizer(location)
        return Tokenizer(location, built.backend, built.files)
    return Tokenizer(location)
