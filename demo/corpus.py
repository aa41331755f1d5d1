"""The demo's data: the Python standard library's own docstrings, read on this machine.

Nothing is downloaded: the text is read at run time with `inspect` from a fixed list of modules, so
every Python install has it.

- demo_corpus(): the fine-tuning task, {"prompt": "<module>.<name><signature>", "completion":
  "<first sentence of its docstring>"} for public functions, classes and methods;
- demo_text_corpus(): prose paragraphs from the same docstrings, to pretrain a tiny base model
  until it writes English-like text (demo.base).

Both corpora are a pure function of the Python version (docstrings and signatures change between
releases, and os.path is posixpath or ntpath): sorted, ASCII only, whitespace normalised, no
object addresses.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
import sysconfig
import textwrap
from functools import lru_cache
from typing import Any, Iterator

# Pure-library modules that import without side effects (or deprecation warnings) on the platforms
# CPython supports; one missing from a stripped-down build is skipped.
DEMO_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bdb", "binascii", "bisect", "calendar", "cmath",
    "cmd", "code", "codecs", "collections", "colorsys", "compileall", "concurrent.futures", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email.headerregistry", "email.message", "email.parser", "email.utils", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes",
    "modulefinder", "multiprocessing.pool", "numbers", "operator", "optparse", "os.path", "pathlib", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc", "queue", "quopri",
    "random", "re", "reprlib", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "symtable",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unicodedata", "unittest", "urllib.parse", "urllib.request",
    "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax.handler", "xmlrpc.client", "zipapp", "zipfile", "zlib", "zoneinfo",
)


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")  # reprs like <object at 0x7f...> differ between processes
_ABSOLUTE_PATH = re.compile(r"'(/[^'/]+/[^']*|[A-Za-z]:\\[^']*)'")  # a default naming a file on this machine
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"`][.!?])\s+(?=[A-Z(`'\"])")
MIN_COMPLETION, MAX_COMPLETION = 12, 160
MAX_PROMPT = 120
MIN_PARAGRAPH, MAX_PARAGRAPH = 30, 2000
# Functions a host program may swap: warnings' hooks, and inspect.getfile, which importing torch replaces.
_HOST_REPLACED = {"warnings.showwarning", "warnings.formatwarning", "inspect.getfile"}


# --- walking the standard library ----------------------------------------------------------------
def _public_members(module) -> list[tuple[str, Any]]:
    """(name, object) of the module's own public functions and classes, sorted by name."""
    exported = getattr(module, "__all__", None)
    out = []
    for name in sorted(set(exported) if exported is not None else vars(module)):
        obj = getattr(module, name, None)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # without __all__, skip what the module merely imported (os.path lists its own re-exports)
        if exported is None and getattr(obj, "__module__", None) != module.__name__:
            continue
        # Hooks are the host program's to replace (pytest swaps threading.excepthook for a partial):
        # leave them out so the corpus is the same whichever program asks for it.
        if name.endswith("hook") or f"{module.__name__}.{name}" in _HOST_REPLACED or not _from_stdlib(obj):
            continue
        out.append((name, obj))
    return out


def _from_stdlib(obj: Any) -> bool:
    module = getattr(obj, "__module__", None)
    return not isinstance(module, str) or module.split(".")[0] in sys.stdlib_module_names


def _public_methods(cls) -> list[tuple[str, Any]]:
    """(name, function) of the methods a class defines itself, sorted by name.

    Methods that other libraries patch onto stdlib classes (transformers adds `logging.Logger.warning_once`)
    are left out, so the corpus does not depend on what the host program imported.
    """
    out = []
    for name, raw in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        obj = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        if inspect.isroutine(obj) and _from_stdlib(obj):
            out.append((name, obj))
    return out


def _documented_objects() -> Iterator[tuple[str, Any]]:
    """(dotted name, object) for each module, its public functions/classes and their own methods."""
    for module_name in DEMO_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a stripped-down Python may lack one (zlib, unicodedata): skip it
            continue
        yield module_name, module
        for name, obj in _public_members(module):
            yield f"{module_name}.{name}", obj
            if inspect.isclass(obj):
                for method_name, method in _public_methods(obj):
                    yield f"{module_name}.{name}.{method_name}", method


@lru_cache(maxsize=1)
def _environment_strings() -> tuple[str, ...]:
    """Values some defaults are computed from at import time (platform.architecture's executable=...)."""
    values = {sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_default_scheme()}
    return tuple(sorted(repr(v) for v in values if v and len(v) > 1))


