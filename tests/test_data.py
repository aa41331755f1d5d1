"""train.data: record shapes -> token ids and labels, packing, batching, errors, resumable order.

Most tests use CharTokenizer, a character-level stand-in with the attributes of
models.tokenizer.Tokenizer, so expected ids can be written by hand. One test runs the same records
through the real tokenizer when models.tokenizer is present.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from train.config import DataConfig
from train.data import (
    Example,
    PackedRow,
    build_examples,
    collate,
    count_target_tokens,
    generation_prompt,
    load_datasets,
    pack_examples,
    split_train_val,
    tokenize_record,
)
from train.loader import BatchSampler, StepLoader, eval_batches
from train.loss import IGNORE_INDEX
from train.records import ALPACA_PROMPT_NO_INPUT, DataError, parse_record, render_alpaca
from train.sources import read_records

M = IGNORE_INDEX
BOS, EOS, PAD = 1, 2, 0


class CharTokenizer:
    """id = 10 + ord(char); the strings "<s>" and "</s>" are the special tokens BOS=1 and EOS=2.

    Its chat template writes "[role]content" and closes each turn with "</s>" (or "\\n" with
    eos_in_template=False); the generation prompt is "[assistant]".
    """

    SPECIALS = {"<s>": BOS, "</s>": EOS}

    def __init__(self, add_bos=True, pad_id=PAD, eos_in_template=True, bos_in_template=False, consistent=True):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = 10 + 0x110000, BOS, EOS, pad_id
        self.add_bos, self.chat_template = add_bos, "fake"
        self.eos_in_template, self.bos_in_template, self.consistent = eos_in_template, bos_in_template, consistent

    def encode(self, text, add_bos=None):
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.SPECIALS if text.startswith(s, i)), None)
            ids.append(self.SPECIALS[special] if special else 10 + ord(text[i]))
            i += len(special) if special else 1
        return ([BOS] if (self.add_bos if add_bos is None else add_bos) else []) + ids

    def decode(self, ids, skip_special_tokens=True):
        names = {BOS: "<s>", EOS: "</s>"}
        return "".join(names.get(i, "") if i < 10 else chr(i - 10) for i in ids
                       if not (skip_special_tokens and i < 10))

    def render_chat(self, messages, add_generation_prompt=False):
        end = "</s>" if self.eos_in_template else "\n"
        out = "<s>" if self.bos_in_template else ""
        for m in messages:
            out += f"[{m['role']}]{m['content']}{end}"
        if not self.consistent:  # a template that rewrites history: count of turns up front
            out = f"{len(messages)}" + out
        return out + ("[assistant]" if add_generation_prompt else "")


def enc(text):
    return [10 + ord(c) for c in text]


def spans(ex: Example, tok) -> list[str]:
    """The labelled stretches of an example, decoded with specials kept."""
    out, cur = [], []
    for i, label in enumerate(ex.labels):
        if label != M:
            assert label == ex.input_ids[i]
            cur.append(label)
        elif cur:
            out, cur = out + [tok.decode(cur, skip_special_tokens=False)], []
    return out + ([tok.decode(cur, skip_special_tokens=False)] if cur else [])


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --- shapes ------------------------------------------------------------------------------------------
def test_text_every_token_is_a_target_except_position_0():
    tok = CharTokenizer()
    ex = tokenize_record(parse_record({"text": "hi"}), tok)
    assert ex.input_ids == [BOS, *enc("hi"), EOS]
    assert ex.labels == [M, *enc("hi"), EOS]
    tok.add_bos = False  # e.g. Qwen: no BOS, so the first text token is the unpredictable one
    ex = tokenize_record(parse_record({"text": "hi"}), tok)
    assert ex.input_ids == [*enc("hi"), EOS] and ex.labels == [M, *enc("i"), EOS]


def test_prompt_completion_prompt_tokens_carry_no_loss():
    ex = tokenize_record(parse_record({"prompt": "Q: 2+2?", "completion": " 4", "id": 7}), CharTokenizer())
    assert ex.input_ids == [BOS, *enc("Q: 2+2?"), *enc(" 4"), EOS]
    assert ex.labels == [M] * (1 + len("Q: 2+2?")) + [*enc(" 4"), EOS]


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}])
def test_alpaca_without_input(extra):
    ex = tokenize_record(parse_record({"instruction": "Say hi", "output": "hi", **extra}), CharTokenizer())
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi")
    assert prompt.endswith("### Instruction:\nSay hi\n\n### Response:\n")
    assert ex.input_ids == [BOS, *enc(prompt), *enc("hi"), EOS]
    assert ex.labels == [M] * (1 + len(prompt)) + [*enc("hi"), EOS]


def test_alpaca_with_input():
    record = parse_record({"instruction": "Translate", "input": "chat", "output": "cat"})
    assert record.prompt == render_alpaca("Translate", "chat")
    assert "### Input:\nchat\n\n### Response:\n" in record.prompt
    assert spans(tokenize_record(record, CharTokenizer()), CharTokenizer()) == ["cat</s>"]


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def test_chat_loss_only_on_assistant_turns_and_ids_equal_whole_render():
    tok = CharTokenizer()
    ex = tokenize_record(parse_record({"messages": CHAT}), tok)
    assert ex.input_ids == [BOS] + tok.encode(tok.render_chat(CHAT), add_bos=False)  # no extra EOS
    assert spans(ex, tok) == ["Hello</s>", "Ciao</s>"]  # the template's own end-of-turn EOS is learnt


def test_chat_bos_from_template_not_doubled_and_eos_added_when_template_has_none():
    tok = CharTokenizer(bos_in_template=True, eos_in_template=False)
    ex = tokenize_record(parse_record({"messages": CHAT}), tok)
    assert ex.input_ids[:2] == [BOS, 10 + ord("[")]
    assert ex.input_ids[-1] == EOS and ex.input_ids.count(EOS) == 1
    assert spans(ex, tok) == ["Hello\n", "Ciao\n</s>"]


def test_chat_ending_with_user_turn_gets_no_eos():
    tok = CharTokenizer(eos_in_template=False)
    ex = tokenize_record(parse_record({"messages": CHAT[:4]}), tok)
    assert EOS not in ex.input_ids and spans(ex, tok) == ["Hello\n"]


def test_chat_template_that_rewrites_history_is_rejected():
    with pytest.raises(DataError, match="prefix-consistent"):
        tokenize_record(parse_record({"messages": CHAT}, "f.jsonl", 4), CharTokenizer(consistent=False))


def test_generation_prompt():
    tok = CharTokenizer()
    ids, ref = generation_prompt(parse_record({"prompt": "Q", "completion": "A"}), tok)
    assert ids == [BOS, *enc("Q")] and ref == "A"
    ids, ref = generation_prompt(parse_record({"messages": CHAT}), tok)
    assert ids == [BOS] + tok.encode(tok.render_chat(CHAT[:4], add_generation_prompt=True), add_bos=False)
    assert ref == "Ciao"
    with pytest.raises(DataError):
        generation_prompt(parse_record({"text": "x"}), tok)


# --- padding, EOS, counting --------------------------------------------------------------------------
def test_eos_stays_in_labels_when_pad_equals_eos():
    tok = CharTokenizer(pad_id=EOS)
    a = tokenize_record(parse_record({"prompt": "ab", "completion": "c"}), tok)
    b = tokenize_record(parse_record({"prompt": "abcdef", "completion": "gh"}), tok)
    batch = collate([a, b], tok.pad_id)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, 10) for t in batch.values())
    assert batch["labels"][0].tolist() == [M, M, M, *enc("c"), EOS] + [M] * 5
    assert batch["input_ids"][0, 5:].tolist() == [EOS] * 5  # padding looks like EOS ...
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 5  # ... but is masked, and
    assert batch["labels"][1, -1].item() == EOS  # the real EOS keeps its label
    assert count_target_tokens(batch) == 2 + 3 == count_target_tokens(batch["labels"])


def test_count_target_tokens_applies_the_shift():
    labels = torch.tensor([[5, 6, M], [M, M, 7]])
    assert count_target_tokens(labels) == 2  # the 5 at position 0 is never predicted


# --- truncation --------------------------------------------------------------------------------------
def test_truncation_and_dropping_are_counted():
    records = [parse_record(r) for r in (
        {"prompt": "ab", "completion": "c"},  # 1 + 2 + 1 + 1 = 5 tokens: fits
        {"prompt": "ab", "completion": "cdefgh"},  # 10 tokens: truncated, keeps "cde"
        {"prompt": "abcdefgh", "completion": "x"},  # prompt fills the row: dropped
        {"text": "0123456789"},  # truncated
    )]
    examples, stats = build_examples(records, CharTokenizer(), seq_len=6, name="t.jsonl")
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (4, 3, 3, 1)
    assert examples[1].input_ids == [BOS, *enc("abcde")] and examples[1].labels == [M, M, M, *enc("cde")]
    assert all(len(e) <= 6 for e in examples)
    assert stats.target_tokens == 2 + 3 + 5 and stats.tokens == 5 + 6 + 6
    assert "3 truncated to 6 tokens" in stats.summary() and "1 dropped" in stats.summary()


# --- packing -----------------------------------------------------------------------------------------
def test_packing_restarts_positions_and_numbers_documents():
    tok = CharTokenizer()
    texts = ["ab", "cde", "fghi"]  # 4, 5, 6 tokens with BOS and EOS
    examples, _ = build_examples([parse_record({"text": t}) for t in texts], tok, seq_len=10)
    rows = pack_examples(examples, seq_len=10)
    assert [len(r) for r in rows] == [9, 6]
    assert rows[0].position_ids == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert rows[0].doc_ids == [0] * 4 + [1] * 5
    assert rows[0].input_ids == examples[0].input_ids + examples[1].input_ids
    assert rows[0].labels[4] == M  # no target across the document boundary
    batch = collate(rows, tok.pad_id)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0]
    assert batch["doc_ids"][1].tolist() == [0] * 6 + [-1] * 3
    assert count_target_tokens(batch) == sum(e.num_targets for e in examples)


def test_packed_examples_do_not_see_each_other():
    """Logits of a packed row equal those of each example run alone (block-diagonal mask + positions)."""
    from models.config import ModelConfig
    from models.decoder import Decoder

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Decoder(cfg).eval()
    examples = [Example([1, 5, 9, 2], [M, 5, 9, 2]), Example([1, 7, 8, 3, 2], [M, 7, 8, 3, 2])]
    batch = collate(pack_examples(examples, 16), pad_id=0)
    with torch.no_grad():
        packed = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
        alone = [model(torch.tensor([e.input_ids]))[0] for e in examples]
    torch.testing.assert_close(packed[0], torch.cat(alone), atol=1e-5, rtol=1e-5)


# --- errors ------------------------------------------------------------------------------------------
BAD_LINES = [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"foo": "bar"}', "expected"),
    ('{"text": "a", "prompt": "b", "completion": "c"}', "ambiguous"),
    ('{"prompt": "only"}', "without 'completion'"),
    ('{"prompt": "p", "completion": 3}', "'completion' must be a string"),
    ('{"text": null}', "'text' must be a string"),
    ('{"instruction": "i", "input": 5, "output": "o"}', "'input' must be a string"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', "content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant"),
    ('{"messages": ["hi"]}', "must be an object"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_raises_data_error_with_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "", line])
    with pytest.raises(DataError, match=message) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:3: ") and info.value.line == 3


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bin.jsonl:2: not valid UTF-8"):
        read_records(tmp_path / "bin.jsonl")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["text", "prompt", "completion", "instruction", "input", "output",
                                       "messages", "role", "content", "x"]), inner, max_size=4),
    max_leaves=10,
)
short = st.text(max_size=6)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": short})
valid_records = st.one_of(
    st.fixed_dictionaries({"text": short}),
    st.fixed_dictionaries({"prompt": short, "completion": short}),
    st.fixed_dictionaries({"instruction": short, "output": short}, optional={"input": short | st.none()}),
    st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=4)}),
)
lines = st.one_of(st.text(max_size=30), json_values.map(json.dumps), valid_records.map(json.dumps),
                  valid_records.map(json.dumps), valid_records.map(json.dumps))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, min_size=1, max_size=4))
def test_fuzz_reader_loads_or_raises_data_error(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.jsonl"
        path.write_text("\n".join(content), encoding="utf-8", errors="surrogatepass")
        try:
            records = read_records(path)
        except DataError:
            return
        build_examples(records, CharTokenizer(), seq_len=16)  # whatever loads also tokenizes


# --- split and order ---------------------------------------------------------------------------------
def test_val_split_is_seeded_disjoint_and_sized():
    records = [parse_record({"text": str(i)}, line=i) for i in range(20)]
    train, val = split_train_val(records, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert {r.line for r in train}.isdisjoint(r.line for r in val)
    assert split_train_val(records, 0.25, seed=3) == (train, val)
    assert split_train_val(records, 0.25, seed=4)[1] != val
    with pytest.raises(DataError):
        split_train_val(records[:1], 0.5, seed=0)


def test_batch_sampler_epochs_and_grad_accum():
    s = BatchSampler(num_items=10, batch_size=4, grad_accum=2, seed=0)
    assert (s.micro_batches_per_epoch, s.steps_per_epoch) == (3, 2)
    first, last = s.next_step(), s.next_step()
    assert [len(b) for b in first] == [4, 4] and [len(b) for b in last] == [2]  # never straddles epochs
    assert sorted(i for b in first + last for i in b) == list(range(10))
    assert s.epoch == 1 and s.index == 0
    assert s.epoch_order(0) != s.epoch_order(1)
    assert BatchSampler(10, 4, seed=0).epoch_order(1) == s.epoch_order(1)


def test_batch_sampler_resume_replays_the_same_batches():
    straight = BatchSampler(7, 2, grad_accum=1, seed=5)
    expected = [straight.next_step() for _ in range(10)]
    first = BatchSampler(7, 2, seed=5)
    got = [first.next_step() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchSampler(7, 2, seed=5)
    resumed.load_state_dict(state)
    assert got + [resumed.next_step() for _ in range(7)] == expected
    with pytest.raises(ValueError, match="num_items"):
        BatchSampler(8, 2, seed=5).load_state_dict(state)


def test_step_loader_collates_k_micro_batches_and_resumes():
    examples = [Example([1] + [10 + i] * (i % 3 + 1), [M] + [10 + i] * (i % 3 + 1)) for i in range(9)]
    loader = StepLoader(examples, batch_size=2, pad_id=0, grad_accum=2, seed=1)
    step = loader.next_step()
    assert len(step) == 2 and all(b["input_ids"].shape[0] == 2 for b in step)
    state = loader.state_dict()
    nxt = loader.next_step()
    again = StepLoader(examples, batch_size=2, pad_id=0, grad_accum=2, seed=1)
    again.load_state_dict(state)
    for a, b in zip(nxt, again.next_step()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(b["input_ids"].shape[0] for b in eval_batches(examples, 4, 0)) == 9


def test_load_datasets_split_and_pack(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "x" * (i % 5 + 1)} for i in range(20)])
    cfg = DataConfig(data=str(path), val_fraction=0.2, seq_len=16, pack=True, batch_size=2)
    ds = load_datasets(cfg, CharTokenizer(), seed=0)
    assert len(ds.train_records) == 16 and len(ds.val_records) == 4
    assert all(isinstance(r, PackedRow) and len(r) <= 16 for r in ds.train + ds.val)
    assert ds.train_stats.rows == len(ds.train) and "packed into" in ds.summary()
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "p", "completion": "c"}])
    ds = load_datasets(DataConfig(data=str(path), val_data=str(val), seq_len=16), CharTokenizer(), seed=0)
    assert len(ds.train) == 20 and len(ds.val) == 1 and isinstance(ds.val[0], Example)


# --- the real tokenizer ------------------------------------------------------------------------------
def test_real_tokenizer_masks_align(tmp_path):
    """Same invariants with models.tokenizer on a tiny word-level tokenizer (skipped until it exists)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models

    import models.tokenizer as tokenizer_mod

    words = ["<unk>", "<s>", "</s>", "<pad>", "[user]", "[assistant]", "hi", "there", "how", "are", "you"]
    tk = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # keeps "[user]" one word
    tk.add_special_tokens(["<s>", "</s>", "<pad>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "add_bos_token": True,
        "chat_template": template}))
    tok = tokenizer_mod.load_tokenizer(tmp_path)
    ex = tokenize_record(parse_record({"prompt": "hi there", "completion": "how are you"}), tok)
    assert ex.input_ids == [1, 6, 7, 8, 9, 10, 2] and ex.labels == [M, M, M, 8, 9, 10, 2]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]
    ex = tokenize_record(parse_record({"messages": chat}), tok)
    assert ex.input_ids == [1, 4, 6, 2, 5, 7, 2] and ex.labels == [M] * 5 + [7, 2]
