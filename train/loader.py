"""The order of training batches: micro-batches per optimizer step, epochs, and each process's share.

Data order is a pure function of (seed, epoch): BatchSampler's state is two integers, so a resumed run
sees exactly the batches an uninterrupted one would have. Under torchrun each rank takes its share of
every global micro-batch (rank_share), and a rank whose share is empty runs a PLACEHOLDER batch with
zero weight, so that every rank makes the same forward/backward calls.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from train.data import PLACEHOLDER, SHUFFLE_STREAM, Example, PackedRow, collate


class BatchSampler:
    """Indices of the micro-batches of each optimizer step, in a (seed, epoch)-determined order.

    An epoch is a permutation of the items cut into micro-batches of `batch_size` (the last may be
    smaller); a step takes the next `grad_accum` of them, except the epoch's last step, which takes
    what is left, so steps never straddle epochs. State = (epoch, index of the next item in the
    epoch's order): restoring it replays the same batches. Because it counts items, not batches,
    batch_size and grad_accum may change across a resume; num_items, seed and shuffle may not.
    """

    def __init__(self, num_items: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if num_items < 1 or batch_size < 1 or grad_accum < 1:
            raise ValueError(f"need num_items, batch_size, grad_accum >= 1, got {num_items}, {batch_size}, {grad_accum}")
        self.num_items, self.batch_size, self.grad_accum = num_items, batch_size, grad_accum
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order) cache

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_items / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.grad_accum)

    def epoch_order(self, epoch: int) -> list[int]:
        """The item order of `epoch`: a permutation seeded by (seed, epoch), or 0..n-1 unshuffled."""
        if not self.shuffle:
            return list(range(self.num_items))
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, SHUFFLE_STREAM, epoch])
            self._order = (epoch, rng.permutation(self.num_items).tolist())
        return self._order[1]

    def next_step(self) -> list[list[int]]:
        """Item indices of the next step's micro-batches (grad_accum of them, fewer at epoch end)."""
        order = self.epoch_order(self.epoch)
        batches = []
        while len(batches) < self.grad_accum and self.index < self.num_items:
            batches.append(order[self.index : self.index + self.batch_size])
            self.index += len(batches[-1])
        if self.index >= self.num_items:
            self.epoch, self.index = self.epoch + 1, 0
        return batches

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; epoch/index are the position, the rest guards against a changed dataset."""
        return {"epoch": self.epoch, "index": self.index, "num_items": self.num_items,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume data order: {key} was {state[key]!r}, now {getattr(self, key)!r} "
                                 "(the resumed run would see different batches)")
        if not 0 <= state["index"] < self.num_items:
            raise ValueError(f"bad data position index={state['index']} for {self.num_items} items")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def placeholder_batch(item: Example | PackedRow, pad_id: int) -> dict[str, torch.Tensor]:
    """A one-row batch marked PLACEHOLDER: run with zero weight by a rank that has no rows of its own there."""
    return {**collate([item], pad_id), PLACEHOLDER: torch.ones(())}


def rank_share(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous part of n items; parts differ by at most one (lower ranks get more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class StepLoader:
    """Collated micro-batches for each optimizer step: `loader.next_step() -> [batch, ...]`.

    Endless (epochs follow each other); the loop decides when to stop, e.g. after
    total_steps_for(loader.steps_per_epoch, epochs, max_steps) steps. Save `state_dict()` with each
    checkpoint and `load_state_dict()` it on resume.

    With world_size > 1 processes, each micro-batch is drawn as one global batch of
    batch_size * world_size items (the same on every rank) and rank r keeps its share, so the union
    over ranks is exactly what one process with that batch size would see. A rank whose share of a
    short last micro-batch is empty gets a PLACEHOLDER batch (zero weight) to keep in step.
    """

    def __init__(self, items: Sequence[Example | PackedRow], batch_size: int, pad_id: int,
                 grad_accum: int = 1, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        self.items, self.pad_id, self.rank, self.world_size = items, pad_id, rank, world_size
        self.sampler = BatchSampler(len(items), batch_size * world_size, grad_accum, seed, shuffle)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next step is drawn from (0-based)."""
        return self.sampler.epoch

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [self._collate_share(batch) for batch in self.sampler.next_step()]

    def _collate_share(self, batch: list[int]) -> dict[str, torch.Tensor]:
        mine = batch[rank_share(len(batch), self.rank, self.world_size)]
        if not mine:
            return placeholder_batch(self.items[batch[0]], self.pad_id)
        return collate([self.items[i] for i in mine], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def eval_batches(items: Sequence[Example | PackedRow], batch_size: int, pad_id: int, rank: int = 0,
                 world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Every item once, in order, collated into batches of `batch_size` (the last may be smaller).

    With world_size > 1: rank `rank`'s share of the items only, padded with PLACEHOLDER batches to
    the same number of batches on every rank (sharded models need every rank in every forward).
    """
    mine = items[rank_share(len(items), rank, world_size)]
    batches = [collate(mine[i : i + batch_size], pad_id) for i in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(len(items) / world_size) / batch_size)
    while len(batches) < most:
        batches.append(placeholder_batch(items[0], pad_id))
    return batches
