"""train.config: method defaults, TOML < flags precedence, validation messages, JSON round trip."""
from __future__ import annotations

import dataclasses
import json

import pytest

from train.config import METHOD_LR, SECTIONS, ConfigError, LoraSettings, TrainConfig, build_parser, parse_args


@pytest.mark.parametrize("method,lr", [("full", 2e-5), ("lora", 2e-4), ("qlora", 2e-4), ("prefix", 1e-2),
                                       ("prompt", 3e-2)])
def test_lr_default_follows_method(method, lr):
    cfg = parse_args(["--method", method])
    assert cfg.optim.lr == lr == METHOD_LR[method]
    assert cfg.run.output_dir == f"runs/{method}"


def test_seed_chapter_defaults():
    cfg = parse_args([])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (cfg.optim.warmup_ratio, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (0.1, 0.01, 1.0)
    assert cfg.optim.schedule == "cosine" and cfg.optim.epochs == 3


def test_every_field_has_exactly_one_flag_and_every_flag_one_field():
    fields = [f for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    flags = [f.metadata["flag"] for f in fields]
    assert len(set(flags)) == len(flags) == len(fields)
    parser_flags = {s for a in build_parser()._actions for s in a.option_strings if not s.startswith("--no-")}
    assert parser_flags == set(flags) | {"-h", "--help", "--config"}


def test_flags_parse_into_fields():
    cfg = parse_args(["--method", "qlora", "--lr", "1e-4", "--lora-rank", "8", "--target-modules",
                      "q_proj, v_proj,gate_proj", "--pack", "--use-dora", "--max-steps", "50",
                      "--early-stopping-patience", "3", "--resume", "--seed", "7"])
    assert cfg.optim.lr == 1e-4 and cfg.lora.rank == 8 and cfg.data.pack and cfg.lora.use_dora
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "gate_proj"]
    assert cfg.optim.max_steps == 50 and cfg.eval.early_stopping_patience == 3
    assert cfg.run.resume == "latest" and cfg.run.seed == 7
    assert parse_args(["--resume", "runs/x/step-100"]).run.resume == "runs/x/step-100"


TOML = """
method = "lora"
lora-rank = 4
lr = 1
pack = true

[lora]
alpha = 8
target_modules = ["q_proj", "v_proj"]

[optim]
schedule = "linear"
"""


def test_toml_flat_and_sections_then_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    cfg = parse_args(["--config", str(path)])
    assert cfg.lora.rank == 4 and cfg.lora.alpha == 8.0 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.schedule == "linear"
    assert cfg.data.pack is True
    cfg = parse_args(["--config", str(path), "--lora-rank", "32", "--no-pack", "--schedule", "constant"])
    assert cfg.lora.rank == 32 and cfg.data.pack is False and cfg.optim.schedule == "constant"
    assert cfg.lora.alpha == 8.0  # untouched by flags: still from TOML


@pytest.mark.parametrize("text,message", [
    ("lora_rnak = 3", "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
    ("[lora]\nrnak = 3", "unknown key 'lora.rnak' (did you mean 'rank'?)"),
    ("[lora]\nlr = 3", "unknown key 'lora.lr'"),
    ("[lorra]\nrank = 3", "unknown section [lorra]"),
    ("lora_rank = 0", "key 'lora_rank': --lora-rank (lora.rank) must be >= 1, got 0"),
    ('[lora]\nrank = "8"', "key 'lora.rank': --lora-rank (lora.rank) must be an integer"),
    ("pack = 1", "key 'pack': --pack (data.pack) must be true or false"),
    ('schedule = "step"', "key 'schedule': --schedule (optim.schedule) must be one of cosine, linear, constant"),
    ("lora_rank = 2\n[lora]\nrank = 3", "set twice"),
    ("lora_rank = ", "not valid TOML"),
])
def test_toml_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(path)])
    assert str(info.value).startswith(str(path)) and message in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--lora-rank", "0"], "--lora-rank (lora.rank) must be >= 1, got 0"),
    (["--lora-rank", "-2"], "--lora-rank (lora.rank) must be >= 1"),
    (["--lora-dropout", "1.0"], "--lora-dropout (lora.dropout) must be in [0, 1)"),
    (["--lr", "0"], "--lr (optim.lr) must be > 0"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio (optim.warmup_ratio) must be in [0, 1)"),
    (["--batch-size", "0"], "--batch-size (data.batch_size) must be >= 1"),
    (["--seq-len", "1"], "--seq-len (data.seq_len) must be >= 2"),
    (["--target-modules", ","], "--target-modules (lora.target_modules) must name at least one module"),
    (["--method", "adapter"], "argument --method: invalid choice"),
    (["--lora-rank", "x"], "argument --lora-rank: invalid int value"),
    (["--lora-r", "8"], "unrecognized arguments: --lora-r"),  # no abbreviations
    (["--val-data", "v.jsonl", "--val-fraction", "0.1"], "--val-data and --val-fraction are exclusive"),
    (["--resume", "--overwrite"], "--resume and --overwrite"),
])
def test_bad_flags_raise_config_error_naming_the_flag(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", str(tmp_path / "none.toml")])


def test_resolved_config_round_trips_through_json():
    cfg = parse_args(["--method", "prompt", "--num-virtual-tokens", "8", "--prompt-init-text", "Classify:"])
    text = cfg.to_json()
    again = TrainConfig.from_json(text)
    assert again == cfg and again.optim.lr == 3e-2 and json.loads(text)["prompt"]["num_virtual_tokens"] == 8
    with pytest.raises(ConfigError, match="unknown config key lora.rnak"):
        TrainConfig.from_dict({"lora": {"rnak": 3}})


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="lora.rank"):
        TrainConfig(lora=LoraSettings(rank=0))
    assert TrainConfig(lora=LoraSettings(target_modules="q_proj,v_proj")).lora.target_modules == ["q_proj", "v_proj"]
