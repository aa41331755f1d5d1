"""TrainConfig: every knob of a fine-tuning run, one dataclass per concern.

(About 470 lines: the dataclasses with their flags, and the one field table that generates the
command line, the TOML reader and validation from them; each half needs the other's table.)

Three ways in, one precedence: dataclass defaults < a TOML file (`--config FILE.toml`) < command-line
flags. Every field carries its flag in its metadata, so the CLI is generated from the dataclasses and
maps one-to-one onto fields (`--lora-rank` <-> `TrainConfig.lora.rank`); `--config` is the only flag
that is not a field.

TOML may use flat keys named like the flags (`lora_rank = 8` or `lora-rank = 8`) or one table per
section (`[lora]` then `rank = 8`); unknown keys are rejected by name. A `None` default means "resolve
from the method" (e.g. `lr`) or "off" (e.g. `max_steps`); `TrainConfig.__post_init__` resolves and
validates, so a constructed config is always complete, and `to_dict()` / `from_dict()` round-trip it
through JSON unchanged.

    cfg = parse_args(["--method", "lora", "--data", "train.jsonl"])
    cfg.optim.lr          # 2e-4: the LoRA default
    json.dumps(cfg.to_dict())
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora.inject import ALL_LINEAR, LoraConfig
from train.errors import ConfigError
from train.methods import METHODS
from train.schedule import SCHEDULES
from train.tracking import TRACKERS

TASKS = ("lm", "classification", "generation")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
METHOD_LR = {name: method.lr for name, method in METHODS.items()}  # for the --lr help text
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # every attention projection: common practice
# Where prompt and prefix tuning start: real tokens (as both papers advise), an instruction any task fits.
VIRTUAL_INIT_TEXT = "Read the input below carefully and give the answer that is expected."


def _f(default: Any = None, flag: str = "", help: str = "", *, choices: Collection[str] | None = None, **extra):
    """A dataclass field that knows its command-line flag (metadata drives argparse and TOML)."""
    meta = {"flag": flag, "help": help, "choices": choices, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """What is trained, where it is written, and how reproducibly."""

    # the live view of train.methods.METHODS: a method added there is a choice at once
    method: str = _f("lora", "--method", "what to train (train.methods)", choices=METHODS.keys())
    model: str | None = _f(None, "--model", "checkpoint directory or hub id (required; python -m demo runs the built-in one)")
    output_dir: str | None = _f(None, "--output-dir", "where checkpoints and logs go (None: runs/<method>)")
    seed: int = _f(0, "--seed", "seeds weights init, dropout, the val split and the data order")
    dtype: str = _f("auto", "--dtype", "compute dtype; auto: bfloat16 where the device has it, else float32",
                    choices=DTYPES)
    grad_checkpointing: bool = _f(False, "--grad-checkpointing", "recompute activations in backward to save memory")
    compile: bool = _f(False, "--compile", "torch.compile each decoder block for training (compiles on the first "
                       "steps; benchmarks/RESULTS.md says when it pays)")
    resume: str | None = _f(None, "--resume", "resume from a checkpoint dir; bare flag: the latest in output-dir",
                            nargs="?", const="latest")
    overwrite: bool = _f(False, "--overwrite", "allow writing into a non-empty output dir without resuming")
    skip_memory_check: bool = _f(False, "--skip-memory-check",
                                 "start even when the estimated peak memory exceeds what the device has free")
    report_to: list[str] = _f(["none"], "--report-to", f"experiment trackers, comma-separated: {', '.join(TRACKERS)} "
                              "(train.tracking; metrics.jsonl is always written)")
    log_every: int | None = _f(None, "--log-every", "without a terminal: a progress line every N steps "
                               "(None: about 20 per run; at least one a minute)")
    fsdp: bool = _f(False, "--fsdp", "under torchrun: shard weights, gradients and optimizer state with FSDP2 "
                    "(full and lora; default: DDP, a full replica per process)")


@dataclass
class DataConfig:
    """Where examples come from and how they are cut into batches."""

    data: str | None = _f(None, "--data", "training data: .jsonl/.json/.csv/.tsv/.parquet, a directory of them, or a "
                          "hub dataset id owner/name[:split] (required)")
    val_data: str | None = _f(None, "--val-data", "validation data, in any form --data takes")
    data_split: str | None = _f(None, "--data-split", "the split of a hub dataset (default: train; or owner/name:split)")
    text_field: str | None = _f(None, "--text-field", "the column that holds plain text (shape text)")
    prompt_field: str | None = _f(None, "--prompt-field", "the column that holds the prompt (shape prompt/completion)")
    completion_field: str | None = _f(None, "--completion-field", "the column that holds the completion")
    messages_field: str | None = _f(None, "--messages-field", "the column that holds chat messages (or ShareGPT conversations)")
    val_fraction: float = _f(0.0, "--val-fraction", "hold out this fraction of --data for validation (seeded)")
    seq_len: int = _f(1024, "--seq-len", "tokens per row; longer examples are truncated (and counted)")
    pack: bool = _f(False, "--pack", "pack several examples per row with a block-diagonal mask")
    batch_size: int = _f(8, "--batch-size", "rows per micro-batch")


@dataclass
class OptimConfig:
    """The optimizer, its schedule, and how long to run it."""

    optim: str = _f("adamw", "--optim", "optimizer", choices=OPTIMIZERS)
    lr: float | None = _f(None, "--lr", f"peak learning rate (None: per method, {METHOD_LR})")
    schedule: str = _f("cosine", "--schedule", "decay after warmup", choices=SCHEDULES)
    warmup_ratio: float = _f(0.1, "--warmup-ratio", "warmup steps = ceil(ratio * total steps)")
    warmup_steps: int | None = _f(None, "--warmup-steps", "warmup steps; overrides --warmup-ratio")
    weight_decay: float = _f(0.01, "--weight-decay", "decoupled AdamW weight decay")
    max_grad_norm: float = _f(1.0, "--max-grad-norm", "clip the global grad norm to this (0: no clipping)")
    grad_accum: int = _f(1, "--grad-accum", "micro-batches per optimizer step")
    epochs: int = _f(3, "--epochs", "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = _f(None, "--max-steps", "optimizer steps to run; overrides --epochs")
    max_skipped_steps: int = _f(5, "--max-skipped-steps",
                                "stop the run (exit status 3) after this many non-finite steps in a row")


@dataclass
class LoraSettings:
    """Low-rank adapters (methods lora and qlora): the trainer's defaults, and the flags of lora.LoraConfig.

    Named like the flags (--lora-rank -> rank), where LoraConfig is named like PEFT's (r); `adapter()`
    is the one translation, and train.memory estimates from it too.
    """

    rank: int = _f(16, "--lora-rank", "adapter rank r")
    alpha: float = _f(32.0, "--lora-alpha", "scale = alpha / r (alpha / sqrt(r) with --use-rslora)")
    dropout: float = _f(0.05, "--lora-dropout", "dropout on the adapter input")
    target_modules: list[str] = _f(list(LORA_TARGETS), "--target-modules",
                                   f"comma-separated module names, or {ALL_LINEAR}")
    use_rslora: bool = _f(False, "--use-rslora", "rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = _f(False, "--use-dora", "weight-decomposed LoRA (DoRA)")
    quantize_embeddings: bool = _f(False, "--quantize-embeddings",
                                   "qlora: hold the token embedding and output head in NF4 too (4x less memory "
                                   "for them; the loss reads the head by vocabulary slices)")

    def adapter(self) -> LoraConfig:
        """These settings as the adapter's hyperparameters."""
        targets = self.target_modules
        return LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
                          use_rslora=self.use_rslora, use_dora=self.use_dora)