def _signature(obj: Any) -> str | None:
    """'(a, b=1)' or None when Python cannot say, or when the text would depend on the process or machine."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    if _ADDRESS.search(text) or _ABSOLUTE_PATH.search(text) or any(v in text for v in _environment_strings()):
        return None
    return text


def _clean(text: str) -> str:
    return " ".join(text.split())


def _is_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _blocks(doc: str) -> list[list[str]]:
    """Blank-line separated blocks of a cleaned docstring, as lists of lines."""
    # dedent: prose indented as a whole (under a heading) is still prose
    return [textwrap.dedent(block).splitlines() for block in re.split(r"\n\s*\n", doc) if block.strip()]


def _paragraphs(doc: str) -> list[str]:
    """The blocks of a docstring, each joined onto one line."""
    return [_clean(" ".join(lines)) for lines in _blocks(doc)]


def _is_flowing(lines: list[str]) -> bool:
    """Running text, not a table, list, field list or code: no indented, aligned or heading lines."""
    if any(line.startswith((" ", "\t", "-", "*", "+")) for line in lines[1:]) or lines[0].startswith((" ", "-", "*")):
        return False
    if any(line.rstrip().endswith(":") for line in lines[:-1]):
        return False
    # aligned columns have runs of spaces; two spaces after a full stop are the stdlib's old habit
    return not any(re.search(r"[^\s.!?] {2,}\S", line) for line in lines)


def _prose(doc: str) -> list[str]:
    """The docstring's prose paragraphs (see _is_prose), each on one line."""
    flowing = [_clean(" ".join(lines)) for lines in _blocks(doc) if _is_flowing(lines)]
    return [paragraph for paragraph in flowing if _is_prose(paragraph)]


def _own_doc(obj: Any) -> str:
    """The object's own docstring (not one inherited from a base class), cleaned; '' if none."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    if inspect.isclass(obj) and "__doc__" not in vars(obj):
        return ""
    return inspect.cleandoc(doc)


def _looks_like_signature(line: str, name: str) -> bool:
    """Old-style builtin docstrings open with their call form, e.g. 'max(iterable, *[, key]) -> value'."""
    return line.startswith(name.rsplit(".", 1)[-1] + "(") or "->" in line or line.startswith("--")


def _first_sentence(doc: str, name: str) -> str | None:
    paragraphs = [p for p in _paragraphs(doc) if not _looks_like_signature(p, name)]
    if not paragraphs:
        return None
    return _SENTENCE_END.split(paragraphs[0], maxsplit=1)[0]


def _is_prose(paragraph: str) -> bool:
    """Plain sentences: long enough, mostly letters, no doctest, table or code lines."""
    if not (MIN_PARAGRAPH <= len(paragraph) <= MAX_PARAGRAPH) or not _is_ascii(paragraph):
        return False
    if ">>>" in paragraph or "::" in paragraph or "--" in paragraph or not paragraph[0].isupper():
        return False
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return letters / len(paragraph) > 0.8 and paragraph.rstrip().endswith((".", ":"))


# --- the two corpora -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _demo_corpus() -> tuple[tuple[str, str], ...]:
    records: dict[str, str] = {}
    for name, obj in _documented_objects():
        if inspect.ismodule(obj):
            continue
        signature = _signature(obj)
        completion = _first_sentence(_own_doc(obj), name)
        if signature is None or completion is None:
            continue
        prompt = name + signature
        if (_is_ascii(prompt) and _is_ascii(completion) and len(prompt) <= MAX_PROMPT
                and MIN_COMPLETION <= len(completion) <= MAX_COMPLETION and len(completion.split()) >= 3):
            records.setdefault(prompt, completion)
    return tuple(sorted(records.items()))


def demo_corpus() -> list[dict]:
    """The demo task: {"prompt": "module.name(signature)", "completion": first docstring sentence}."""
    return [{"prompt": prompt, "completion": completion} for prompt, completion in _demo_corpus()]


@lru_cache(maxsize=1)
def _demo_text_corpus() -> tuple[str, ...]:
    seen: set[str] = set()
    paragraphs: list[str] = []
    for _, obj in _documented_objects():
        for paragraph in _prose(_own_doc(obj)):
            if paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
    return tuple(paragraphs)


def demo_text_corpus() -> list[str]:
    """Prose paragraphs of the same docstrings, in walk order, each once: pretraining text."""
    return list(_demo_text_corpus())
