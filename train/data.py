"""Training data: records (train.records) -> token ids + loss labels -> padded or packed batches.

Labels follow the Hugging Face convention: aligned with input_ids (the loss shifts them), IGNORE_INDEX
(-100) where no loss is taken. Because no token predicts position 0, labels[0] is always -100; this
changes nothing for a single example and stops a packed example's first token from being "predicted"
by the previous example's last one. EOS ends every target and carries a label even when pad == eos:
padding is masked through the labels, never by comparing ids with pad_id.

Prompt and target are tokenized separately and concatenated, so the loss mask lines up with tokens
exactly (joint tokenization could merge a token across the boundary). With SentencePiece-style
tokenizers that prefix every encode() with a space marker, this is the usual segment-wise behaviour.

The order of batches over steps, epochs and processes is train.loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch

from train.config import DataConfig
from train.loss import IGNORE_INDEX
from train.records import DataError, Record
from train.sources import read_records

# Key of a micro-batch that a rank runs with zero weight only because another rank has rows at that
# point (its own share is empty): every rank must run the same forward/backward calls in a step.
PLACEHOLDER = "placeholder"


class TokenizerLike(Protocol):
    """What this module needs of models.tokenizer.Tokenizer."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    add_bos: bool

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...


# --- tokenizing ------------------------------------------------------------------------------------
@dataclass
class Example:
    """One tokenized record. input_ids and labels have equal length; labels are -100 where no loss."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_record(record: Record, tokenizer: TokenizerLike) -> Example:
    """Token ids and labels of one record, untruncated: [BOS] prompt (-100) target EOS (labelled)."""
    if record.shape == "chat":
        segments = chat_segments(record, tokenizer)
    else:
        segments = [(record.prompt, False), (record.target, True)]
    ids: list[int] = []
    labels: list[int] = []
    part, is_target = [], False
    for text, is_target in segments:
        part = tokenizer.encode(text, add_bos=False) if text else []
        ids += part
        labels += part if is_target else [IGNORE_INDEX] * len(part)
    # Chat templates usually close a turn with their own end-of-turn token, often the EOS itself:
    # add EOS only after a final assistant turn that lacks it. Other shapes always end with EOS.
    if record.shape != "chat" or (is_target and tokenizer.eos_id not in part):
        ids.append(tokenizer.eos_id)
        labels.append(tokenizer.eos_id)
    if _wants_bos(tokenizer, ids):
        ids.insert(0, tokenizer.bos_id)
        labels.insert(0, IGNORE_INDEX)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts position 0 (see module docstring)
    return Example(ids, labels)


def chat_segments(record: Record, tokenizer: TokenizerLike) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_target) pieces whose concatenation is the whole.

    Assistant spans are found by rendering prefixes: for assistant message i, the text between
    render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is the target; the
    header the template puts before it is not. Requires a prefix-consistent template (each render
    extends the previous one); templates that rewrite earlier turns raise DataError.
    """
    messages = list(record.messages)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        if is_assistant:
            head = _render(tokenizer, record, messages[:i], True)
            segments.append((_extension(done, head, record, i), False))
            done = head
        full = _render(tokenizer, record, messages[: i + 1], False)
        segments.append((_extension(done, full, record, i), is_assistant))
        done = full
    return [(text, target) for text, target in segments if text]


