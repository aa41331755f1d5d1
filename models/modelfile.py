"""An Ollama Modelfile beside an exported GGUF: the chat template in Go template syntax, the system
prompt the template inserts, and a stop string per stop token.

    FROM ./model.gguf
    TEMPLATE \"\"\"...\"\"\"
    SYSTEM \"\"\"...\"\"\"          (when the chat template inserts a default system prompt)
    PARAMETER stop "<|im_end|>"

Translation
    Ollama renders a prompt with a Go template over `.Messages` (each with `.Role`, `.Content`) and
    `.System` (the system messages' contents); when a conversation has no system message it first
    prepends one holding the Modelfile's SYSTEM. Two template families are translated: ChatML
    (`<|im_start|>role\\n...<|im_end|>\\n`: SmolLM2, Qwen) and Llama 3 (`<|start_header_id|>role
    <|end_header_id|>\\n\\n...<|eot_id|>`). Both are "per message: open + role + close + content + end,
    then the generation prompt"; the jinja template is rendered on probe conversations to read the
    rest off it (`ChatFormat`): the text it puts before a system message's content (Llama 3.1's dated
    preamble) and the system prompt it inserts when there is none (SmolLM2's, Qwen2.5's), which becomes
    SYSTEM. The result is checked by rendering four conversations both ways (`ChatFormat.render` models
    what Ollama renders from the emitted template); any other template, or one that fails the check,
    gets no TEMPLATE line but a comment saying so, and Ollama then picks the closest of its built-in
    templates from the GGUF's tokenizer.chat_template.

    The BOS token: llama.cpp adds it when tokenizer.ggml.add_bos_token is set, so a template that renders
    it keeps it only when the tokenizer would not add it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError

from models.files import atomic_write
from models.tokenizer import BUILTIN_CHAT_TEMPLATE, Tokenizer

# family -> (marker in the jinja source, open, close, end): a message is open + role + close + content + end
FAMILIES = {
    "chatml": ("<|im_start|>", "<|im_start|>", "\n", "<|im_end|>\n"),
    "llama3": ("<|start_header_id|>", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>"),
}

# Probe contents: plain words, so no template trims or escapes them.
_S, _A, _B, _C = "Probe system text.", "Probe question one?", "Probe answer.", "Probe question two?"
PROBES = (
    [{"role": "user", "content": _A}],
    [{"role": "system", "content": _S}, {"role": "user", "content": _A}],
    [{"role": "user", "content": _A}, {"role": "assistant", "content": _B}, {"role": "user", "content": _C}],
    [{"role": "system", "content": _S}, {"role": "user", "content": _A}, {"role": "assistant", "content": _B},
     {"role": "user", "content": _C}],
)


@dataclass(frozen=True)
class ChatFormat:
    """A per-message chat layout, enough to write it as an Ollama template and to render it as Ollama would."""

    family: str
    open: str  # before the role
    close: str  # between the role and the content
    end: str  # after the content
    system_prefix: str = ""  # before a system message's content
    default_system: str | None = None  # the system content inserted when a conversation has none
    bos: str = ""  # literal text first: a BOS the template renders and the tokenizer would not add

    def _block(self, role: str, content: str) -> str:
        return f"{self.open}{role}{self.close}{content}{self.end}"

    @property
    def always_system(self) -> bool:
        """The template writes a system block even with nothing in it (Llama 3.1's preamble)."""
        return self.default_system == ""

    def go_template(self) -> str:
        """The Ollama (Go text/template) TEMPLATE; no whitespace trimming, so every literal is exact."""
        system = f"{self.open}system{self.close}{self.system_prefix}{{{{ .System }}}}{self.end}"
        if not self.always_system:
            system = f"{{{{ if .System }}}}{system}{{{{ end }}}}"
        turn = f"{self.open}{{{{ .Role }}}}{self.close}{{{{ .Content }}}}{self.end}"
        turns = f'{{{{ range .Messages }}}}{{{{ if ne .Role "system" }}}}{turn}{{{{ end }}}}{{{{ end }}}}'
        return f"{self.bos}{system}{turns}{self.open}assistant{self.close}"

    def render(self, messages: list[dict]) -> str:
        """What Ollama renders from go_template() for `messages`, SYSTEM prepended as Ollama does."""
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        out = self.bos
        if system or self.always_system:
            out += self._block("system", self.system_prefix + system)
        out += "".join(self._block(m["role"], m["content"]) for m in messages if m["role"] != "system")
        return out + f"{self.open}assistant{self.close}"


def expected_prompt(tokenizer: Tokenizer, messages: list[dict]) -> str:
    """The chat template's rendering with the generation prompt, less a leading BOS llama.cpp adds itself."""
    text = tokenizer.render_chat(messages, add_generation_prompt=True)
    bos = tokenizer.bos_token
    return text[len(bos):] if tokenizer.add_bos and bos and text.startswith(bos) else text


def chat_format(tokenizer: Tokenizer, template: str) -> tuple[ChatFormat | None, str]:
    """The template's ChatFormat, verified on PROBES, or (None, why not)."""
    family = next((name for name, spec in FAMILIES.items() if spec[0] in template), None)
    if family is None:
        return None, "the chat template is neither ChatML (<|im_start|>) nor Llama 3 (<|start_header_id|>)"
    _, open_, close, end = FAMILIES[family]
    try:
        fmt = _read_format(tokenizer, ChatFormat(family, open_, close, end))
        mismatch = next((m for m in PROBES if fmt is not None and fmt.render(m) != expected_prompt(tokenizer, m)), None)
    except (TemplateError, TypeError, ValueError) as err:
        return None, f"rendering the {family} chat template failed ({err})"
    if fmt is None or mismatch is not None:
        return None, f"the {family} chat template does not render messages one after another as {family} does"
    return fmt, f"{family} chat template translated"


def _read_format(tokenizer: Tokenizer, base: ChatFormat) -> ChatFormat | None:
    """Fill in bos, system_prefix and default_system from renderings of PROBES[1] and PROBES[0]."""
    head = f"{base.open}system{base.close}"
    with_system = expected_prompt(tokenizer, PROBES[1])
    if head not in with_system or _S not in with_system:
        return None
    # What precedes the first message: nothing, or a BOS the template renders and llama.cpp would not add
    # (the BOS token may also be the ChatML opener itself, as SmolLM2's <|im_start|> is).
    bos = with_system[:with_system.index(head)]
    if bos not in ("", tokenizer.bos_token):
        return None
    with_system = with_system.removeprefix(bos)
    prefix = with_system[len(head):with_system.index(_S)]
    without = expected_prompt(tokenizer, PROBES[0]).removeprefix(bos)
    user = f"{base.end}{base.open}user{base.close}{_A}"
    default = None
    if without.startswith(head + prefix) and user in without:
        default = without[len(head + prefix):without.index(user)]
    return ChatFormat(base.family, base.open, base.close, base.end, prefix, default, bos)


def _quoted(text: str) -> str | None:
    """A Modelfile string, read back verbatim by Ollama's parser (which has no escapes): in double quotes
    when the text has no quote or newline, else in triple double quotes; None when neither delimits it."""
    if '"' not in text and "\n" not in text:
        return f'"{text}"'
    return f'"""{text}"""' if '"""' not in text and not text.endswith('"') else None


def modelfile_text(gguf_name: str, tokenizer: Tokenizer, template: str, stop_ids: set[int]) -> tuple[str, list[str]]:
    """The Modelfile for `gguf_name` (a file beside it) and notes on what could not be written."""
    notes = []
    lines = ["# Ollama Modelfile written by ftkit's GGUF export: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    fmt, why = chat_format(tokenizer, template)
    go = _quoted(fmt.go_template()) if fmt else None
    if go is None:
        reason = why if fmt is None else "the translated template cannot be quoted in a Modelfile"
        notes.append(f"Modelfile has no TEMPLATE: {reason}; Ollama picks its closest built-in template "
                     "from the GGUF's tokenizer.chat_template (check it with `ollama show --template`)")
        lines.append(f"# TEMPLATE not written: {reason}.")
        lines.append("# Ollama falls back to its closest built-in template for the GGUF's tokenizer.chat_template.")
    else:
        lines.append(f"TEMPLATE {go}")
        if fmt.default_system:
            system = _quoted(fmt.default_system)
            if system is None:
                notes.append("the chat template's default system prompt cannot be quoted in a Modelfile: no SYSTEM")
            else:
                lines.append(f"SYSTEM {system}")
    for token_id in sorted(stop_ids):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        quoted = _quoted(text) if text.strip() else None
        if quoted is None:
            notes.append(f"stop token {token_id} ({text!r}) has no Modelfile spelling: no PARAMETER stop for it")
            continue
        lines.append(f"PARAMETER stop {quoted}")
    return "\n".join(lines) + "\n", notes


def modelfile_path(gguf_path: str | Path) -> Path:
    """Where the Modelfile of `gguf_path` goes: `Modelfile` in the same directory."""
    return Path(gguf_path).with_name("Modelfile")


def modelfile_for(gguf_path: Path, tokenizer: Tokenizer, ids: dict[str, int]) -> tuple[str, list[str]]:
    """The Modelfile text for `gguf_path` and notes: stop strings for the stop ids and the GGUF's eos/eot/eom."""
    stops = set(tokenizer.stop_ids) | {ids[k] for k in ("eos", "eot", "eom") if k in ids}
    # the Tokenizer renders with the built-in template when the checkpoint has none: so must Ollama
    return modelfile_text(gguf_path.name, tokenizer, tokenizer.chat_template or BUILTIN_CHAT_TEMPLATE, stops)


def write_modelfile(gguf_path: Path, text: str) -> Path:
    """Write `text` as the Modelfile beside `gguf_path` (atomically); returns its path."""
    path = modelfile_path(gguf_path)
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return path
