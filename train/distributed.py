"""Training on several processes started by torchrun: DDP (replicated weights) or FSDP2 (sharded).

    torchrun --nproc_per_node 4 -m train.run --method lora ...          # DDP
    torchrun --nproc_per_node 4 -m train.run --method full --fsdp ...   # FSDP2

Every process (rank) holds the same model and optimizer (DDP) or a 1/world slice of every parameter
and of the trainable ones' gradients and optimizer state (FSDP2, `torch.distributed.fsdp.fully_shard`
per decoder block and once at the root). A step's micro-batches are cut from one global batch of
batch_size x world_size rows, each rank taking its share, and every rank divides its summed loss by
the target tokens of the whole global window (all-reduced before the forward pass). DDP and FSDP2
average gradients over ranks, so the loss is also multiplied by world_size: the update is then the
one a single process would make on the global batch, however the rows are split.

With one process (no torchrun) `Parallel()` is a no-op and nothing here talks to another process.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from models.checkpoint import Loaded, materialize_buffers
from train.errors import RunError


@dataclass(frozen=True)
class Parallel:
    """Where this process stands among the processes of one run."""

    rank: int = 0  # this process, 0..world_size-1
    world_size: int = 1
    local_rank: int = 0  # this process on its machine: picks the GPU
    fsdp: bool = False  # shard parameters, gradients and optimizer state (else DDP)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and saves the result."""
        return self.rank == 0

    @property
    def mode(self) -> str:
        return "single" if not self.enabled else "fsdp" if self.fsdp else "ddp"


def from_env(fsdp: bool = False) -> Parallel:
    """The process layout torchrun put in the environment (RANK, WORLD_SIZE, LOCAL_RANK); RunError when
    --fsdp (`fsdp`) asks for shards without torchrun, or a node starts more processes than it has GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if fsdp:
            raise RunError("--fsdp shards over several processes: start the run with torchrun --nproc_per_node N")
        return Parallel(fsdp=False)
    p = Parallel(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), fsdp)
    if torch.cuda.is_available() and p.local_rank >= torch.cuda.device_count():
        raise RunError(f"local rank {p.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                       "start at most one process per GPU (torchrun --nproc_per_node)")
    return p


def start(p: Parallel) -> torch.device:
    """Join the process group (nccl on GPUs, gloo on CPUs) and return this rank's device."""
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", p.local_rank)
        torch.cuda.set_device(device)
    if p.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave(p: Parallel, finished: bool, status: int) -> NoReturn:
    """End this rank's process with `status`, everything it wrote flushed. After a run that `finished` on
    every rank, first wait for all of them, so that none exits while rank 0 still gathers or writes.

    The process ends with os._exit, without destroying the process group or running interpreter
    teardown: on a loaded machine gloo's worker threads, torn down there while a peer is still
    connected, now and then abort the process ("terminate called without an active exception",
    SIGABRT) after all its work was done and written, and torchrun then reports the whole job failed."""
    if finished and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier(p: Parallel) -> None:
    if p.enabled:
        dist.barrier()


def all_reduce_sum(p: Parallel, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over ranks (float64, so token counts stay exact)."""
    if not p.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(p: Parallel, flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any of them (one all-reduce; none with one process)."""
    return flag if not p.enabled else all_reduce_sum(p, [float(flag)], device)[0] > 0


def all_gather(p: Parallel, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not p.enabled:
        return [obj]
    out: list[Any] = [None] * p.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(p: Parallel, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not p.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- wrapping ----------------------------------------------------------------------------------------
def load_and_wrap(build: Callable[[torch.device], Loaded], p: Parallel, device: torch.device) -> tuple[Loaded, nn.Module]:
    """The model `build(device)` makes, and what the forward pass goes through (see `wrap`).

    FSDP2: a meta-device skeleton on every rank; rank 0 alone also builds it on the CPU with its weights,
    whose state dict `wrap` sends each rank's shards of.
    """
    if not p.fsdp:
        loaded = build(device)
        return loaded, wrap(loaded.model, p, device)
    loaded = build(torch.device("meta"))
    full = build(torch.device("cpu")).model.state_dict() if p.is_main else None
    return loaded, wrap(loaded.model, p, device, full)


def wrap(model: nn.Module, p: Parallel, device: torch.device,
         full_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The module the training forward goes through: DDP(model), or `model` itself after fully_shard.

    FSDP2: `model` is a meta-device skeleton on every rank and `full_state` its whole state dict on
    rank 0 (CPU), None elsewhere: after sharding, each rank allocates only its shards on `device` and
    rank 0 broadcasts the values tensor by tensor, so one copy of the model is ever read into memory.
    The loss reads `model.lm_head.weight` outside the forward call; both engines allow that because
    they hook gradients on the parameters themselves (DDP's reducer; FSDP2 keeps the root's
    parameters unsharded from forward until its post-backward callback).
    """
    if not p.enabled:
        return model
    if p.fsdp:
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device=device)
        materialize_buffers(model, device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state if p.is_main else {}, options=options)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, p: Parallel, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for a micro-batch that is not the window's last."""
    if not p.enabled or sync:
        yield
    elif p.fsdp:
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with module.no_sync():
            yield


def to_float(t: torch.Tensor) -> float:
    """A scalar tensor as a float, also when it is a replicated DTensor (FSDP2's clip_grad_norm_)."""
    return float(t.full_tensor() if isinstance(t, DTensor) else t)
