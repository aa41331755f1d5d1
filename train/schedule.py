"""Learning-rate schedules: linear warmup, then cosine / linear decay to 0, or constant.

Values equal transformers' get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup and
get_constant_schedule_with_warmup step for step, including their convention that the lr used by the
optimizer step numbered `step` (0-based) is `base_lr * multiplier(step)`: with warmup the very first
step runs at lr 0. Warmup from a ratio is ceil(ratio * total_steps), as in TrainingArguments.

    warmup = warmup_steps_for(total, ratio=0.1)
    sched = build_scheduler(optimizer, total, "cosine", warmup)   # call sched.step() after optimizer.step()
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps_for(total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int | None = None) -> int:
    """Warmup length in optimizer steps: `warmup_steps` when given, else ceil(ratio * total_steps)."""
    if warmup_steps is not None:
        return int(warmup_steps)
    return math.ceil(total_steps * warmup_ratio)


def total_steps_for(steps_per_epoch: int, epochs: int, max_steps: int | None = None) -> int:
    """Optimizer steps in the run: `max_steps` when given (it wins over epochs, as in HF), else epochs x steps."""
    return int(max_steps) if max_steps is not None else int(epochs) * int(steps_per_epoch)


def lr_multiplier(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Factor in [0, 1] applied to the peak lr at 0-based optimizer step `step`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    # Written as transformers writes them, so the edge cases agree too: max(1, ...) guards warmup >=
    # total, where linear then gives 0 and cosine 1 at step == warmup; max(0, ...) clamps past the end.
    decay_steps = max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / decay_steps)
    progress = (step - warmup_steps) / decay_steps
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int) -> float:
    """The learning rate for 0-based optimizer step `step` of `total_steps`."""
    return base_lr * lr_multiplier(step, total_steps, schedule, warmup_steps)


def lr_lambda(total_steps: int, schedule: str, warmup_steps: int) -> Callable[[int], float]:
    """A `step -> multiplier` function for torch.optim.lr_scheduler.LambdaLR."""
    lr_multiplier(0, total_steps, schedule, warmup_steps)  # fail now on a bad name, not at step 0

    def fn(step: int) -> float:
        return lr_multiplier(step, total_steps, schedule, warmup_steps)

    return fn


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, schedule: str, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every param group (each keeps its own peak lr). Its state_dict() resumes exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, schedule, warmup_steps))


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any], step: int) -> None:
    """Put a fresh scheduler (and its optimizer's lr) where it was after `step` steps.

    state: its state_dict() from a checkpoint; empty for checkpoints that did not save it, whose
    schedule is then replayed step by step (a pure function of the step count, so exact).
    """
    if state:
        scheduler.load_state_dict(state)
    else:
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(step):
                scheduler.step()
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
