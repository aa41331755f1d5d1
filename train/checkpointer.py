"""Checkpointer: when and by whom one run's checkpoints are written, resumed from and restored.

One process writes everything itself. Under DDP every rank holds the same trainable tensors and
optimizer state, so rank 0 writes them, with every rank's random-generator states (gathered) so that
dropout replays. Under FSDP2 no process holds the whole state: each rank writes its own shards into
rank 0's temporary directory, which rank 0 completes and renames into place (train.checkpoint).
Every method here is called by every rank; the ranks meet in barriers so that none moves on (or
resumes) before a checkpoint exists.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from train import checkpoint as ckpt
from train import distributed as dist
from train.distributed import Parallel
from train.errors import RunError


class Checkpointer:
    """Saves the run's steps under `root`, keeps the newest `keep_last` and the best, resumes, restores the best."""

    def __init__(self, root: Path, parallel: Parallel, keep_last: int, config: dict[str, Any]) -> None:
        self.root = root
        self.parallel = parallel
        self.keep_last = keep_last
        self.config = config  # the resolved TrainConfig, stored in every checkpoint
        self.best: Path | None = None  # the checkpoint of the best evaluation so far
        self._saved_step: int | None = None

    def path(self, step: int) -> Path:
        return self.root / f"{ckpt.STEP_PREFIX}{step:08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = ckpt.complete_checkpoints(self.root)
        return done[-1] if done else None

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: ckpt.TrainerState,
             best: bool = False) -> Path:
        """Checkpoint step `state.step` (once: a second call for the same step returns the first).

        best: this step's evaluation is the best so far; pruning never deletes the best checkpoint.
        A full disk or unwritable directory is a RunError (exit status 2); earlier checkpoints stay intact.
        """
        p = self.parallel
        path = self.path(state.step)
        if not (self._saved_step == state.step and dist.broadcast(p, path.is_dir())):
            self._write(model, optimizer, state, path, keep={path} if best else set())
        self._saved_step = state.step
        if best:
            self.best = path
        return path

    def _write(self, model, optimizer, state: ckpt.TrainerState, path: Path, keep: set[Path]) -> None:
        p = self.parallel
        tensors = optimizer_state = tmp = None
        rngs = dist.all_gather(p, ckpt.rng_state())
        try:
            if p.fsdp:  # each rank writes its own shards into rank 0's temporary directory
                tmp = dist.broadcast(p, ckpt.temp_dir(self.root, state.step))
                if p.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                dist.barrier(p)
                ckpt.save_sharded(model, optimizer, tmp / ckpt.SHARDED)
                dist.barrier(p)
            elif p.is_main:
                tensors, optimizer_state = ckpt.trainable_state(model), optimizer.state_dict()
            if p.is_main:
                ckpt.save_checkpoint(self.root, tensors, optimizer_state, state, self.config, rngs, tmp)
                ckpt.prune(self.root, self.keep_last, keep | ({self.best} if self.best else set()))
        except OSError as err:  # full disk, read-only or vanished directory: earlier checkpoints are untouched
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise RunError(f"cannot write checkpoint {path.name} in {path.parent} ({err.strerror or err}); "
                           f"earlier checkpoints are intact: free space and rerun with --resume") from None
        dist.barrier(p)

    def resume(self, chosen: str, model: nn.Module,
               optimizer: torch.optim.Optimizer) -> tuple[ckpt.TrainerState, Path] | None:
        """Load checkpoint `chosen` ("latest": the newest complete one) into model and optimizer; return
        (its trainer state, its path), or None when there is none yet. Every rank resumes from rank 0's choice."""
        p = self.parallel
        if p.is_main:
            ckpt.remove_partial(self.root)
        path = dist.broadcast(p, Path(chosen) if chosen != "latest" else self.latest())
        if path is None:
            return None
        if not (path / "state.json").is_file():
            raise RunError(f"--resume {path}: not a complete checkpoint (no state.json)")
        state, tensors, optimizer_state = ckpt.read_checkpoint(path, p.rank, p.world_size, p.fsdp)
        if p.fsdp:
            ckpt.load_sharded(model, optimizer, path / ckpt.SHARDED)
        else:
            ckpt.load_trainable_state(model, tensors, path)
            optimizer.load_state_dict(optimizer_state)
        if state.best_step is not None:
            self.best = self.path(state.best_step)
        return state, path

    def restore_best(self, model: nn.Module) -> None:
        """Put the best checkpoint's trainable tensors back into the model (nothing when there is none)."""
        best = self.best
        if best is None or not best.is_dir():
            return
        if self.parallel.fsdp:
            ckpt.load_sharded(model, None, best / ckpt.SHARDED)
        else:
            ckpt.load_trainable_state(model, load_file(str(best / "trainable.safetensors")), best)
