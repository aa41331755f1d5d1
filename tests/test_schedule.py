"""train.schedule against transformers' schedulers (test-only reference), step by step."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import optimization

from train.schedule import build_scheduler, lr_at, lr_lambda, total_steps_for, warmup_steps_for

HF = {
    "cosine": lambda opt, w, t: optimization.get_cosine_schedule_with_warmup(opt, w, t),
    "linear": lambda opt, w, t: optimization.get_linear_schedule_with_warmup(opt, w, t),
    "constant": lambda opt, w, t: optimization.get_constant_schedule_with_warmup(opt, w),
}


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("schedule", list(HF))
@pytest.mark.parametrize("total,warmup", [(100, 10), (37, 0), (10, 10), (5, 8), (1, 0)])
def test_multipliers_equal_transformers(schedule, total, warmup):
    ref = HF[schedule](_optimizer(), warmup, total).lr_lambdas[0]
    ours = lr_lambda(total, schedule, warmup)
    for step in range(total + 3):  # a few steps past the end too
        assert ours(step) == pytest.approx(ref(step), abs=1e-12), (schedule, step)


@pytest.mark.parametrize("schedule", list(HF))
def test_scheduler_lrs_equal_transformers_while_stepping(schedule):
    base_lr, total, warmup = 3e-4, 50, 7
    opt_ref, opt_ours = _optimizer(base_lr), _optimizer(base_lr)
    ref, ours = HF[schedule](opt_ref, warmup, total), build_scheduler(opt_ours, total, schedule, warmup)
    for step in range(total):
        lr = opt_ours.param_groups[0]["lr"]
        assert lr == pytest.approx(opt_ref.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        assert lr == pytest.approx(lr_at(step, total, base_lr, schedule, warmup), rel=1e-12, abs=1e-18)
        opt_ref.step(), opt_ours.step()
        ref.step(), ours.step()


def test_fixed_values():
    # cosine, 100 steps, 10 warmup: step 5 is half way up; step 55 is half way down (cos(pi/2) = 0).
    assert lr_at(0, 100, 2e-4, "cosine", 10) == 0.0
    assert lr_at(5, 100, 2e-4, "cosine", 10) == pytest.approx(1e-4)
    assert lr_at(10, 100, 2e-4, "cosine", 10) == pytest.approx(2e-4)
    assert lr_at(55, 100, 2e-4, "cosine", 10) == pytest.approx(1e-4)
    assert lr_at(100, 100, 2e-4, "cosine", 10) == pytest.approx(0.0, abs=1e-20)
    assert lr_at(55, 100, 2e-4, "linear", 10) == pytest.approx(1e-4)
    assert lr_at(99, 100, 2e-4, "constant", 10) == 2e-4


def test_scheduler_state_resumes():
    opt = _optimizer(1.0)
    sched = build_scheduler(opt, 20, "cosine", 4)
    for _ in range(9):
        opt.step(), sched.step()
    state = sched.state_dict()
    opt2 = _optimizer(1.0)
    sched2 = build_scheduler(opt2, 20, "cosine", 4)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_warmup_and_total_steps():
    assert warmup_steps_for(95, warmup_ratio=0.1) == 10  # ceil(9.5), as TrainingArguments.get_warmup_steps
    assert warmup_steps_for(100, warmup_ratio=0.1) == 10
    assert warmup_steps_for(100, warmup_ratio=0.1, warmup_steps=3) == 3
    assert warmup_steps_for(100, warmup_ratio=0.0) == 0
    assert total_steps_for(steps_per_epoch=13, epochs=3) == 39
    assert total_steps_for(steps_per_epoch=13, epochs=3, max_steps=5) == 5


def test_unknown_schedule_fails_at_build_time():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_lambda(10, "exponential", 0)
    assert math.isclose(lr_at(3, 10, 1.0, "linear", 0), 0.7)
