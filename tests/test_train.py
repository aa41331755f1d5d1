"""The trainer end to end on a tiny model: accumulation, resume, methods, early stopping, bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
from tests.conftest import make_task_data
from train import run as run_mod
from train.data import Example, collate
from train.loop import accumulate_gradients
from train.run import main

ROOT = Path(__file__).resolve().parents[1]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_accumulated_micro_batches_equal_one_big_batch(run_model, method):
    torch.manual_seed(0)
    examples = []
    for n in (5, 9, 3, 12, 7, 4):  # unequal lengths, unequal target counts
        ids = torch.randint(3, 200, (n,)).tolist()
        examples.append(Example(ids, [-100] * (n // 3) + ids[n // 3 :]))
    model = models.load_pretrained(run_model)
    if method == "lora":
        from lora.inject import LoraConfig, inject_lora

        inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # so lora_A gets a gradient too
    model.train()
    accumulate_gradients(model, [collate(examples, 0)], torch.device("cpu"), None)
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    micro = [collate(examples[i : i + 2], 0) for i in range(0, 6, 2)]
    accumulate_gradients(model, micro, torch.device("cpu"), None)
    small = _grads(model)
    assert big.keys() == small.keys() and len(big) > 0
    for name in big:
        assert (big[name] - small[name]).abs().max() <= 1e-6, name


def _args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--val-fraction", "0.2", "--output-dir", str(out),
            "--seq-len", "32", "--batch-size", "8", "--seed", "3", "--dtype", "float32", *extra]


def _train_ok(argv):
    assert main(argv) == 0


@pytest.mark.parametrize("method,lr", [("full", "3e-3"), ("lora", "1e-2"), ("qlora", "1e-2")])
def test_short_run_lowers_val_loss_and_writes_outputs(run_model, tmp_path, method, lr):
    data = make_task_data(tmp_path / "task.jsonl", 120)
    out = tmp_path / "out"
    _train_ok(_args(run_model, data, out, "--method", method, "--lr", lr, "--max-steps", "12", "--eval-every", "6",
                    "--save-every", "6"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] < summary["first_val_loss"] - 0.3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert len(steps) == 12 and all({"step", "loss", "lr"} <= r.keys() for r in steps)
    assert [r["step"] for r in evals] == [0, 6, 12] and all("perplexity" in r for r in evals)
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["run"]["method"] == method
    if method == "full":
        reloaded = models.load_pretrained(out / "model")
        assert (out / "model" / "tokenizer.json").is_file()
        assert reloaded.config.vocab_size == models.load_pretrained(run_model).config.vocab_size
    else:
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 16


def test_qlora_changes_only_adapters(run_model, tmp_path):
    from lora.inject import lora_layers

    data = make_task_data(tmp_path / "task.jsonl", 40)
    cfg = run_mod.parse_args(_args(run_model, data, tmp_path / "o", "--method", "qlora", "--max-steps", "3"))
    run = run_mod.setup(cfg)
    before = {k: v.clone() for k, v in run.model.state_dict().items() if "lora_" not in k}
    run_mod.fit(run)
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(type(layer.base).__name__ == "NF4Linear" for _, layer in lora_layers(run.model))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_from_checkpoint_equals_uninterrupted_run(run_model, tmp_path, method):
    data = make_task_data(tmp_path / "task.jsonl", 80)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--method", method, "--lr", "5e-3", "--max-steps", "6", "--save-every", "3", "--eval-every", "2",
              "--keep-last", "10")
    _train_ok(_args(run_model, data, straight, *common))
    # The interrupted run: everything the straight one wrote up to its step-3 checkpoint.
    resumed.mkdir()
    shutil.copytree(straight / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    rows = (straight / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    _train_ok(_args(run_model, data, resumed, *common, "--resume"))
    a = load_file(str(straight / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(r)["step"] for r in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(r)["step"] for r in rows]


def test_resume_without_checkpoint_starts_afresh(run_model, tmp_path, capsys):
    data = make_task_data(tmp_path / "task.jsonl", 40)
    _train_ok(_args(run_model, data, tmp_path / "o", "--method", "lora", "--max-steps", "2", "--resume"))
    assert "starting from the beginning" in capsys.readouterr().err


def test_early_stopping_fires_on_rigged_validation_curve(run_model, tmp_path, monkeypatch):
    curve = iter([5.0, 3.0, 2.0, 2.005, 2.5, 2.6, 2.7, 2.8, 2.9])

    def rigged(*args, **kwargs):
        loss = next(curve)
        return {"val_loss": loss, "perplexity": 0.0}

    monkeypatch.setattr(run_mod, "evaluate", rigged)
    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    _train_ok(_args(run_model, data, out, "--method", "lora", "--max-steps", "20", "--eval-every", "2",
                    "--early-stopping-patience", "2", "--early-stopping-threshold", "0.01"))
    summary = json.loads((out / "summary.json").read_text())
    # evals at steps 2 (3.0), 4 (2.0), 6 (2.005: not better by 0.01), 8 (2.5): patience 2 exhausted
    assert summary["steps"] == 8
    assert summary["best_step"] == 4 and summary["best_val_loss"] == 2.0


BAD_INPUTS = {
    "missing data": (lambda d: ["--data", str(d / "nope.jsonl")], r"nope\.jsonl"),
    "empty data": (lambda d: ["--data", str(_write(d / "e.jsonl", ""))], r"e\.jsonl.*empty"),
    "malformed line": (lambda d: ["--data", str(_write(d / "m.jsonl", '{"text": "ok"}\n{"text": oops}\n'))], r"m\.jsonl:2: malformed JSON"),
    "no shape": (lambda d: ["--data", str(_write(d / "s.jsonl", '{"question": "?"}\n'))], r"s\.jsonl:1: expected"),
    "no target match": (lambda d: ["--target-modules", "nonexistent_proj"], r"nonexistent_proj"),
    "rank zero": (lambda d: ["--lora-rank", "0"], r"--lora-rank"),
    "seq beyond window": (lambda d: ["--seq-len", "100000"], r"--seq-len 100000.*256"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_clear_line(run_model, tmp_path, capsys, case):
    make_args, pattern = BAD_INPUTS[case]
    data = make_task_data(tmp_path / "task.jsonl", 20)
    argv = ["--method", "lora", "--model", str(run_model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
            "--max-steps", "1", "--seq-len", "32", *make_args(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    import re

    assert re.search(pattern, err[-1]), err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_corrupt_model_and_occupied_output_dir_exit_2_without_traceback(run_model, tmp_path):
    data = make_task_data(tmp_path / "task.jsonl", 20)
    broken = tmp_path / "broken"
    shutil.copytree(run_model, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for model_dir, out, pattern in ((broken, tmp_path / "fresh", "model.safetensors"), (run_model, out, "already holds a run")):
        argv = ["--method", "lora", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
                "--max-steps", "1", "--seq-len", "32"]
        proc = subprocess.run([sys.executable, "-m", "train.run", *argv], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and pattern in proc.stderr
    assert (tmp_path / "o" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
