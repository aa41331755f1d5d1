"""Property-based fuzzing of the data path: JSONL bytes -> records -> (chat) rendering -> token ids.

Every input must either load or raise DataError naming its file and line; nothing may escape from
deep inside (KeyError, TypeError, jinja2 errors, tokenizer panics, RecursionError).
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from models.tokenizer import load_tokenizer
from tests.conftest import make_tokenizer_files
from train.data import build_examples, generation_prompt, tokenize_record
from train.records import DataError, parse_record
from train.sources import read_records

# FUZZ_EXAMPLES=3000 for a longer hunt (that many pass); the suite's default keeps it under a few seconds.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# ChatML with the checks real templates make (role order, a system message only first).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def chat_tokenizer():
    """The trainer tests' byte-level BPE (<pad>, <s>, </s>) with a chat template, built once."""
    root = Path(tempfile.mkdtemp(prefix="fuzz_tok_"))
    make_tokenizer_files(root)
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return load_tokenizer(root)


KEYS = ["text", "prompt", "completion", "instruction", "input", "output", "messages", "role", "content", "x"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
           | st.sampled_from(["<s>", "</s>", "{{ bos_token }}", "{% raw %}", "\ud800", "\x00", "<|im_start|>"]))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=14)
tricky_text = st.text(max_size=20) | st.sampled_from(["", " ", "</s>", "<s>", "<pad>", "{{ x }}", "{%", "\n\n", "\ud83d"])
roles = st.sampled_from(["user", "assistant"]) | st.sampled_from(["system", "tool", "", "User", "bot", "{{ 1 }}"])
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": tricky_text},
                          optional={"name": tricky_text, "reasoning_content": tricky_text | st.none(),
                                    "extra": json_values}),
    min_size=0, max_size=5)
plain_text = st.text(st.characters(codec="utf-8"), max_size=20)
plain_chats = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": plain_text}),
                       min_size=1, max_size=5)
shaped_records = st.one_of(
    st.fixed_dictionaries({"text": tricky_text | json_values}),
    st.fixed_dictionaries({"prompt": tricky_text, "completion": tricky_text | json_values}),
    st.fixed_dictionaries({"instruction": tricky_text, "output": tricky_text},
                          optional={"input": tricky_text | st.none() | json_values}),
    st.fixed_dictionaries({"messages": messages | json_values}),
)
raw_lines = st.one_of(
    st.binary(max_size=24),
    st.text(max_size=24).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    shaped_records.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.sampled_from([b"NaN", b"[" * 5000 + b"]" * 5000, b"\xef\xbb\xbf{}", b'{"text": "a"} trailing', b"1e999999",
                     b"9" * 5000, b'{"text": "\\ud800"}', b"\r", b"\x00"]),
)


def _line_of(err: DataError, path: Path) -> int | None:
    match = re.match(re.escape(str(path)) + r":(\d+): ", str(err))
    return int(match.group(1)) if match else None


@FUZZ
@given(st.lists(raw_lines, min_size=1, max_size=5))
def test_reader_loads_every_line_or_names_the_bad_one(lines):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.jsonl"
        content = b"\n".join(lines)
        path.write_bytes(content)
        n_lines = content.count(b"\n") + 1  # a generated line may hold newlines of its own
        try:
            records = read_records(path)
        except DataError as err:
            line = _line_of(err, path)
            assert line is not None or "empty" in str(err), str(err)
            if line is not None:
                assert 1 <= line <= n_lines and err.line == line
            return
        assert all(1 <= r.line <= n_lines for r in records)
        try:  # whatever loads also tokenizes, or its chat template refuses it, naming the line
            build_examples(records, chat_tokenizer(), seq_len=64)
        except DataError as err:
            assert _line_of(err, path) in {r.line for r in records}, str(err)


@FUZZ
@given(json_values | shaped_records, st.integers(1, 10**6))
def test_record_shapes_parse_or_raise_data_error_with_the_line(obj, line):
    try:
        record = parse_record(obj, "data.jsonl", line)
    except DataError as err:
        assert str(err).startswith(f"data.jsonl:{line}: ") and err.line == line
        return
    assert record.line == line


@FUZZ
@given(messages | plain_chats)
def test_chat_records_render_and_tokenize_or_raise_data_error(msgs):
    tokenizer = chat_tokenizer()
    try:
        record = parse_record({"messages": msgs}, "chat.jsonl", 7)
        example = tokenize_record(record, tokenizer)
        ids, reference = generation_prompt(record, tokenizer)
    except DataError as err:
        assert str(err).startswith("chat.jsonl:7: "), str(err)
        event("refused")
        return
    event("tokenized")
    assert len(example.input_ids) == len(example.labels) and example.labels[0] == -100
    assert all(0 <= i < tokenizer.vocab_size for i in example.input_ids + ids)
    assert isinstance(reference, str)
