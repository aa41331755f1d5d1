"""Training data: JSONL records -> token ids + loss labels -> padded or packed batches.

One JSONL line is one record, in one of four shapes (extra keys are ignored):

    {"text": "..."}                                          language modelling: every token is a target
    {"prompt": "...", "completion": "..."}                   loss on the completion only
    {"instruction": "...", "input": "...", "output": "..."}  Alpaca; "input" optional (see ALPACA_PROMPT)
    {"messages": [{"role": "user", "content": "..."}, ...]}  chat template; loss on assistant turns only

Labels follow the Hugging Face convention: aligned with input_ids (the loss shifts them), IGNORE_INDEX
(-100) where no loss is taken. Because no token predicts position 0, labels[0] is always -100; this
changes nothing for a single example and stops a packed example's first token from being "predicted"
by the previous example's last one. EOS ends every target and carries a label even when pad == eos:
padding is masked through the labels, never by comparing ids with pad_id.

Prompt and target are tokenized separately and concatenated, so the loss mask lines up with tokens
exactly (joint tokenization could merge a token across the boundary). With SentencePiece-style
tokenizers that prefix every encode() with a space marker, this is the usual segment-wise behaviour.

Data order is a pure function of (seed, epoch): BatchSampler's state is two integers, so a resumed
run sees exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from train.config import DataConfig

IGNORE_INDEX = -100
# Key of a micro-batch that a rank runs with zero weight only because another rank has rows at that
# point (its own share is empty): every rank must run the same forward/backward calls in a step.
PLACEHOLDER = "placeholder"
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


class TokenizerLike(Protocol):
    """What this module needs of models.tokenizer.Tokenizer."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    add_bos: bool

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...


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


def parse_record(obj: Any, path: str | Path = "<memory>", line: int = 0) -> Record:
    """Validate one decoded JSON value and return its Record; DataError(path:line) if it fits no shape."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, line)
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


def read_jsonl(path: str | Path) -> list[Record]:
    """All records of a JSONL file; blank lines are skipped. Raises DataError with file:line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path) from None
    records = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("not valid UTF-8", path, number) from None
        text = text.removeprefix("\ufeff") if number == 1 else text  # a BOM from Windows editors
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError covers JSONDecodeError and huge ints
            raise DataError(f"malformed JSON: {str(e)[:200]}", path, number) from None
        records.append(parse_record(obj, path, number))
    if not records:
        raise DataError("no records (the file is empty)", path)
    return records


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


# --- splitting and ordering ----------------------------------------------------------------------------
_SPLIT_STREAM, _SHUFFLE_STREAM = 1, 2  # keep the split and the epoch shuffles independent of each other


