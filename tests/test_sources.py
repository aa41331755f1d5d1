"""train.sources: every data format, directories, column mapping, ShareGPT and hub datasets, each
checked against the same records as JSONL (the reference path) through train.data.load_datasets."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pyarrow as pa  # an optional extra of the package, in the test extra: present wherever tests run
import pyarrow.parquet as pq
import pytest

from models.tokenizer import load_tokenizer
from tests.conftest import make_tokenizer_files
from train.config import DataConfig
from train.data import load_datasets
from train.records import DataError

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat is big"},
        {"role": "assistant", "content": "the dog is small."}]
PLAIN = [  # records a CSV cell can hold: strings only (one with a comma, a quote and a newline)
    {"text": "the cat is big. the dog is small."},
    {"prompt": "the cat, \"big\"\nis", "completion": " small."},
    {"instruction": "the dog is", "input": "", "output": " big."},
    {"instruction": "the cat", "input": "is big", "output": " the dog."},
]
RECORDS = PLAIN + [{"messages": CHAT}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_tokenizer_files(root)
    return load_tokenizer(root)


def tokens(location, tokenizer, **fields) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every training example, as load_datasets makes them."""
    ds = load_datasets(DataConfig(data=str(location), seq_len=512, **fields), tokenizer, seed=0)
    return [(ex.input_ids, ex.labels) for ex in ds.train]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path: Path, records: list[dict], delimiter: str = ",") -> Path:
    """One shape per file (a header row has one set of columns); the union of keys as columns."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    """Every column in every row, null where a record lacks it (from_pylist would take the first row's keys)."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records]), path)
    return path


WRITERS = {
    "json": lambda p, rs: p.with_suffix(".json").write_text(json.dumps(rs)) and p.with_suffix(".json"),
    "json_object": lambda p, rs: p.with_suffix(".json").write_text(json.dumps({"version": 1, "data": rs}))
    and p.with_suffix(".json"),
    "json_lines_named_json": lambda p, rs: write_jsonl(p.with_suffix(".json"), rs),
    "parquet": lambda p, rs: write_parquet(p.with_suffix(".parquet"), rs),
}


# --- formats ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_format_gives_the_tokens_of_the_same_jsonl(tmp_path, tokenizer, fmt):
    reference = tokens(write_jsonl(tmp_path / "ref.jsonl", RECORDS), tokenizer)
    assert len(reference) == len(RECORDS)
    assert tokens(WRITERS[fmt](tmp_path / "data", RECORDS), tokenizer) == reference


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_give_the_tokens_of_the_same_jsonl(tmp_path, tokenizer, suffix, delimiter):
    for i, record in enumerate(PLAIN):  # one shape per file
        reference = tokens(write_jsonl(tmp_path / f"{i}.jsonl", [record]), tokenizer)
        assert tokens(write_csv(tmp_path / f"{i}{suffix}", [record], delimiter), tokenizer) == reference


def test_a_directory_is_its_files_sorted_and_concatenated(tmp_path, tokenizer):
    reference = tokens(write_jsonl(tmp_path / "ref.jsonl", [PLAIN[1], RECORDS[4], PLAIN[2], PLAIN[0]]), tokenizer)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / ".cache").mkdir()
    write_jsonl(data / "sub" / "c.jsonl", [PLAIN[0]])
    write_parquet(data / "b.parquet", [RECORDS[4]])
    write_csv(data / "a.csv", [PLAIN[1]])
    write_jsonl(data / "d.json", [PLAIN[2]])
    (data / "README.md").write_text("not data")
    write_jsonl(data / ".cache" / "x.jsonl", [PLAIN[3]])  # hidden: huggingface_hub's local-dir metadata
    assert tokens(data, tokenizer) == reference
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no data files"):
        tokens(tmp_path / "empty", tokenizer)


# --- column mapping and ShareGPT ------------------------------------------------------------------
def test_renamed_columns_become_the_usual_shape(tmp_path, tokenizer):
    renamed = [{"body": "the cat is big."}, {"question": "the dog", "answer": " is small.", "prompt": "unused"},
               {"dialog": CHAT}]
    usual = [{"text": "the cat is big."}, {"prompt": "the dog", "completion": " is small."}, {"messages": CHAT}]
    reference = tokens(write_jsonl(tmp_path / "ref.jsonl", usual), tokenizer)
    flags = dict(text_field="body", prompt_field="question", completion_field="answer", messages_field="dialog")
    for i, (row, ref) in enumerate(zip(renamed, reference)):
        only = {k: v for k, v in flags.items() if v in row}  # a mapped column is required where it is mapped
        assert tokens(write_parquet(tmp_path / f"{i}.parquet", [row]), tokenizer, **only) == [ref]
    write_csv(tmp_path / "qa.csv", [{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}])
    with pytest.raises(DataError, match=r"qa\.csv:1: no column 'reply' \(--completion-field\)"):
        tokens(tmp_path / "qa.csv", tokenizer, prompt_field="question", completion_field="reply")


def sharegpt(messages: list[dict]) -> list[dict]:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"from": names[m["role"]], "value": m["content"], "weight": None} for m in messages]