@dataclass
class PromptSettings:
    """Virtual tokens (methods prefix and prompt)."""

    num_virtual_tokens: int = _f(20, "--num-virtual-tokens", "soft-prompt / prefix length")
    prompt_init_text: str | None = _f(VIRTUAL_INIT_TEXT, "--prompt-init-text",
                                      "start the soft prompt as this text's token embeddings (''/None: random N(0,1))")
    prefix_init_text: str | None = _f(VIRTUAL_INIT_TEXT, "--prefix-init-text",
                                      "start the prefix as the keys and values the base computes for this text "
                                      "(''/None: random N(0,1), PEFT's default)")
    prefix_projection: int = _f(0, "--prefix-projection",
                                "prefix tuning through PEFT's reparameterisation MLP of this width (folded when saved); 0: off")


@dataclass
class EvalConfig:
    """What evaluation measures and when training stops early."""

    task: str = _f("lm", "--task", "lm: loss+perplexity; classification: +accuracy/F1; generation: +BLEU/chrF/EM",
                   choices=TASKS)
    eval_every: int = _f(100, "--eval-every", "evaluate every N optimizer steps (0: only at the end)")
    early_stopping_patience: int | None = _f(None, "--early-stopping-patience",
                                             "stop after N evals without improvement (None: never)")
    early_stopping_threshold: float = _f(0.01, "--early-stopping-threshold",
                                         "val loss must beat the best by more than this (absolute)")
    overfit_patience: int = _f(3, "--overfit-patience",
                               "stop when val loss rose this many evaluations in a row (0: warn only, never stop)")
    overfit_gap: float = _f(0.5, "--overfit-gap", "warn when val loss exceeds train loss by more than this (nats)")


