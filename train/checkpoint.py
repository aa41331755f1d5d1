"""Training checkpoints: atomic, pruned to the last N, and complete enough to resume exactly.

Layout of `<output-dir>/checkpoints/step-00000100/`:
    trainable.safetensors   the trainable tensors by parameter name (float32 master copies)
    optimizer.pt            the optimizer's state_dict (tensors and plain values only)
    rng.safetensors         torch CPU (and CUDA) generator states; other ranks' as `rank<r>.<name>`
    state.json              step, data position, evaluation history, early stopping, python/numpy RNG
                            (rank 0's at the top level, other ranks' under "ranks")

A run over several processes writes one checkpoint holding every rank's random-generator states, so
that dropout replays. Under DDP rank 0 writes the (identical on every rank) trainable tensors and
optimizer state as above; under FSDP2 each rank writes its own shards of them into `sharded/`
(torch.distributed.checkpoint), so no process ever holds the whole training state, and rank 0 writes
the rest of the directory and renames it into place once every shard is on disk.

A checkpoint is written into a hidden temporary directory, flushed to disk, and renamed into place;
`state.json` is its last file. So a directory named `step-*` exists only when complete, and a crash
mid-write leaves at most a `.tmp-*` directory, which is ignored and cleaned up. Optimizer state is
read back with `torch.load(weights_only=True)`: plain tensors and containers, never arbitrary pickles;
a file that needs anything else (a pickle that would run code) is refused with CheckpointError.

Deleting a checkpoint (pruning, or replacing one of the same step) first renames it to a `.tmp-*`
name, so a crash mid-delete never leaves a `step-*` directory with `state.json` but missing tensors.

This module is the format (files in, files out); train.checkpointer decides when and by which rank.
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
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

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
    tokens_seen: int = 0  # target tokens (those that carry loss)
    input_tokens_seen: int = 0  # every real input token the forward passes processed
    best_metrics: dict[str, Any] = field(default_factory=dict)  # the best evaluation's other metrics
    elapsed_s: float = 0.0
    world_size: int = 1  # processes that trained it: a resume must use as many
    fsdp: bool = False  # optimizer state keyed by parameter name (FSDP2) instead of by index
    scheduler: dict[str, Any] = field(default_factory=dict)  # the LR scheduler's state_dict()


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


@dataclass
class RngState:
    """One process's random generators: torch (CPU, CUDA), python's `random`, numpy's global."""

    tensors: dict[str, torch.Tensor]
    python: list
    numpy: dict


def rng_state() -> RngState:
    """This process's generator states, to save with a checkpoint."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py, np_state = _python_rng()
    return RngState(tensors, py, np_state)


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


def _write_synced(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


SHARDED = "sharded"  # FSDP2 checkpoints: the directory of torch.distributed.checkpoint shards


def temp_dir(ckpt_root: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    return ckpt_root / f".tmp-{STEP_PREFIX}{step:08d}-{os.getpid()}"


def save_checkpoint(
    ckpt_root: Path,
    tensors: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    state: TrainerState,
    config: dict[str, Any],
    rngs: list[RngState] | None = None,
    tmp: Path | None = None,
) -> Path:
    """Write checkpoint `step-<state.step>` atomically under `ckpt_root`; return its path.

    tensors: trainable_state(model) (full tensors); optimizer_state: optimizer.state_dict();
    rngs: every rank's rng_state(), rank 0 first (default: this process's).
    tmp: a temp_dir() the ranks already wrote `sharded/` into; tensors and optimizer_state are None then.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{STEP_PREFIX}{state.step:08d}"
    prepared = tmp is not None
    tmp = tmp or temp_dir(ckpt_root, state.step)
    try:
        _write_dir(tmp, tensors, optimizer_state, state, config, rngs or [rng_state()], prepared)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            _delete(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not leave half a checkpoint behind
        raise
    return final


def _write_dir(tmp: Path, tensors: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None,
               state: TrainerState, config: dict[str, Any], rngs: list[RngState], prepared: bool) -> None:
    """All files of one checkpoint into `tmp` (kept if `prepared`), state.json last, each fsynced."""
    if not prepared:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    rng_tensors = {(f"rank{r}." if r else "") + k: v for r, rng in enumerate(rngs) for k, v in rng.tensors.items()}
    if tensors is not None:
        _write_synced(tmp / "trainable.safetensors", lambda p: save_file(tensors, str(p)))
    if optimizer_state is not None:
        _write_synced(tmp / "optimizer.pt", lambda p: torch.save(optimizer_state, p))
    _write_synced(tmp / "rng.safetensors", lambda p: save_file(rng_tensors, str(p)))
    payload = {"trainer": state.__dict__, "python_rng": rngs[0].python, "numpy_rng": rngs[0].numpy,
               "ranks": [{"python_rng": r.python, "numpy_rng": r.numpy} for r in rngs[1:]], "config": config}
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


def read_checkpoint(path: Path, rank: int = 0, world_size: int = 1,
                    fsdp: bool = False) -> tuple[TrainerState, dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """(trainer state, trainable tensors, optimizer state) of a checkpoint; restores rank `rank`'s RNGs.

    The checkpoint must come from a run with the same number of processes and the same sharding
    (CheckpointError otherwise): each rank's data share and random stream depend on them. An FSDP2
    checkpoint returns None for both: its tensors are in `path / SHARDED` (train.distributed).
    """
    payload = json.loads((path / "state.json").read_text())
    saved = (payload["trainer"].get("world_size", 1), payload["trainer"].get("fsdp", False))
    if saved != (world_size, fsdp):
        def layout(n: int, sharded: bool) -> str:
            return f"{n} process{'es' if n > 1 else ''}" + (" with --fsdp" if sharded else "")
        raise CheckpointError(f"{path}: written by a run on {layout(*saved)}; this run has "
                              f"{layout(world_size, fsdp)}: resume with the same layout")
    tensors = optimizer_state = None
    if not fsdp:
        tensors = load_file(str(path / "trainable.safetensors"))
        optimizer_state = load_optimizer_state(path / "optimizer.pt")
    rng = load_file(str(path / "rng.safetensors"))
    if rank == 0:
        _restore_rng(rng, payload["python_rng"], payload["numpy_rng"])
    else:
        mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")}
        other = payload["ranks"][rank - 1]
        _restore_rng(mine, other["python_rng"], other["numpy_rng"])
    return TrainerState(**payload["trainer"]), tensors, optimizer_state


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


# --- FSDP2: every rank reads and writes its own shards ---------------------------------------------------
def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """This rank's shards of the trainable tensors (and optimizer state), keyed by parameter name."""
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    state = {"model": {n: t for n, t in get_model_state_dict(model).items() if n in trainable}}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its shards of the trainable tensors and optimizer state into `path` (a collective)."""
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    """Read a save_sharded() directory back into the sharded model (and optimizer), at the same world size."""
    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_trainable_state(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """Full trainable tensors by name, on the CPU of rank 0 (`is_main`); under FSDP2 every rank must call
    this: each parameter is all-gathered in turn, so only one whole parameter exists at a time. Other
    ranks get an empty dict."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            if is_main:
                out[name] = whole.detach().contiguous().cpu()
    return out