def test_sharegpt_conversations_mask_like_the_same_chat_messages(tmp_path, tokenizer):
    two_turns = CHAT + [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "is big."}]
    chats = [{"messages": CHAT}, {"messages": two_turns}]
    reference = tokens(write_jsonl(tmp_path / "ref.jsonl", chats), tokenizer)
    assert any(label == -100 for _, labels in reference for label in labels)  # the mask is really there
    conversations = [{"conversations": sharegpt(c["messages"]), "id": i} for i, c in enumerate(chats)]
    assert tokens(write_jsonl(tmp_path / "sg.jsonl", conversations), tokenizer) == reference
    assert tokens(write_parquet(tmp_path / "sg.parquet", conversations), tokenizer) == reference
    mapped = [{"dialog": sharegpt(c["messages"])} for c in chats]
    assert tokens(write_jsonl(tmp_path / "m.jsonl", mapped), tokenizer, messages_field="dialog") == reference
    bad = [conversations[0], {"conversations": [{"from": "robot", "value": "hi"}]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad\.json:2: conversations\[0\]\.from must be one of"):
        tokens(tmp_path / "bad.json", tokenizer)


# --- errors name the file and the row -------------------------------------------------------------
def test_bad_rows_name_their_file_and_row(tmp_path, tokenizer):
    (tmp_path / "a.json").write_text(json.dumps([PLAIN[0], PLAIN[1], ["not", "an", "object"]]))
    with pytest.raises(DataError, match=r"a\.json:3: expected a JSON object"):
        tokens(tmp_path / "a.json", tokenizer)
    (tmp_path / "b.csv").write_text("prompt,completion\nx,y\nx,y,z\n")
    with pytest.raises(DataError, match=r"b\.csv:2: row has 3 cells, the header has 2"):
        tokens(tmp_path / "b.csv", tokenizer)
    write_csv(tmp_path / "c.csv", [{"prompt": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"c\.csv:1: prompt_completion record without 'completion'"):
        tokens(tmp_path / "c.csv", tokenizer)
    write_parquet(tmp_path / "d.parquet", [PLAIN[1], {"prompt": "x"}])
    with pytest.raises(DataError, match=r"d\.parquet:2: prompt_completion record without 'completion'"):
        tokens(tmp_path / "d.parquet", tokenizer)
    (tmp_path / "e.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"e\.parquet: cannot read Parquet"):
        tokens(tmp_path / "e.parquet", tokenizer)
    (tmp_path / "f.json").write_text(json.dumps({"a": [PLAIN[0]], "b": [PLAIN[1]]}))
    with pytest.raises(DataError, match=r"f\.json: expected an array of records, or an object holding one list"):
        tokens(tmp_path / "f.json", tokenizer)
    with pytest.raises(DataError, match=r"data/missing\.jsonl: file not found"):  # owner/name form, still a path
        tokens("data/missing.jsonl", tokenizer)


def test_parquet_without_pyarrow_is_one_clear_error(tmp_path, tokenizer, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", [PLAIN[0]])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"a\.parquet: reading \.parquet needs pyarrow: pip install pyarrow"):
        tokens(path, tokenizer)


# --- hub datasets ---------------------------------------------------------------------------------
def fake_hub_dataset(cache: Path, repo_id: str, files: dict[str, list[dict]]) -> Path:
    """huggingface_hub's cache layout for a dataset: refs/main -> snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, records in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        writer = write_parquet if name.endswith(".parquet") else write_jsonl
        writer(snapshot / name, records)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline: nothing may reach the network."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_dataset_split_is_read_from_the_cache(tmp_path, tokenizer, hub_cache, monkeypatch):
    fake_hub_dataset(hub_cache, "owner/name", {
        "data/train-00000-of-00002.parquet": [PLAIN[0]], "data/train-00001-of-00002.parquet": [RECORDS[4]],
        "data/test-00000-of-00001.parquet": [PLAIN[1]], "pretrain.jsonl": [PLAIN[2]], "README.md": []})
    train_ref = tokens(write_jsonl(tmp_path / "train.jsonl", [PLAIN[0], RECORDS[4]]), tokenizer)
    test_ref = tokens(write_jsonl(tmp_path / "test.jsonl", [PLAIN[1]]), tokenizer)
    monkeypatch.chdir(tmp_path)
    assert tokens("owner/name", tokenizer) == train_ref
    assert tokens("owner/name:test", tokenizer) == test_ref
    assert tokens("owner/name", tokenizer, data_split="test") == test_ref
    with pytest.raises(DataError, match=r"owner/name:validation: hub dataset has no 'validation' data files"):
        tokens("owner/name:validation", tokenizer)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    write_jsonl(tmp_path / "owner" / "name" / "local.jsonl", [PLAIN[3]])
    assert tokens("owner/name", tokenizer) == tokens(tmp_path / "owner" / "name" / "local.jsonl", tokenizer)


def test_an_uncached_hub_dataset_offline_is_one_error_line(tokenizer, hub_cache):
    with pytest.raises(DataError) as err:
        tokens("someone/absent", tokenizer)
    message = str(err.value)
    assert message.startswith("someone/absent: ") and "not in the hub cache" in message and "\n" not in message