@dataclass
class CheckpointConfig:
    """How often checkpoints are written and how many are kept."""

    save_every: int = _f(100, "--save-every", "save every N optimizer steps (0: only at the end)")
    keep_last: int = _f(3, "--keep-last", "keep this many most recent checkpoints (plus the best)")


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "lora": LoraSettings,
    "prompt": PromptSettings,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass
class TrainConfig:
    """The whole run. Constructing one resolves method defaults and validates every field."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self.resolve()
        self.validate()

    def resolve(self) -> None:
        """Fill the "None: per method" defaults. Idempotent, so a reloaded config stays the same."""
        if self.optim.lr is None and self.run.method in METHODS:
            self.optim.lr = METHODS[self.run.method].lr
        if self.run.output_dir is None:
            self.run.output_dir = f"runs/{self.run.method}"
        if isinstance(self.lora.target_modules, str):
            self.lora.target_modules = _split_list(self.lora.target_modules)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        for path, value in _leaves(self):
            kind = _FIELDS[path]
            problem = _type_problem(value, kind)
            if problem is None:
                choices = kind.meta.get("choices")
                problem = f"must be one of {', '.join(choices)}" if choices and value not in choices else None
            if problem is None and path in _RULES and value is not None:
                ok, problem = _RULES[path]
                problem = None if ok(value) else problem
            if problem:
                raise ConfigError(f"{kind.flag} ({path}) {problem}, got {value!r}", field=path)
        self._validate_across_fields()

    def _validate_across_fields(self) -> None:
        if self.data.val_data is not None and self.data.val_fraction > 0:
            raise ConfigError("--val-data and --val-fraction are exclusive: give one", field="data.val_fraction")
        if self.run.resume is not None and self.run.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other", field="run.overwrite")
        METHODS[self.run.method].check(self)

    @property
    def method(self):
        """The train.methods.Method that --method names."""
        return METHODS[self.run.method]

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {field: value}}, JSON-serialisable; from_dict(to_dict()) == self."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> TrainConfig:
        """Inverse of to_dict; unknown sections or keys raise ConfigError."""
        values = {}
        for name, section in d.items():
            if name not in SECTIONS or not isinstance(section, dict):
                raise ConfigError(f"unknown config section {name!r}")
            for key, value in section.items():
                if f"{name}.{key}" not in _FIELDS:
                    raise ConfigError(f"unknown config key {name}.{key}")
                values[f"{name}.{key}"] = value
        return build_config(values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


# --- field table: one row per field, built from the dataclasses --------------------------------
@dataclass(frozen=True)
class _Kind:
    path: str  # "lora.rank"
    flag: str  # "--lora-rank"
    base: type  # int, float, str, bool or list
    optional: bool  # None allowed
    meta: dict

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


def _field_table() -> dict[str, _Kind]:
    table = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            optional = type(None) in typing.get_args(tp)
            if optional:  # `int | None` -> int
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            base = list if typing.get_origin(tp) is list else tp
            table[f"{section}.{f.name}"] = _Kind(f"{section}.{f.name}", f.metadata["flag"], base, optional,
                                                dict(f.metadata))
    return table


_FIELDS = _field_table()
_BY_DEST = {k.dest: k for k in _FIELDS.values()}


def _positive(x) -> bool:
    return x > 0


# path -> (predicate on a non-None value, what it means). Types and choices are checked before these.
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "run.seed": (lambda x: x >= 0, "must be >= 0"),
    "run.log_every": (_positive, "must be >= 1"),
    "run.report_to": (lambda x: len(x) > 0 and all(n in TRACKERS for n in x), f"must name trackers among {TRACKERS}"),
    "data.val_fraction": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "data.seq_len": (lambda x: x >= 2, "must be >= 2"),
    "data.batch_size": (_positive, "must be >= 1"),
    "optim.lr": (_positive, "must be > 0"),
    "optim.warmup_ratio": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "optim.warmup_steps": (lambda x: x >= 0, "must be >= 0"),
    "optim.weight_decay": (lambda x: x >= 0, "must be >= 0"),
    "optim.max_grad_norm": (lambda x: x >= 0, "must be >= 0"),
    "optim.grad_accum": (_positive, "must be >= 1"),
    "optim.epochs": (_positive, "must be >= 1"),
    "optim.max_steps": (_positive, "must be >= 1"),
    "optim.max_skipped_steps": (_positive, "must be >= 1"),
    "lora.rank": (_positive, "must be >= 1"),
    "lora.alpha": (_positive, "must be > 0"),
    "lora.dropout": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "lora.target_modules": (lambda x: len(x) > 0 and all(x), "must name at least one module"),
    "prompt.num_virtual_tokens": (_positive, "must be >= 1"),
    "prompt.prefix_projection": (lambda x: x >= 0, "must be >= 0"),
    "eval.eval_every": (lambda x: x >= 0, "must be >= 0"),
    "eval.early_stopping_patience": (_positive, "must be >= 1"),
    "eval.early_stopping_threshold": (lambda x: x >= 0, "must be >= 0"),
    "eval.overfit_patience": (lambda x: x >= 0, "must be >= 0"),
    "eval.overfit_gap": (lambda x: x > 0, "must be > 0"),
    "checkpoint.save_every": (lambda x: x >= 0, "must be >= 0"),
    "checkpoint.keep_last": (_positive, "must be >= 1"),
}


def _leaves(cfg: TrainConfig):
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            yield f"{section}.{f.name}", getattr(obj, f.name)


def _type_problem(value: Any, kind: _Kind) -> str | None:
    """None if `value` fits the field's type; else what is wrong. bool is not accepted as a number."""
    if value is None:
        return None if kind.optional else "must be set"
    if kind.base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind.base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.base is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, kind.base)
    return None if ok else f"must be {_TYPE_NAMES[kind.base]}"


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list of strings"}


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --- building from (path -> value) ---------------------------------------------------------------
def build_config(values: dict[str, Any], origins: dict[str, str] | None = None) -> TrainConfig:
    """TrainConfig from {"lora.rank": 8, ...}; `origins` says where each value came from, for errors."""
    sections = {name: {} for name in SECTIONS}
    for path, value in values.items():
        section, name = path.split(".", 1)
        if _FIELDS[path].base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # TOML `lr = 1` is an int; the field is a float
        sections[section][name] = value
    try:
        return TrainConfig(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})
    except ConfigError as e:
        origin = (origins or {}).get(e.field or "")
        if origin is None:
            raise
        raise ConfigError(f"{origin}: {e}", field=e.field) from None