def _render(tokenizer, record: Record, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # template errors (jinja, role checks) are data problems seen from here
        raise DataError(f"chat template failed on the first {len(messages)} messages: {e}",
                        record.path, record.line) from e


def _extension(prefix: str, text: str, record: Record, i: int) -> str:
    if not text.startswith(prefix):
        raise DataError(f"chat template is not prefix-consistent at messages[{i}]: rendering more "
                        "messages changed the text of earlier ones, so assistant spans cannot be located",
                        record.path, record.line)
    return text[len(prefix) :]


def generation_prompt(record: Record, tokenizer: TokenizerLike) -> tuple[list[int], str]:
    """(prompt ids to generate from, reference string) for classification / generation evals.

    prompt_completion and alpaca: the prompt and the completion. chat: everything before the last
    assistant message plus the generation header, and that message's content. text: DataError.
    """
    if record.shape == "text":
        raise DataError("text records have no prompt to generate from; use prompt/completion, "
                        "Alpaca or chat records for --task classification/generation", record.path, record.line)
    if record.shape == "chat":
        last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        text = _render(tokenizer, record, list(record.messages[:last]), True)
        reference = record.messages[last]["content"]
    else:
        text, reference = record.prompt, record.target
    ids = tokenizer.encode(text, add_bos=False) if text else []
    return ([tokenizer.bos_id] if _wants_bos(tokenizer, ids) else []) + ids, reference


def _wants_bos(tokenizer: TokenizerLike, ids: list[int]) -> bool:
    """The checkpoint prepends BOS and `ids` lack it (a chat template may have rendered it: never twice)."""
    return bool(tokenizer.add_bos) and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]


@dataclass
class DataStats:
    """What tokenization did to one file; `summary()` is the line to print at startup."""

    name: str
    seq_len: int
    records: int = 0  # records read
    examples: int = 0  # examples kept
    truncated: int = 0  # examples longer than seq_len, cut to it (their EOS may be lost)
    dropped: int = 0  # examples with no target token left after truncation
    tokens: int = 0  # tokens in kept examples
    target_tokens: int = 0  # tokens carrying loss in kept examples
    rows: int | None = None  # packed rows, when packing

    def summary(self) -> str:
        text = (f"{self.name}: {self.records} records -> {self.examples} examples, "
                f"{self.target_tokens}/{self.tokens} tokens carry loss; "
                f"{self.truncated} truncated to {self.seq_len} tokens, "
                f"{self.dropped} dropped (no target token left after truncation)")
        if self.rows is not None:
            fill = self.tokens / max(1, self.rows * self.seq_len)
            text += f"; packed into {self.rows} rows of {self.seq_len} ({fill:.0%} full)"
        return text


def build_examples(
    records: Sequence[Record], tokenizer: TokenizerLike, seq_len: int, name: str = "data"
) -> tuple[list[Example], DataStats]:
    """Tokenize, truncate to seq_len (right side, keeping the prompt's start), drop target-less ones."""
    stats = DataStats(name, seq_len, records=len(records))
    examples = []
    for record in records:
        ex = tokenize_record(record, tokenizer)
        if len(ex) > seq_len:
            stats.truncated += 1
            ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        n_targets = ex.num_targets
        if n_targets == 0:
            stats.dropped += 1
            continue
        examples.append(ex)
        stats.tokens += len(ex)
        stats.target_tokens += n_targets
    stats.examples = len(examples)
    return examples, stats


