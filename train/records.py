"""Training records: one raw row (a JSONL line, a CSV row, ...), validated, in one of four shapes.

    {"text": "..."}                                          language modelling: every token is a target
    {"prompt": "...", "completion": "..."}                   loss on the completion only
    {"instruction": "...", "input": "...", "output": "..."}  Alpaca; "input" optional (see ALPACA_PROMPT)
    {"messages": [{"role": "user", "content": "..."}, ...]}  chat template; loss on assistant turns only

Extra keys are ignored. Columns named otherwise are renamed to these by a field map (FIELD_FLAGS:
--text-field etc.); ShareGPT's "conversations" ([{"from": "human"|"gpt"|"system", "value": ...}]) is
the chat shape too. Anything else is a DataError naming the file and line (or row). Where rows come
from (formats, directories, hub datasets) is train.sources; turning records into tokens is train.data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

SHAPES = ("text", "prompt_completion", "alpaca", "chat")

# Stanford Alpaca's templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)



class DataError(ValueError):
    """Bad training data; the message starts with "file:line:" when a line is to blame."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None) -> None:
        where = f"{path}:{line}: " if path is not None and line is not None else f"{path}: " if path else ""
        super().__init__(where + message)
        self.path, self.line = (str(path) if path is not None else None), line


# --- reading -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One validated JSONL line. prompt/target for the first three shapes, messages for chat."""

    shape: str  # one of SHAPES
    prompt: str = ""  # text without loss ("" for shape text); Alpaca is already rendered here
    target: str = ""  # text with loss: the text, the completion, the Alpaca output
    messages: tuple[dict[str, Any], ...] = ()  # chat only
    path: str = "<memory>"  # where it came from, for error messages
    line: int = 0


def render_alpaca(instruction: str, input: str = "") -> str:
    """The Alpaca prompt; the no-input variant when `input` is empty. The output follows it directly."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


_FAMILIES = {  # shape -> keys that signal it (any one) and keys it requires
    "text": ({"text"}, ("text",)),
    "prompt_completion": ({"prompt", "completion"}, ("prompt", "completion")),
    "alpaca": ({"instruction", "output"}, ("instruction", "output")),
    "chat": ({"messages"}, ("messages",)),
}
_EXPECTED = 'expected {"text"}, {"prompt","completion"}, {"instruction","input","output"} or {"messages"}'

# The keys a field map may rename (-> the flag that does it); DataConfig holds them as text_field etc.
FIELD_FLAGS = {"text": "--text-field", "prompt": "--prompt-field", "completion": "--completion-field",
               "messages": "--messages-field"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def apply_field_map(obj: dict, fields: Mapping[str, str | None], path, line) -> dict:
    """`obj` with each mapped column renamed to its usual key ({"text": "body"}: body -> text).

    The renamed column replaces a column already called by the usual name: that one is some other
    data, and the flag says which column to learn from. A mapped column that is absent is an error.
    """
    out = dict(obj)
    for key, column in fields.items():
        if column is None or column == key:
            continue
        if column not in obj:
            raise DataError(f"no column {column!r} ({FIELD_FLAGS.get(key, key)}); got keys {sorted(obj)}", path, line)
        out.pop(column)
        out[key] = obj[column]
    return out


def parse_record(obj: Any, path: str | Path = "<memory>", line: int = 0,
                 fields: Mapping[str, str | None] | None = None) -> Record:
    """Validate one raw row and return its Record; DataError(path:line) if it fits no shape.

    `fields` maps usual keys to the row's column names (see apply_field_map); None: the usual names.
    """
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, line)
    if fields:
        obj = apply_field_map(obj, fields, path, line)
    obj = _from_sharegpt(obj, path, line)
    shapes = [s for s, (signals, _) in _FAMILIES.items() if signals & obj.keys()]
    if not shapes:
        raise DataError(f"{_EXPECTED}; got keys {sorted(obj)}", path, line)
    if len(shapes) > 1:
        raise DataError(f"ambiguous record: has keys of shapes {' and '.join(shapes)}", path, line)
    shape = shapes[0]
    for key in _FAMILIES[shape][1]:
        if key not in obj:
            raise DataError(f"{shape} record without {key!r}", path, line)
    if shape == "chat":
        return Record("chat", messages=_check_messages(obj["messages"], path, line), path=str(path), line=line)
    strings = {k: _string(obj, k, path, line) for k in _FAMILIES[shape][1]}
    if shape == "text":
        return Record("text", target=strings["text"], path=str(path), line=line)
    if shape == "prompt_completion":
        return Record(shape, strings["prompt"], strings["completion"], path=str(path), line=line)
    extra = "" if obj.get("input") is None else _string(obj, "input", path, line)  # null == absent
    prompt = render_alpaca(strings["instruction"], extra)
    return Record("alpaca", prompt, strings["output"], path=str(path), line=line)


def _string(obj: dict, key: str, path, line) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {type(value).__name__}", path, line)
    _check_text(value, key, path, line)
    return value


def _check_text(value: Any, where: str, path, line) -> None:
    """Reject unpaired surrogates: JSON lets "\\ud800" through, but it is not text and no tokenizer takes it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where} holds an unpaired surrogate escape (like \\ud800): not valid text", path, line) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where, path, line)
            _check_text(v, f"{where}.{k}", path, line)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]", path, line)


def _from_sharegpt(obj: dict, path, line) -> dict:
    """A ShareGPT row ("conversations", or "messages" of {"from", "value"}) as a chat row of role/content.

    Only role and content are kept: ShareGPT's other per-turn keys (weight, ...) mean nothing to a
    chat template, and the masking must be exactly that of the same chat messages.
    """
    if "conversations" in obj:
        if "messages" in obj:
            raise DataError("ambiguous record: has both 'messages' and 'conversations'", path, line)
        obj = {k: v for k, v in obj.items() if k != "conversations"} | {"messages": obj["conversations"]}
        where = "conversations"
    else:
        where = "messages"
    turns = obj.get("messages")
    if not isinstance(turns, list) or not any(isinstance(t, dict) and "from" in t and "role" not in t for t in turns):
        return obj  # not ShareGPT-style: _check_messages reports any other problem
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}[{i}] must be an object, got {type(turn).__name__}", path, line)
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            raise DataError(f"{where}[{i}].from must be one of {sorted(SHAREGPT_ROLES)}, got {turn.get('from')!r}",
                            path, line)
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}[{i}].value must be a string", path, line)
        messages.append({"role": role, "content": turn["value"]})
    return obj | {"messages": messages}


def _check_messages(messages: Any, path, line) -> tuple[dict[str, Any], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list", path, line)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"messages[{i}] must be an object, got {type(m).__name__}", path, line)
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise DataError(f"messages[{i}].{key} must be a string", path, line)
        _check_text(m, f"messages[{i}]", path, line)  # the whole message: the template may render any key
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("chat record has no assistant message, so nothing to learn", path, line)
    return tuple(dict(m) for m in messages)