def load_toml(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a TOML config: ({field path: value}, {field path: "file: key 'k'"}). Unknown keys raise."""
    try:
        import tomllib
    except ImportError as e:  # Python 3.10
        raise ConfigError("--config needs Python >= 3.11 (tomllib)") from e
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found", field=None) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    values, origins = {}, {}
    for key, value in raw.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(f"{path}: unknown section [{key}]{_suggest(key, SECTIONS)}")
            for sub, v in value.items():
                kind = _section_key(path, key, sub)
                _put(values, origins, kind, v, f"{path}: key '{key}.{sub}'")
        else:
            kind = _BY_DEST.get(key.replace("-", "_"))
            if kind is None:
                raise ConfigError(f"{path}: unknown key '{key}'{_suggest(key.replace('-', '_'), _BY_DEST)}")
            _put(values, origins, kind, value, f"{path}: key '{key}'")
    return values, origins


def _section_key(path: Path, section: str, key: str) -> _Kind:
    """A key inside [section]: the field name (`rank`) or its flag name (`lora_rank`)."""
    key_ = key.replace("-", "_")
    kind = _FIELDS.get(f"{section}.{key_}") or _BY_DEST.get(key_)
    if kind is None or not kind.path.startswith(section + "."):
        names = [p.split(".", 1)[1] for p in _FIELDS if p.startswith(section + ".")]
        raise ConfigError(f"{path}: unknown key '{section}.{key}'{_suggest(key_, names)}")
    return kind


def _put(values: dict, origins: dict, kind: _Kind, value: Any, origin: str) -> None:
    if kind.path in values:
        raise ConfigError(f"{origin}: {kind.path} is set twice in the file", field=kind.path)
    if kind.base is list and isinstance(value, str):
        value = _split_list(value)
    if kind.path == "run.resume" and isinstance(value, bool):
        value = "latest" if value else None  # `resume = true` reads naturally in TOML
    values[kind.path] = value
    origins[kind.path] = origin


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- the command line ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per TrainConfig field, plus --config. Unset flags are absent from the result."""
    # No abbreviations: every flag is spelled out, so flags and fields stay one-to-one.
    p = _Parser(prog="python -m train.run", description="Fine-tune a Llama-family decoder.",
                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings; flags override it")
    for section in SECTIONS:
        group = p.add_argument_group(section)
        for kind in (k for k in _FIELDS.values() if k.path.startswith(section + ".")):
            group.add_argument(kind.flag, dest=kind.path, **_argparse_kwargs(kind))
    return p


def _argparse_kwargs(kind: _Kind) -> dict[str, Any]:
    kw: dict[str, Any] = {"help": kind.meta["help"]}
    if kind.base is bool:
        kw["action"] = argparse.BooleanOptionalAction  # --pack / --no-pack, so a flag can undo TOML
    elif kind.base is list:
        kw["type"] = _split_list
        kw["metavar"] = "A,B,..."
    else:
        kw["type"] = kind.base
        kw["metavar"] = {int: "N", float: "X"}.get(kind.base, kind.dest.upper())
    if kind.meta.get("choices"):
        kw["choices"] = kind.meta["choices"]
        kw.pop("metavar", None)
    if "nargs" in kind.meta:
        kw["nargs"], kw["const"] = kind.meta["nargs"], kind.meta["const"]
    return kw


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """argv -> resolved, validated TrainConfig. Precedence: defaults < --config TOML < flags."""
    ns = vars(build_parser().parse_args(argv))
    values, origins = {}, {}
    if "config" in ns:
        values, origins = load_toml(ns.pop("config"))
    for path, value in ns.items():
        values[path] = value
        origins.pop(path, None)  # a flag's own error message already names the flag
    return build_config(values, origins)
