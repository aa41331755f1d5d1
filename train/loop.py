"""The optimizer step, written out: autocast forward, chunked loss, backward, accumulate, clip, step.

Gradient accumulation divides each micro-batch's summed loss by the number of target tokens in
the whole accumulated batch, so k micro-batches give exactly the gradient of one batch k times
larger, even when the micro-batches hold different numbers of target tokens. Across processes
(train.distributed) the count is all-reduced first, so the same holds for the global batch.
"""
from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from quant import QuantizedHead
from quant.backend import import_bitsandbytes
from train.data import PLACEHOLDER, count_target_tokens
from train.distributed import Parallel, all_reduce_sum, gradient_sync, to_float
from train.errors import RunError
from train.loss import causal_lm_loss_sum

SINGLE = Parallel()  # one process: no collectives


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the accumulated batch
    tokens: int  # target tokens in the accumulated batch (those that carry loss)
    grad_norm: float  # total gradient norm before clipping
    skipped: bool  # the loss or gradient was not finite, so no update was made
    input_tokens: int = 0  # every real (non-padding) token the forward passes processed, all ranks


def pick_device_and_dtype(name: str, device: torch.device | None = None) -> tuple[torch.device, torch.dtype | None]:
    """`device`, else cuda if present, else cpu; `auto` means bf16 autocast wherever the hardware has bf16 units."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "float16":
        raise RunError("--dtype float16 training needs loss scaling, which this trainer does not do: use bfloat16")
    if name != "auto":
        return device, None if name == "float32" else torch.bfloat16
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return device, torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on `device`, or nothing for float32 compute."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (not norms, biases, vectors)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    bnb = import_bitsandbytes()
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, lr=lr)
    if name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: choose adamw, adamw8bit or paged_adamw8bit")


def forward_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                     forward: nn.Module | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of one micro-batch and its target count.

    forward: the module the forward pass goes through when it is not `model` itself (DDP's wrapper).
    Right-padded rows need no attention mask: a real token only attends to earlier positions,
    which are all real, so plain causal attention (the fast SDPA path) is exact for them.
    """
    hidden = (forward or model)(
        batch["input_ids"],
        position_ids=batch.get("position_ids"),
        doc_ids=batch.get("doc_ids"),
        return_hidden=True,
    )
    head = model.lm_head
    # a 4-bit head has no dense weight: the loss reads it by slices
    return causal_lm_loss_sum(hidden, head if isinstance(head, QuantizedHead) else head.weight, batch["labels"])


def _on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's inputs of `batch` on `device` (the PLACEHOLDER mark stays behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != PLACEHOLDER}


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    parallel: Parallel = SINGLE,
    forward: nn.Module | None = None,
) -> tuple[float, int]:
    """Backward over the micro-batches with the loss normalised by their total target count.

    With several processes the count is the global one (all ranks' micro-batches), and each rank's
    loss is scaled by world_size to undo the gradient averaging of DDP / FSDP2; gradients are
    synchronised only after the last micro-batch. `forward` is the wrapped module (DDP) if any.
    Returns (mean loss per target token, target tokens), both global; gradients are left in `.grad`.
    """
    local_tokens = sum(count_target_tokens(mb) for mb in micro_batches)
    total_tokens = int(all_reduce_sum(parallel, [local_tokens], device)[0])
    if total_tokens == 0:
        return float("nan"), 0
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        weight = 0 if PLACEHOLDER in mb else parallel.world_size  # a placeholder only keeps collectives in step
        mb = _on_device(mb, device)
        with gradient_sync(forward or model, parallel, sync=i == len(micro_batches) - 1):
            with autocast_context(device, autocast_dtype):
                summed, _ = forward_loss_sum(model, mb, forward)
            (summed * weight / total_tokens).backward()
        loss_sum += float(summed.detach()) if weight else 0.0
    loss_sum = all_reduce_sum(parallel, [loss_sum], device)[0]
    return loss_sum / total_tokens, total_tokens


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    max_grad_norm: float | None,
    parallel: Parallel = SINGLE,
    forward: nn.Module | None = None,
) -> StepResult:
    """One optimizer step over `micro_batches` (the accumulation window; this rank's share of it).

    A non-finite loss or gradient norm skips the update (gradients dropped)
    and says so in the result, so one bad batch cannot poison the weights. Loss and gradient norm
    are global, so every rank takes the same decision.
    """
    loss, tokens = accumulate_gradients(model, micro_batches, device, autocast_dtype, parallel, forward)
    real = sum(real_tokens(mb) for mb in micro_batches if PLACEHOLDER not in mb)
    input_tokens = int(all_reduce_sum(parallel, [real], device)[0])
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    clip = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
    grad_norm = to_float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else 0.0
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    scheduler.step()  # the schedule follows the step count, skipped or not, so a resume lands on it exactly
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=skipped, input_tokens=input_tokens)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens of a batch: its attention mask's ones, or every token when it has none."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    parallel: Parallel = SINGLE,
) -> float:
    """Mean loss per target token over all validation batches (of all ranks: each passes its share)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        placeholder = PLACEHOLDER in batch
        batch = _on_device(batch, device)
        with autocast_context(device, autocast_dtype):
            summed, n = forward_loss_sum(model, batch)
        if not placeholder:
            total, count = total + float(summed), count + n
    model.train(was_training)
    total, count = all_reduce_sum(parallel, [total, count], device)
    return total / max(count, 1)
