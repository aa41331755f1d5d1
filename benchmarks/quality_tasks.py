"""The two tasks of the quality benchmark, built from the Python standard library on this machine.

    docstring   generation      "In one line: what does `math.gcd(*integers)` do?" -> the first line of its
                                docstring; scored by exact match, BLEU and chrF (sacreBLEU)
    module      classification  a name, signature and docstring line without its module -> which of the
                                eight best-documented packages defines it; scored by accuracy and macro-F1

Both are chat records (the base is an instruct model) from demo.corpus, so nothing is downloaded.

Splits are fixed for a Python version and never depend on a seed or on a method: records are grouped
by the first line of their docstring (two functions documented alike, such as `Decimal.exp` and
`Context.exp`, always land in the same split, so no test answer or question is ever seen in training),
the groups are ordered by a hash of that line, and test takes groups from the front until it holds
`test_size` records, validation the next `val_size`, training the rest. Nothing chooses on test.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from demo.base import QUESTION
from demo.corpus import DEMO_MODULES, demo_corpus

NUM_LABELS = 8  # classes: the packages with the most documented members (methods count for their package)
MODULE_QUESTION = ("Which Python standard-library module defines `{name}`, documented as \"{doc}\"? "
                   "Answer with the module name only.")


@dataclass(frozen=True)
class Task:
    """One task's three splits as chat records ({"messages": [user, assistant]})."""

    name: str
    kind: str  # "generation" or "classification" (train.run's --task)
    train: tuple[dict, ...]
    val: tuple[dict, ...]
    test: tuple[dict, ...]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def question_of(record: dict) -> str:
    return record["messages"][0]["content"]


def answer_of(record: dict) -> str:
    return record["messages"][-1]["content"]


def _module_of(qualified: str) -> str | None:
    """The DEMO_MODULES entry that `qualified` ("email.message.Message.get") lives in, longest first."""
    found = [m for m in DEMO_MODULES if qualified.startswith(m + ".")]
    return max(found, key=len) if found else None


def _label(module: str) -> str:
    return module.split(".")[0]  # "email.message" is the email package; "os.path" would be os


def split_groups(items: list[tuple[str, dict]], test_size: int, val_size: int) -> tuple[list, list, list]:
    """(train, val, test) records from (group key, record) pairs, whole groups at a time, in hash order."""
    groups: dict[str, list[dict]] = {}
    for key, record in items:
        groups.setdefault(key, []).append(record)
    ordered = sorted(groups, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    test, val, train = [], [], []
    for key in ordered:
        target = test if len(test) < test_size else val if len(val) < val_size else train
        target.extend(groups[key])
    return train, val, test


@lru_cache(maxsize=None)
def docstring_task(test_size: int = 120, val_size: int = 60) -> Task:
    items = [(r["completion"], chat(QUESTION.format(signature=r["prompt"]), r["completion"])) for r in demo_corpus()]
    train, val, test = split_groups(items, test_size, val_size)
    return Task("docstring", "generation", tuple(train), tuple(val), tuple(test))


@lru_cache(maxsize=None)
def module_task(test_size: int = 200, val_size: int = 60) -> Task:
    found = []
    for r in demo_corpus():
        qualified, signature = r["prompt"].split("(", 1)
        module = _module_of(qualified)
        if module is not None:
            found.append((r["completion"], qualified[len(module) + 1:] + "(" + signature, _label(module)))
    counts = Counter(label for _, _, label in found)
    labels = sorted(counts, key=lambda m: (-counts[m], m))[:NUM_LABELS]
    items = [(doc, chat(MODULE_QUESTION.format(name=name, doc=doc), label)) for doc, name, label in found if label in labels]
    train, val, test = split_groups(items, test_size, val_size)
    return Task("module", "classification", tuple(train), tuple(val), tuple(test))


TASKS = {"docstring": docstring_task, "module": module_task}


def label_counts(records: tuple[dict, ...]) -> Counter:
    return Counter(answer_of(r) for r in records)
