"""Reliability: SIGKILL at random moments then --resume, non-finite steps, full disks, unsafe files."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
from tests.conftest import make_task_data
from train import checkpoint as ckpt
from train import loop as loop_mod
from train.run import main

ROOT = Path(__file__).resolve().parents[1]
KILLS = 10


def _args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--val-fraction", "0.2", "--output-dir", str(out),
            "--seq-len", "32", "--batch-size", "8", "--seed", "3", "--dtype", "float32", *extra]


# `python -m train.run` with every checkpoint file written `slow` seconds late (train.checkpoint patched
# in the child), so that kills land inside checkpoint writes too.
SLOW_CHECKPOINTS = (
    "import sys, time; import train.checkpoint as c; slow = float(sys.argv[1]); write = c._write_synced; "
    "c._write_synced = lambda path, fn: (time.sleep(slow), write(path, fn))[1]; "
    "from train.run import main; sys.exit(main(sys.argv[2:]))"
)


def _spawn(argv, slow: float | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SLOW_CHECKPOINTS, str(slow), *argv] if slow else [sys.executable, "-m", "train.run", *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_until_training(proc: subprocess.Popen, out: Path, since: float) -> None:
    """Until the child has written the log or a checkpoint (setup is over), or it exits."""
    while proc.poll() is None:
        paths = [out / "metrics.jsonl", *(out / "checkpoints").glob("*")] if out.is_dir() else []
        if any(p.exists() and p.stat().st_mtime > since for p in paths):
            return
        time.sleep(0.01)


def _check_complete_checkpoints_load(out: Path) -> int:
    """Every step-* directory that looks complete must load; returns how many there are."""
    done = ckpt.complete_checkpoints(out / "checkpoints")
    for path in done:
        assert load_file(str(path / "trainable.safetensors"))
        ckpt.load_optimizer_state(path / "optimizer.pt")
        assert load_file(str(path / "rng.safetensors"))
        assert json.loads((path / "state.json").read_text())["trainer"]["step"] == int(path.name.split("-")[1])
    return len(done)


def _comparable_rows(out: Path) -> list[dict]:
    timing = {"tokens_per_s", "input_tokens_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_run(run_model, tmp_path):
    data = make_task_data(tmp_path / "task.jsonl", 80)
    # grad-accum 4 makes a step long enough (~0.1 s) for kills to land inside steps too
    common = ("--method", "lora", "--lr", "5e-3", "--max-steps", "14", "--save-every", "1", "--eval-every", "4",
              "--keep-last", "2", "--grad-accum", "4")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = _spawn(_args(run_model, data, straight, *common), slow=None)
    assert ref.wait(timeout=120) == 0, ref.stderr.read()

    rng = random.Random(1234)
    kills, inside_writes, landed = 0, 0, []
    for attempt in range(3 * KILLS):
        if kills == KILLS:
            break
        # Every child writes checkpoints slowly (the test hook): without it the tiny model runs all steps
        # before a kill lands. At 0.08 s per file most kills land inside a checkpoint write, at 0.005 s
        # more land inside a training step.
        slow = 0.08 if attempt % 2 else 0.005
        start = time.time()
        proc = _spawn(_args(run_model, data, killed, *common, "--resume"), slow)
        _wait_until_training(proc, killed, start)
        time.sleep(rng.uniform(0.0, 0.3 if slow > 0.01 else 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            inside_writes += any((killed / "checkpoints").glob(".tmp-*"))
            done = ckpt.complete_checkpoints(killed / "checkpoints")
            landed.append(done[-1].name[-2:] if done else "--")
        else:
            assert proc.returncode == 0, proc.stderr.read()
            shutil.rmtree(killed)  # it finished before the kill: start the run over, keep killing
        _check_complete_checkpoints_load(killed)
    # the kills spread over the run and some land inside checkpoint writes (the exact points vary with load)
    assert kills == KILLS and len(set(landed)) >= 2 and inside_writes >= 1
    final = _spawn(_args(run_model, data, killed, *common, "--resume"), slow=None)
    assert final.wait(timeout=120) == 0, final.stderr.read()

    last = "step-00000014/trainable.safetensors"
    a, b = load_file(str(straight / "checkpoints" / last)), load_file(str(killed / "checkpoints" / last))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _comparable_rows(straight) == _comparable_rows(killed)
    keys = ("steps", "skipped_steps", "first_val_loss", "best_val_loss", "best_step", "tokens_seen")
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (straight, killed))
    assert {k: s1[k] for k in keys} == {k: s2[k] for k in keys}
    assert _check_complete_checkpoints_load(killed) >= 2
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    print(f"{kills} kills after checkpoints {landed}; {inside_writes} left a partial checkpoint write behind")


def test_checkpoint_delete_and_replace_never_leave_a_broken_complete_dir(run_model, tmp_path, monkeypatch):
    """A crash inside prune or a same-step re-save leaves no step-* that has state.json but lacks tensors."""
    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    assert main(_args(run_model, data, out, "--method", "lora", "--max-steps", "2", "--save-every", "1")) == 0
    target = out / "checkpoints" / "step-00000001"

    def crash(path, *a, **k):
        raise KeyboardInterrupt  # stands in for a kill halfway through deleting the tree

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt._delete(target)
    assert not target.exists() and [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step-00000002"]


# --- non-finite steps --------------------------------------------------------------------------
def _poison(monkeypatch, bad_steps: set[int]):
    """Make the training loss NaN on the given optimizer steps (1-based); evaluation is untouched."""
    real, seen = loop_mod.forward_loss_sum, {"n": 0}

    def forward(model, batch, wrapped=None):
        summed, n = real(model, batch, wrapped)
        if model.training:
            seen["n"] += 1
            if seen["n"] in bad_steps:
                summed = summed * float("nan")
        return summed, n

    monkeypatch.setattr(loop_mod, "forward_loss_sum", forward)


def test_an_isolated_nan_step_is_skipped_counted_and_logged(run_model, tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    assert main(_args(run_model, data, out, "--method", "lora", "--max-steps", "5", "--max-skipped-steps", "2")) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1


def test_k_nan_steps_in_a_row_stop_the_run_with_status_3(run_model, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, {5, 6, 7, 8})
    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    argv = _args(run_model, data, out, "--method", "lora", "--lr", "5e-3", "--max-steps", "20", "--save-every", "2",
                 "--eval-every", "0", "--keep-last", "10", "--max-skipped-steps", "3")
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 steps in a row had a non-finite loss" in err and "step-00000006" in err
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if "grad_norm" in r]
    assert [r["step"] for r in rows if r["skipped"]] == [5, 6, 7] and rows[-1]["step"] == 7
    names = [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")]
    assert names == ["step-00000002", "step-00000004", "step-00000006"]
    good = load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    during = load_file(str(out / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    assert all(torch.equal(good[k], during[k]) and torch.isfinite(good[k]).all() for k in good)
    assert not (out / "adapter").exists()


def test_max_skipped_steps_must_be_positive(capsys):
    assert main(["--max-skipped-steps", "0"]) == 2
    assert "--max-skipped-steps (optim.max_skipped_steps) must be >= 1" in capsys.readouterr().err


# --- full disk, unwritable output ----------------------------------------------------------------
def test_full_disk_during_a_checkpoint_exits_2_and_keeps_earlier_ones(run_model, tmp_path, monkeypatch, capsys):
    real, calls = ckpt.save_file, {"n": 0}

    def save_file(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # trainable.safetensors of the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    assert main(_args(run_model, data, out, "--method", "lora", "--max-steps", "4", "--save-every", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot write checkpoint step-00000002") and "No space left on device" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]  # no .tmp-* left behind
    assert _check_complete_checkpoints_load(out) == 1
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed: the run resumes and finishes
    assert main(_args(run_model, data, out, "--method", "lora", "--max-steps", "4", "--save-every", "1",
                      "--resume")) == 0


def test_full_disk_while_logging_exits_2_in_one_line(run_model, tmp_path, monkeypatch, capsys):
    from train import run as run_mod

    def log(run, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(run.out / "metrics.jsonl"))

    monkeypatch.setattr(run_mod, "log", log)
    data = make_task_data(tmp_path / "task.jsonl", 40)
    assert main(_args(run_model, data, tmp_path / "o", "--method", "lora", "--max-steps", "2")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("metrics.jsonl: No space left on device")


def test_output_dir_that_cannot_be_created_exits_2_without_traceback(run_model, tmp_path):
    data = make_task_data(tmp_path / "task.jsonl", 20)
    (tmp_path / "plain-file").write_text("x")
    argv = _args(run_model, data, tmp_path / "plain-file" / "out", "--method", "lora", "--max-steps", "1")
    proc = subprocess.run([sys.executable, "-m", "train.run", *argv], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --output-dir") and "cannot create" in proc.stderr


# --- loading is safe ----------------------------------------------------------------------------
class _Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # unpickling this would run os.mkdir


def test_pickle_bomb_optimizer_state_is_refused_and_not_run(run_model, tmp_path, capsys):
    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    assert main(_args(run_model, data, out, "--method", "lora", "--max-steps", "2", "--save-every", "1")) == 0
    marker = tmp_path / "pwned"
    bomb = {"state": {}, "param_groups": [], "x": _Bomb(marker)}
    torch.save(bomb, out / "checkpoints" / "step-00000002" / "optimizer.pt")
    capsys.readouterr()
    assert main(_args(run_model, data, out, "--method", "lora", "--max-steps", "3", "--save-every", "1",
                      "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step-00000002/optimizer.pt: refused" in err
    assert not marker.exists()


def test_remote_code_in_a_model_dir_is_never_imported(run_model, tmp_path):
    model_dir = tmp_path / "evil"
    shutil.copytree(run_model, model_dir)
    marker = tmp_path / "imported"
    (model_dir / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (model_dir / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config["trust_remote_code"] = True
    (model_dir / "config.json").write_text(json.dumps(config))
    models.load_pretrained(model_dir)
    models.load_tokenizer(model_dir)
    data = make_task_data(tmp_path / "task.jsonl", 20)
    assert main(_args(model_dir, data, tmp_path / "o", "--method", "lora", "--max-steps", "1")) == 0
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained_adapter(run_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("adapter_run")
    data = make_task_data(tmp / "task.jsonl", 20)
    assert main(_args(run_model, data, tmp / "o", "--method", "lora", "--max-steps", "1")) == 0
    return tmp / "o" / "adapter"


@pytest.mark.parametrize("bad", [{"r": "8"}, {"r": 0}, {"r": True}, {"lora_alpha": "32"}, {"target_modules": 5},
                                 {"target_modules": ["q_proj", 3]}, {"use_dora": "yes"}, {"peft_type": "EVIL"},
                                 {"lora_dropout": [0.1]}])
def test_adapter_config_is_validated_before_use(trained_adapter, tmp_path, bad):
    from lora.adapter_io import read_adapter_config
    from models.hub import CheckpointError

    adapter = shutil.copytree(trained_adapter, tmp_path / "adapter")
    cfg_path = adapter / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **bad}))
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        read_adapter_config(adapter)
