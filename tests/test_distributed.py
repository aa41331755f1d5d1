"""Several processes (torchrun, gloo on CPU) train exactly what one process trains on the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_run_model, make_task_data
from train.checkpoint import SHARDED
from train.data import PLACEHOLDER, Example, count_target_tokens
from train.loader import StepLoader, eval_batches, rank_share

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # 33 training rows in global micro-batches of 8, 2 per step: steps of 16, 16, 1, 16 rows


def _data(tmp: Path) -> tuple[Path, Path]:
    train = make_task_data(tmp / "train.jsonl", 33, seed=5)
    val = make_task_data(tmp / "val.jsonl", 9, seed=6)
    return train, val


def _args(model: Path, data: tuple[Path, Path], out: Path, method: str, batch: int, *extra: str) -> list[str]:
    # AdamW's update is scale-free, so an element whose gradient is nearly zero turns float rounding (the
    # sum over ranks runs in another order) into an lr-sized step; a small lr keeps that far below 1e-6
    lr = "1e-3"
    method, _, embed = method.partition("+")  # qlora+embed: qlora with the embedding and head in 4 bits too
    extra = (*extra, "--quantize-embeddings") if embed else extra
    return ["--method", method, "--model", str(model), "--data", str(data[0]), "--val-data", str(data[1]),
            "--output-dir", str(out), "--seq-len", "32", "--batch-size", str(batch), "--grad-accum", "2",
            "--max-steps", str(STEPS), "--eval-every", "2", "--save-every", "2", "--keep-last", "10",
            "--dtype", "float32", "--lr", lr, "--lora-dropout", "0", "--seed", "7", *extra]


def _launch(argv: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPUs, also where GPUs exist
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "train.run"]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *launcher]
    return subprocess.run([sys.executable, *launcher, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _train(argv: list[str], processes: int) -> None:
    proc = _launch(argv, processes)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final(out: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's trainable tensors, also from FSDP2's per-rank shards (read without processes)."""
    path = out / "checkpoints" / f"step-{STEPS:08d}"
    if not (path / SHARDED).is_dir():
        return load_file(str(path / "trainable.safetensors"))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path / SHARDED, out / "whole.pt")
    return torch.load(out / "whole.pt", weights_only=True)["model"]


def _product(out: Path, method: str) -> dict[str, torch.Tensor]:
    name = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    return load_file(str(out / name))


@pytest.fixture(scope="module")
def single(run_model, tmp_path_factory):
    """One process, micro-batches of 8 rows: the reference for each method (built on first use)."""
    tmp = tmp_path_factory.mktemp("single")
    data, done = _data(tmp), {}

    def get(method: str) -> tuple[Path, tuple[Path, Path]]:
        if method not in done:
            out = tmp / method
            _train(_args(run_model, data, out, method, 8), 1)
            done[method] = out
        return done[method], data

    return get


@pytest.mark.parametrize("method,sharding", [("lora", "ddp"), ("full", "ddp"), ("lora", "fsdp"), ("full", "fsdp"),
                                             ("qlora", "ddp"), ("qlora+embed", "ddp"), ("prefix", "ddp"),
                                             ("prompt", "ddp")])
