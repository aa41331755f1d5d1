"""Where records come from: data files of each format, directories of them, and hub datasets.

    .jsonl               one JSON object per line (numbered by line)
    .json                an array of objects, or an object holding one such list (numbered by row, from 1),
                         or one object; a .json file that is really JSON Lines is read as such
    .csv / .tsv          a header row, then one record per row (numbered by row, from 1; cells are strings)
    .parquet             one record per row (numbered by row, from 1); needs pyarrow (the `parquet` extra)
    a directory          every such file under it, sorted by path, concatenated (hidden entries skipped)
    owner/name[:split]   a hub dataset's data files of that split, through huggingface_hub's cache

Readers return raw rows (RawRow: the dict, its file, its number); train.records.parse_record is the
one place that turns a row into a Record. read_records does both. A local path always wins over a hub id.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import snapshot_download

from train.config import DataConfig
from train.records import DataError, Record, parse_record

FORMATS = (".parquet", ".jsonl", ".json", ".csv", ".tsv")  # also the order a hub split prefers them in
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class RawRow:
    """One row as read, before validation: the decoded object, its file and its line (or row) number."""

    obj: Any
    path: str
    line: int


# --- the entry point ---------------------------------------------------------------------------------
def read_records(location: str | Path, cfg: DataConfig | None = None) -> list[Record]:
    """All records at `location` (a file, a directory or a hub id), with cfg's field map applied."""
    fields = _field_map(cfg) if cfg is not None else None
    rows = read_rows(location, cfg.data_split if cfg is not None else None)
    return [parse_record(row.obj, row.path, row.line, fields) for row in rows]


def _field_map(cfg: DataConfig) -> dict[str, str | None]:
    """The usual keys -> the columns that cfg says hold them (None: the usual name)."""
    return {"text": cfg.text_field, "prompt": cfg.prompt_field, "completion": cfg.completion_field,
            "messages": cfg.messages_field}


def read_rows(location: str | Path, split: str | None = None) -> list[RawRow]:
    """Raw rows of a local file or directory, else of a hub dataset id (split: --data-split)."""
    local = Path(location).expanduser()
    if local.is_dir():
        return read_directory(local)
    # "data/train.jsonl" has the form owner/name too: a data-file suffix means a local path.
    if local.exists() or local.suffix.lower() in FORMATS or not HUB_ID.match(str(location)):
        return read_file(local)
    return read_hub(str(location), split)


def read_directory(directory: Path) -> list[RawRow]:
    """Every data file under `directory`, sorted by relative path and concatenated."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise DataError(f"no data files ({', '.join(FORMATS)}) in the directory", directory)
    return [row for path in files for row in read_file(path)]


def read_file(path: Path) -> list[RawRow]:
    """The rows of one data file, read by its suffix; DataError if it has none."""
    # Any other suffix is read as JSON Lines, the one format there was before the others (data.txt, ...).
    rows = READERS.get(path.suffix.lower(), read_jsonl)(path)
    if not rows:
        raise DataError("no records (the file is empty)", path)
    return rows


# --- one reader per format -------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path) from None


def _read_text(path: Path) -> str:
    """The whole file as text, without a BOM (Windows editors and Excel write one)."""
    try:
        return _read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start})", path) from None


def read_jsonl(path: Path) -> list[RawRow]:
    """One JSON value per line, numbered by line; blank lines are skipped."""
    rows = []
    for number, chunk in enumerate(_read_bytes(path).split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("not valid UTF-8", path, number) from None
        text = text.removeprefix("\ufeff") if number == 1 else text  # a BOM from Windows editors
        if not text.strip():
            continue
        try:
            rows.append(RawRow(json.loads(text), str(path), number))
        except (ValueError, RecursionError) as e:  # ValueError covers JSONDecodeError and huge ints
            raise DataError(f"malformed JSON: {str(e)[:200]}", path, number) from None
    return rows


def read_json(path: Path) -> list[RawRow]:
    """An array of records, or an object holding exactly one list of them; rows numbered from 1."""
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON Lines under a .json name, common on the hub
            return read_jsonl(path)
        raise DataError(f"malformed JSON: {str(e)[:200]}", path) from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"malformed JSON: {str(e)[:200]}", path) from None
    return [RawRow(obj, str(path), i) for i, obj in enumerate(_records_in(value, path), start=1)]


def _records_in(value: Any, path: Path) -> list:
    """The list of records in a decoded .json file: the array itself, or an object's only list."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        # "messages"/"conversations" hold turns, not records: such an object is one chat record.
        lists = [k for k, v in value.items() if isinstance(v, list) and k not in ("messages", "conversations")]
        if len(lists) == 1:
            return value[lists[0]]
        if not lists:
            return [value]  # one record (a one-line JSON Lines file named .json)
    raise DataError("expected an array of records, or an object holding one list of records", path)


