"""The trainer where nobody watches a terminal: plain log lines, signals that stop at a step boundary with a
checkpoint, throughput in the summary."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import make_task_data

ROOT = Path(__file__).resolve().parents[1]


def _args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--val-fraction", "0.2", "--output-dir", str(out),
            "--seq-len", "32", "--batch-size", "8", "--seed", "3", "--dtype", "float32", "--method", "lora",
            "--lr", "5e-3", *extra]


def _run(argv) -> subprocess.Popen:
    """`python -m train.run` with stdout and stderr pipes: no terminal."""
    return subprocess.Popen([sys.executable, "-m", "train.run", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_without_a_terminal_every_evaluation_and_regular_steps_get_a_plain_line(run_model, tmp_path):
    data = make_task_data(tmp_path / "task.jsonl", 60)
    out = tmp_path / "o"
    proc = _run(_args(run_model, data, out, "--max-steps", "12", "--eval-every", "4", "--log-every", "3",
                      "--task", "generation"))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r and r["step"] > 0]
    lines = stderr.splitlines()
    for r in evals:  # one line per evaluation, with every metric, the numbers of metrics.jsonl
        line = next(x for x in lines if x.startswith(f"step {r['step']}/12  eval: "))
        assert f"val_loss {r['val_loss']:.4f}" in line and f"bleu {r['bleu']:.4f}" in line and "exact_match" in line
    steps = [x for x in lines if x.startswith("step ") and "  loss " in x]
    assert [x.split()[1] for x in steps] == ["3/12", "6/12", "9/12", "12/12"]
    assert all("tokens/s" in x and "target tokens/s" in x and "eta" in x for x in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_tokens_per_s"] > summary["target_tokens_per_s"] > 0  # prompts are processed, not scored
    assert summary["input_tokens_seen"] > summary["tokens_seen"] > 0 and summary["wall_time_s"] >= summary["time_s"]
    assert "best_bleu" in summary and "best_exact_match" in summary
    assert "best bleu" in stdout  # the printed summary has the task metrics too


def test_sigterm_checkpoints_the_step_exits_143_and_resume_is_exact(run_model, tmp_path):
    data = make_task_data(tmp_path / "task.jsonl", 80)
    common = ("--max-steps", "16", "--eval-every", "8", "--save-every", "0", "--grad-accum", "4")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    ref = _run(_args(run_model, data, straight, *common))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    proc = _run(_args(run_model, data, stopped, *common))
    metrics = stopped / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM after step ") and last.endswith("with --resume to continue"), last
    step = int(last.split("after step ")[1].split(";")[0])
    assert 3 <= step < 16 and (stopped / "checkpoints" / f"step-{step:08d}" / "state.json").is_file()
    assert not (stopped / "adapter").exists()  # stopped early: no product yet

    resumed = _run(_args(run_model, data, stopped, *common, "--resume"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = "checkpoints/step-00000016/trainable.safetensors"
    a, b = load_file(str(straight / final)), load_file(str(stopped / final))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_stands_for_its_adapter(run_model, tmp_path, capsys):
    from adapters import adapter_dir, load_adapted
    from serve.generate import main as generate_main
    from train.run import main

    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    assert main(_args(run_model, data, out, "--max-steps", "2")) == 0
    assert adapter_dir(out) == out / "adapter" and adapter_dir(out / "adapter") == out / "adapter"
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        by_run = load_adapted(run_model, out).model(ids)
        by_adapter = load_adapted(run_model, out / "adapter").model(ids)
    assert torch.equal(by_run, by_adapter)
    capsys.readouterr()
    assert generate_main(["--model", str(run_model), "--adapter", str(out), "--prompt", "the sun is",
                          "--max-new-tokens", "3", "--system", "Be brief."]) == 2
    assert "add --chat" in capsys.readouterr().err


def test_a_full_run_directory_stands_for_its_model(run_model, tmp_path):
    import models
    from train.run import main

    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "full"
    argv = [a if a != "lora" else "full" for a in _args(run_model, data, out, "--max-steps", "1")]
    assert main(argv) == 0
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(models.load_pretrained(out)(ids), models.load_pretrained(out / "model")(ids))
    assert models.load_tokenizer(out).encode("the sun is") == models.load_tokenizer(out / "model").encode("the sun is")


def test_tensorboard_holds_the_logged_scalars_and_a_missing_tracker_is_one_warning(run_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    proc = _run(_args(run_model, data, out, "--max-steps", "6", "--eval-every", "3", "--report-to", "tensorboard,wandb"))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    try:
        import wandb  # noqa: F401  (only to know which outcome to expect)
    except ImportError:
        assert sum("--report-to wandb: not used (ModuleNotFoundError" in line for line in stderr.splitlines()) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in steps]
    assert all(abs(e.value - r["loss"]) <= 1e-6 * max(1.0, abs(r["loss"])) for e, r in zip(logged, steps))
    val, evals = events.Scalars("eval/val_loss"), [r for r in rows if "val_loss" in r]
    assert [e.step for e in val] == [r["step"] for r in evals]
    assert all(abs(e.value - r["val_loss"]) <= 1e-6 * max(1.0, r["val_loss"]) for e, r in zip(val, evals))  # float32
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/input_tokens_per_s"} <= set(events.Tags()["scalars"])