# --- packing and batching ------------------------------------------------------------------------------
@dataclass
class PackedRow:
    """Several whole examples in one row. position_ids restart at 0 per example; doc_ids number
    the examples 0, 1, ... within the row, so attention can be restricted to the same doc id."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    doc_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[PackedRow]:
    """Greedy, in order: append each example to the current row while it fits, else start a new row.

    Examples are never split (a split example would restart its positions mid-text), so each must
    be at most seq_len long, which build_examples guarantees. Rows are shuffled later, per epoch.
    """
    rows: list[PackedRow] = []
    current = PackedRow([], [], [], [])
    for ex in examples:
        if len(ex) > seq_len:
            raise ValueError(f"example of {len(ex)} tokens does not fit seq_len {seq_len}; truncate first")
        if len(current) + len(ex) > seq_len:
            rows.append(current)
            current = PackedRow([], [], [], [])
        doc = current.doc_ids[-1] + 1 if current.doc_ids else 0
        current.input_ids += ex.input_ids
        current.labels += ex.labels
        current.position_ids += range(len(ex))
        current.doc_ids += [doc] * len(ex)
    if len(current):
        rows.append(current)
    return rows


def collate(items: Sequence[Example | PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item. Returns LongTensors [B, T]:

    input_ids (pad_id on padding), labels (-100 on padding), attention_mask (1 real, 0 padding), and
    for PackedRow items also position_ids (0 on padding) and doc_ids (-1 on padding).
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    packed = isinstance(items[0], PackedRow)
    if any(isinstance(it, PackedRow) != packed for it in items):
        raise ValueError("cannot mix packed rows and plain examples in one batch")
    B, T = len(items), max(len(it) for it in items)
    batch = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
    }
    if packed:
        batch["position_ids"] = torch.zeros((B, T), dtype=torch.long)
        batch["doc_ids"] = torch.full((B, T), -1, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it)
        batch["input_ids"][i, :n] = torch.tensor(it.input_ids, dtype=torch.long)
        batch["labels"][i, :n] = torch.tensor(it.labels, dtype=torch.long)
        batch["attention_mask"][i, :n] = 1
        if packed:
            batch["position_ids"][i, :n] = torch.tensor(it.position_ids, dtype=torch.long)
            batch["doc_ids"][i, :n] = torch.tensor(it.doc_ids, dtype=torch.long)
    return batch


def count_target_tokens(batch: Mapping[str, torch.Tensor] | torch.Tensor) -> int:
    """Tokens that carry loss in a batch (or a labels tensor [B, T]): labels[:, 1:] != -100.

    The shift matches the loss (logits at t predict labels at t+1). Sum it over the k micro-batches
    of a step and divide the summed loss by it, so a step's loss is a mean over its target tokens
    however they are spread over micro-batches. Call it on the CPU batch to avoid a device sync.
    """
    if isinstance(batch, Mapping) and PLACEHOLDER in batch:
        return 0
    labels = batch["labels"] if isinstance(batch, Mapping) else batch
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


# --- splitting ----------------------------------------------------------------------------
SPLIT_STREAM, SHUFFLE_STREAM = 1, 2  # seed streams: the split and the epoch shuffles independent of each other


def split_train_val(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out round(val_fraction * n) records (at least 1), chosen by `seed`; both keep file order."""
    n = len(records)
    n_val = max(1, round(val_fraction * n))
    if not 0 < val_fraction < 1 or n_val >= n:
        raise DataError(f"cannot hold out {val_fraction:g} of {n} records and keep some for training")
    chosen = set(np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


# --- everything at once --------------------------------------------------------------------------------
@dataclass
class Datasets:
    """Tokenized (and, with pack, packed) train/val items plus their stats and source records."""

    train: list[Example | PackedRow]
    val: list[Example | PackedRow] | None
    train_stats: DataStats
    val_stats: DataStats | None
    train_records: list[Record] = field(repr=False, default_factory=list)
    val_records: list[Record] = field(repr=False, default_factory=list)  # for generation evals

    def summary(self) -> str:
        return "\n".join(s.summary() for s in (self.train_stats, self.val_stats) if s is not None)


def load_datasets(cfg: DataConfig, tokenizer: TokenizerLike, seed: int) -> Datasets:
    """Read, split, tokenize and pack as a train.config.DataConfig says. DataError on bad data."""
    if cfg.data is None:
        raise DataError("no training data given (--data FILE.jsonl)")
    train_records = read_records(cfg.data, cfg)
    val_records: list[Record] = []
    if cfg.val_data:
        val_records = read_records(cfg.val_data, cfg)
    elif cfg.val_fraction > 0:
        train_records, val_records = split_train_val(train_records, cfg.val_fraction, seed)
    train, train_stats = _prepare(train_records, tokenizer, cfg, str(cfg.data))
    if not train:
        raise DataError("no training example has a target token left; raise --seq-len", cfg.data)
    val, val_stats = (None, None)
    if val_records:
        val, val_stats = _prepare(val_records, tokenizer, cfg, str(cfg.val_data or f"{cfg.data} (val split)"))
    return Datasets(train, val or None, train_stats, val_stats, train_records, val_records)


def _prepare(records: list[Record], tokenizer: TokenizerLike, cfg: DataConfig, name: str) -> tuple[list, DataStats]:
    examples, stats = build_examples(records, tokenizer, cfg.seq_len, name)
    if not cfg.pack:
        return examples, stats
    rows = pack_examples(examples, cfg.seq_len)
    stats.rows = len(rows)
    return rows, stats