def split_train_val(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out round(val_fraction * n) records (at least 1), chosen by `seed`; both keep file order."""
    n = len(records)
    n_val = max(1, round(val_fraction * n))
    if not 0 < val_fraction < 1 or n_val >= n:
        raise DataError(f"cannot hold out {val_fraction:g} of {n} records and keep some for training")
    chosen = set(np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


class BatchSampler:
    """Indices of the micro-batches of each optimizer step, in a (seed, epoch)-determined order.

    An epoch is a permutation of the items cut into micro-batches of `batch_size` (the last may be
    smaller); a step takes the next `grad_accum` of them, except the epoch's last step, which takes
    what is left, so steps never straddle epochs. State = (epoch, index of the next item in the
    epoch's order): restoring it replays the same batches. Because it counts items, not batches,
    batch_size and grad_accum may change across a resume; num_items, seed and shuffle may not.
    """

    def __init__(self, num_items: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if num_items < 1 or batch_size < 1 or grad_accum < 1:
            raise ValueError(f"need num_items, batch_size, grad_accum >= 1, got {num_items}, {batch_size}, {grad_accum}")
        self.num_items, self.batch_size, self.grad_accum = num_items, batch_size, grad_accum
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order) cache

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_items / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.grad_accum)

    def epoch_order(self, epoch: int) -> list[int]:
        """The item order of `epoch`: a permutation seeded by (seed, epoch), or 0..n-1 unshuffled."""
        if not self.shuffle:
            return list(range(self.num_items))
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
            self._order = (epoch, rng.permutation(self.num_items).tolist())
        return self._order[1]

    def next_step(self) -> list[list[int]]:
        """Item indices of the next step's micro-batches (grad_accum of them, fewer at epoch end)."""
        order = self.epoch_order(self.epoch)
        batches = []
        while len(batches) < self.grad_accum and self.index < self.num_items:
            batches.append(order[self.index : self.index + self.batch_size])
            self.index += len(batches[-1])
        if self.index >= self.num_items:
            self.epoch, self.index = self.epoch + 1, 0
        return batches

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; epoch/index are the position, the rest guards against a changed dataset."""
        return {"epoch": self.epoch, "index": self.index, "num_items": self.num_items,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume data order: {key} was {state[key]!r}, now {getattr(self, key)!r} "
                                 "(the resumed run would see different batches)")
        if not 0 <= state["index"] < self.num_items:
            raise ValueError(f"bad data position index={state['index']} for {self.num_items} items")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def placeholder_batch(item: Example | PackedRow, pad_id: int) -> dict[str, torch.Tensor]:
    """A one-row batch marked PLACEHOLDER: run with zero weight by a rank that has no rows of its own there."""
    return {**collate([item], pad_id), PLACEHOLDER: torch.ones(())}


def rank_share(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous part of n items; parts differ by at most one (lower ranks get more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class StepLoader:
    """Collated micro-batches for each optimizer step: `loader.next_step() -> [batch, ...]`.

    Endless (epochs follow each other); the loop decides when to stop, e.g. after
    total_steps_for(loader.steps_per_epoch, epochs, max_steps) steps. Save `state_dict()` with each
    checkpoint and `load_state_dict()` it on resume.

    With world_size > 1 processes, each micro-batch is drawn as one global batch of
    batch_size * world_size items (the same on every rank) and rank r keeps its share, so the union
    over ranks is exactly what one process with that batch size would see. A rank whose share of a
    short last micro-batch is empty gets a PLACEHOLDER batch (zero weight) to keep in step.
    """

    def __init__(self, items: Sequence[Example | PackedRow], batch_size: int, pad_id: int,
                 grad_accum: int = 1, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        self.items, self.pad_id, self.rank, self.world_size = items, pad_id, rank, world_size
        self.sampler = BatchSampler(len(items), batch_size * world_size, grad_accum, seed, shuffle)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next step is drawn from (0-based)."""
        return self.sampler.epoch

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [self._collate_share(batch) for batch in self.sampler.next_step()]

    def _collate_share(self, batch: list[int]) -> dict[str, torch.Tensor]:
        mine = batch[rank_share(len(batch), self.rank, self.world_size)]
        if not mine:
            return placeholder_batch(self.items[batch[0]], self.pad_id)
        return collate([self.items[i] for i in mine], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def eval_batches(items: Sequence[Example | PackedRow], batch_size: int, pad_id: int, rank: int = 0,
                 world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Every item once, in order, collated into batches of `batch_size` (the last may be smaller).

    With world_size > 1: rank `rank`'s share of the items only, padded with PLACEHOLDER batches to
    the same number of batches on every rank (sharded models need every rank in every forward).
    """
    mine = items[rank_share(len(items), rank, world_size)]
    batches = [collate(mine[i : i + batch_size], pad_id) for i in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(len(items) / world_size) / batch_size)
    while len(batches) < most:
        batches.append(placeholder_batch(items[0], pad_id))
    return batches


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
    train_records = read_jsonl(cfg.data)
    val_records: list[Record] = []
    if cfg.val_data:
        val_records = read_jsonl(cfg.val_data)
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