def read_csv(path: Path) -> list[RawRow]:
    """A header row, then one record per row (comma-separated; tab-separated for .tsv)."""
    # csv's default cap (128 KiB a cell) is below what one long document may hold; raise it once.
    csv.field_size_limit(2**31 - 1)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for number, cells in enumerate(reader, start=1):
            if not cells:
                continue  # a blank line
            if len(cells) != len(header):
                raise DataError(f"row has {len(cells)} cells, the header has {len(header)}", path, number)
            rows.append(RawRow(dict(zip(header, cells)), str(path), number))
    except csv.Error as e:
        raise DataError(f"malformed {path.suffix[1:].upper()}: {e}", path, reader.line_num) from None
    return rows


def read_parquet(path: Path) -> list[RawRow]:
    """One record per row; nested columns (lists of structs, as chat messages) come back as lists of dicts."""
    try:  # imported here: pyarrow is an optional extra, and only .parquet files need it
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install pyarrow (or ftkit[parquet])", path) from None
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...: one line naming the file
        raise DataError(f"cannot read Parquet: {type(e).__name__}: {str(e)[:200]}", path) from None
    # A table has every column in every row: a null cell is an absent key, so rows of different
    # shapes can share one file (a text row's null "prompt" must not make it look like two shapes).
    return [RawRow({k: v for k, v in obj.items() if v is not None}, str(path), i)
            for i, obj in enumerate(table.to_pylist(), start=1)]


READERS: dict[str, Callable[[Path], list[RawRow]]] = {
    ".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".tsv": read_csv, ".parquet": read_parquet,
}


# --- hub datasets --------------------------------------------------------------------------------
def split_patterns(split: str) -> dict[str, list[str]]:
    """Per format, the hub's usual names for a split's data files: train.jsonl, data/train-00000-of-00001.parquet,
    default/train/0000.parquet, ... (`*` matches across folders, as in huggingface_hub's allow_patterns)."""
    names = [f"{split}.{{ext}}", f"{split}[-_]*.{{ext}}", f"{split}/*.{{ext}}"]
    return {ext: [prefix + name.format(ext=ext[1:]) for prefix in ("", "*/") for name in names] for ext in FORMATS}


def read_hub(name: str, split: str | None = None) -> list[RawRow]:
    """The rows of a hub dataset's split: the cached snapshot first, else a download of that split's files."""
    repo_id, _, id_split = name.partition(":")
    split = id_split or split or DEFAULT_SPLIT
    patterns = split_patterns(split)
    allow = [p for ps in patterns.values() for p in ps]
    try:
        files = _split_files(Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=allow,
                                                    local_files_only=True)), patterns)
    except Exception:
        files = []  # not cached (or not this split): download below
    if not files:
        try:
            root = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=allow))
        except Exception as err:  # offline, network, auth or no such repo: one clear line
            raise DataError(f"no such local file or directory, not in the hub cache, and the hub dataset could not "
                            f"be fetched (offline?) ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                            name) from None
        files = _split_files(root, patterns)
    if not files:
        raise DataError(f"hub dataset has no {split!r} data files ({', '.join(FORMATS)})", name)
    return [row for path in files for row in read_file(path)]


def _split_files(root: Path, patterns: dict[str, list[str]]) -> list[Path]:
    """The split's files under a snapshot, of the first format that has any (so one copy of the data in
    two formats is not read twice), sorted by path."""
    found = [p for p in root.rglob("*") if p.is_file()]
    for ps in patterns.values():
        chosen = sorted(p for p in found if any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in ps))
        if chosen:
            return chosen
    return []