def test_two_processes_train_what_one_process_trains(run_model, single, tmp_path, method, sharding):
    """2 ranks x 4 rows == 1 process x 8 rows: per-step losses, val losses, final tensors and the saved
    product agree, including a step whose single row leaves rank 1 with only a placeholder."""
    reference, data = single(method)
    out = tmp_path / "two"
    _train(_args(run_model, data, out, method, 4, *(["--fsdp"] if sharding == "fsdp" else [])), 2)

    ours, theirs = _rows(out), _rows(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
        if "tokens" in b:
            assert a["tokens"] == b["tokens"]  # the same global batch, however it was split
    assert [r["tokens"] for r in theirs if "tokens" in r][2] < [r["tokens"] for r in theirs if "tokens" in r][0]

    for got, want in ((_final(out), _final(reference)), (_product(out, method), _product(reference, method))):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["sharding"] == sharding
    if method == "qlora+embed":
        assert json.loads((out / "adapter" / "lora_training.json").read_text())["quantized_embeddings"] is True


def test_fsdp_full_with_tied_embeddings_trains_what_one_process_trains(tmp_path):
    """The tied embedding/head is one parameter used at both ends; sharded, it must stay one."""
    model = make_run_model(tmp_path / "tied", tie_word_embeddings=True)
    data = _data(tmp_path)
    _train(_args(model, data, tmp_path / "one", "full", 8), 1)
    _train(_args(model, data, tmp_path / "two", "full", 4, "--fsdp"), 2)
    for a, b in zip(_rows(tmp_path / "two"), _rows(tmp_path / "one")):
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    got, want = _product(tmp_path / "two", "full"), _product(tmp_path / "one", "full")
    assert "lm_head.weight" not in want and got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_resume_on_two_processes_is_exact_and_needs_the_same_layout(run_model, tmp_path, sharding):
    """Dropout on (each rank's own random stream): a run resumed from its step-2 checkpoint ends with the
    tensors of the uninterrupted run, bit for bit; one process cannot resume a two-process checkpoint."""
    data = _data(tmp_path)
    out = tmp_path / "run"
    argv = _args(run_model, data, out, "lora", 4, "--lora-dropout", "0.2", *(["--fsdp"] if sharding == "fsdp" else []))
    _train(argv, 2)
    straight = _final(out)
    rows = _rows(out)

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
    for name in ("adapter", "summary.json", "loss.png"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    argv_resumed = [resumed.as_posix() if a == out.as_posix() else a for a in argv] + ["--resume"]

    if sharding == "ddp":  # (--fsdp on one process is refused before any checkpoint is read)
        one = _launch(argv_resumed, 1)
        assert one.returncode == 2
        assert "written by a run on 2 processes" in one.stderr and "Traceback" not in one.stderr

    _train(argv_resumed, 2)
    again = _final(resumed)
    assert again.keys() == straight.keys()
    for name in straight:
        assert torch.equal(again[name], straight[name]), name
    def timeless(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "input_tokens_per_s")} for r in rs]

    assert timeless(_rows(resumed)) == timeless(rows)


@pytest.mark.parametrize("extra,message", [
    (["--fsdp"], "start the run with torchrun"),
    (["--fsdp", "--method", "qlora"], "--fsdp shards full and lora training"),
])
def test_fsdp_misuse_is_one_line_and_exit_2(run_model, tmp_path, extra, message):
    data = _data(tmp_path)
    proc = _launch(_args(run_model, data, tmp_path / "out", "lora", 4) + extra, 1)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# --- sharding of the data, without processes -------------------------------------------------------
def _examples(n: int) -> list[Example]:
    return [Example([1] * (3 + i % 4), [-100] + [i + 1] * (2 + i % 4)) for i in range(n)]


def test_rank_shares_cover_everything_once():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [list(range(n))[rank_share(n, r, world)] for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_the_batches_of_one_loader(world):
    """Rank shares of each global micro-batch, stacked, equal the one-process micro-batch of
    batch * world rows; a rank with nothing left gets a zero-target placeholder."""
    items = _examples(8 * world + 1)  # two full micro-batches, then one row: the others get placeholders
    one = StepLoader(items, 4 * world, pad_id=0, grad_accum=2, seed=3)
    ranks = [StepLoader(items, 4, pad_id=0, grad_accum=2, seed=3, rank=r, world_size=world) for r in range(world)]
    placeholders = 0
    for _ in range(2 * one.steps_per_epoch + 1):
        want = one.next_step()
        got = [loader.next_step() for loader in ranks]
        assert all(len(g) == len(want) for g in got)
        for i, batch in enumerate(want):
            shares = [g[i] for g in got if PLACEHOLDER not in g[i]]
            placeholders += len(got) - len(shares)
            assert sum(count_target_tokens(g[i]) for g in got) == count_target_tokens(batch)
            labels = [row[row != -100].tolist() for s in shares for row in s["labels"]]
            assert labels == [row[row != -100].tolist() for row in batch["labels"]]
    assert placeholders == 2 * (world - 1)  # once in each of the two epochs, on every rank but the first


def test_eval_batches_are_sharded_and_padded_to_the_same_count():
    items = _examples(9)
    shards = [eval_batches(items, 2, 0, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    real = [b for s in shards for b in s if PLACEHOLDER not in b]
    assert sum(count_target_tokens(b) for b in real) == sum(count_target_tokens(b) for b in eval_batches(items, 2, 0))
    assert sum(b["labels"].shape[0] for b in real) == 9
