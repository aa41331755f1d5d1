"""Trainer options beyond the defaults: task metrics, 8-bit optimizers, checkpointing, the demo path, generate CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from models.generate import SamplingConfig, generate
from tests.conftest import TASK_WORDS
from train.run import main

ROOT = Path(__file__).resolve().parents[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _classification_data(path: Path, n: int) -> Path:
    lines = [json.dumps({"prompt": f"is the {w} warm?", "completion": " yes" if i % 3 else " no"})
             for i, w in enumerate(TASK_WORDS * (n // len(TASK_WORDS)))]
    path.write_text("\n".join(lines) + "\n")
    return path


def _base_args(run_model, data, out, *extra):
    return ["--model", str(run_model), "--data", str(data), "--val-fraction", "0.25", "--output-dir", str(out),
            "--seq-len", "32", "--batch-size", "8", "--dtype", "float32", "--method", "lora", "--lr", "1e-2", *extra]


def test_classification_task_reports_accuracy_and_macro_f1(run_model, tmp_path):
    data = _classification_data(tmp_path / "cls.jsonl", 60)
    assert main(_base_args(run_model, data, tmp_path / "o", "--task", "classification", "--max-steps", "4",
                           "--eval-every", "2")) == 0
    evals = [r for r in _rows(tmp_path / "o") if "accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0 for r in evals)


def test_generation_task_reports_bleu_and_exact_match(run_model, tmp_path):
    from tests.conftest import make_task_data

    data = make_task_data(tmp_path / "gen.jsonl", 60)
    assert main(_base_args(run_model, data, tmp_path / "o", "--task", "generation", "--max-steps", "2")) == 0
    last = [r for r in _rows(tmp_path / "o") if "bleu" in r][-1]
    assert 0.0 <= last["bleu"] <= 100.0 and 0.0 <= last["chrf"] <= 100.0 and 0.0 <= last["exact_match"] <= 1.0


@pytest.mark.parametrize("optim", ["adamw8bit", "paged_adamw8bit"])
def test_bitsandbytes_optimizers_train(run_model, tmp_path, optim):
    from tests.conftest import make_task_data

    data = make_task_data(tmp_path / "t.jsonl", 60)
    assert main(_base_args(run_model, data, tmp_path / "o", "--optim", optim, "--max-steps", "6", "--eval-every", "6")) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["best_val_loss"] < summary["first_val_loss"]


def test_grad_checkpointing_with_frozen_base_gives_same_run(run_model, tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import make_task_data

    data = make_task_data(tmp_path / "t.jsonl", 40)
    outs = []
    for flag in ([], ["--grad-checkpointing"]):
        out = tmp_path / f"o{len(flag)}"
        assert main(_base_args(run_model, data, out, "--lora-dropout", "0", "--max-steps", "3", *flag)) == 0
        outs.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.allclose(outs[0][k], outs[1][k], atol=1e-6) for k in outs[0])


def test_train_run_without_model_or_data_exits_2_in_one_line(run_model, tmp_path, capsys):
    for argv in (["--method", "lora"], ["--method", "lora", "--model", str(run_model)]):
        assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: --model and --data are required (python -m demo runs the built-in example)"]
    assert not (tmp_path / "o").exists()


def test_generate_cli_prints_only_the_continuation(run_model):
    tok = models.load_tokenizer(run_model)
    model = models.load_pretrained(run_model)
    prompt = "the red cat is"
    new = generate(model, [tok.encode(prompt)], SamplingConfig(max_new_tokens=7, stop_ids=tuple(tok.stop_ids)), tok.pad_id)[0]
    proc = subprocess.run([sys.executable, "-m", "serve.generate", "--model", str(run_model), "--prompt", prompt,
                           "--max-new-tokens", "7", "--temperature", "0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == tok.decode(new, skip_special_tokens=True) + "\n"


def test_generate_cli_with_adapter_and_bad_model(run_model, tmp_path):
    from tests.conftest import make_task_data

    data = make_task_data(tmp_path / "t.jsonl", 40)
    assert main(_base_args(run_model, data, tmp_path / "o", "--method", "qlora", "--max-steps", "2")) == 0
    ok = subprocess.run([sys.executable, "-m", "serve.generate", "--model", str(run_model), "--adapter",
                         str(tmp_path / "o" / "adapter"), "--prompt", "the sun is", "--max-new-tokens", "4"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "serve.generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nowhere" in bad.stderr
