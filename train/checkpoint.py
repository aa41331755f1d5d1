"""Training checkpoints: atomic, pruned to the last N, and complete enough to resume exactly.

Layout of `<output-dir>/checkpoints/step-00000100/`:
    trainable.safetensors   the trainable tensors by parameter name (float32 master copies)
    optimizer.pt            the optimizer's state_dict (tensors and plain values only)
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, data position, evaluation history, early stopping, python/numpy RNG

A checkpoint is written into a hidden temporary directory, flushed to disk, and renamed into place;
`state.json` is its last file. So a directory named `step-*` exists only when complete, and a crash
mid-write leaves at most a `.tmp-*` directory, which is ignored and cleaned up. Optimizer state is
read back with `torch.load(weights_only=True)`: plain tensors and containers, never arbitrary pickles;
a file that needs anything else (a pickle that would run code) is refused with CheckpointError.

Deleting a checkpoint (pruning, or replacing one of the same step) first renames it to a `.tmp-*`
name, so a crash mid-delete never leaves a `step-*` directory with `state.json` but missing tensors.

Test hook: the environment variable FT_TEST_SLOW_CHECKPOINT=SECONDS makes `save_checkpoint` sleep that
long before each file it writes, so kill tests can land inside a checkpoint write. Never set it otherwise.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.hub import CheckpointError

STEP_PREFIX = "step-"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue where it stopped."""

    step: int = 0  # optimizer steps taken
    data: dict[str, Any] = field(default_factory=dict)  # the batch iterator's position
    best_val_loss: float | None = None
    best_step: int | None = None
    early_stopping: dict[str, Any] = field(default_factory=dict)
    overfit: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0  # steps whose loss or gradient was not finite
    skipped_in_a_row: int = 0  # the current streak of such steps (the run stops at --max-skipped-steps)
    recent_losses: list[float] = field(default_factory=list)  # train losses since the last evaluation
    first_val_loss: float | None = None  # the evaluation before training, for the summary
    stopped: bool = False  # a stopping rule ended the run here: a resume must not train further
    tokens_seen: int = 0
    elapsed_s: float = 0.0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a training run changes: parameters with requires_grad, by name (ties counted once)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable tensors into the model; a missing or unexpected name is an error."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _restore_rng(tensors: dict[str, torch.Tensor], py_state: list, np_state: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    np.random.set_state((np_state["kind"], np.array(np_state["keys"], dtype=np.uint32), np_state["pos"], np_state["has_gauss"], np_state["gauss"]))


def _python_rng() -> tuple[list, dict]:
    version, inner, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [version, list(inner), gauss], {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(cached)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause() -> None:
    """Test hook (see module docstring): widen the window in which a kill lands mid-write."""
    delay = os.environ.get("FT_TEST_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))


def _write_synced(path: Path, write) -> None:
    _test_pause()
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    ckpt_root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    config: dict[str, Any],
) -> Path:
    """Write checkpoint `step-<state.step>` atomically under `ckpt_root`; return its path."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{STEP_PREFIX}{state.step:08d}"
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    try:
        _write_dir(tmp, model, optimizer, state, config)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            _delete(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not leave half a checkpoint behind
        raise
    return final


def _write_dir(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
               config: dict[str, Any]) -> None:
    """All files of one checkpoint into `tmp`, state.json last, each fsynced."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    py_rng, np_rng = _python_rng()
    _write_synced(tmp / "trainable.safetensors", lambda p: save_file(trainable_state(model), str(p)))
    _write_synced(tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p))
    _write_synced(tmp / "rng.safetensors", lambda p: save_file(_rng_tensors(), str(p)))
    payload = {"trainer": state.__dict__, "python_rng": py_rng, "numpy_rng": np_rng, "config": config}
    _write_synced(tmp / "state.json", lambda p: p.write_text(json.dumps(payload, indent=1)))
    _fsync_dir(tmp)


def _delete(path: Path) -> None:
    """Remove a checkpoint so that no crash point leaves it looking complete: rename, then delete."""
    doomed = path.parent / f".tmp-del-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are skipped)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def remove_partial(ckpt_root: Path) -> None:
    """Delete leftovers of interrupted writes."""
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune(ckpt_root: Path, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, never one in `keep` (the best)."""
    done = complete_checkpoints(ckpt_root)
    for p in done[: max(0, len(done) - keep_last)]:
        if p not in keep:
            _delete(p)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainerState:
    """Restore model tensors, optimizer, RNG states; return the trainer state."""
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")), path)
    if optimizer is not None:
        optimizer.load_state_dict(load_optimizer_state(path / "optimizer.pt"))
    payload = json.loads((path / "state.json").read_text())
    _restore_rng(load_file(str(path / "rng.safetensors")), payload["python_rng"], payload["numpy_rng"])
    return TrainerState(**payload["trainer"])


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state_dict, unpickled with weights_only=True: anything beyond tensors and plain
    containers (e.g. a pickle that would call a function) is refused, never executed."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused: not a plain tensor file ({first[:160]})") from None
