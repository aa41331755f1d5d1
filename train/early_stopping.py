"""Stopping rules fed one evaluation at a time; both save and restore their state for resume.

EarlyStopping reproduces transformers' EarlyStoppingCallback together with the Trainer's best-metric
bookkeeping (transformers/trainer_callback.py, Trainer._determine_best_metric):

- an evaluation *resets* patience only if it beats the best so far by more than `threshold`
  (absolute, not relative): `better(value, best) and abs(value - best) > threshold`;
  the first evaluation always resets;
- otherwise the counter goes up, and training stops once counter >= patience;
- the best value is updated on *any* strict improvement, threshold or not (the Trainer updates
  `state.best_metric` after the callback has looked at it). So with threshold 0.01, losses
  1.0, 0.994, 0.988 count two non-improvements: 0.988 is compared with 0.994, not with 1.0.

OverfitDetector is the seed chapter's rule: warn when val - train loss exceeds `gap`; stop after
`patience` evaluations in a row whose val loss is above the best val loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.errors import DivergedError


class EarlyStopping:
    """Stop when the metric has not improved by more than `threshold` for `patience` evaluations."""

    def __init__(self, patience: int, threshold: float = 0.0, greater_is_better: bool = False) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.patience = patience
        self.threshold = threshold
        self.greater_is_better = greater_is_better
        self.best: float | None = None  # best value seen (strictly better updates it)
        self.counter = 0  # evaluations since the last one that improved by more than threshold
        self.is_best = False  # whether the last value was a new best (use it to keep a "best" checkpoint)

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.greater_is_better else a < b

    def step(self, value: float) -> bool:
        """Record one evaluation (e.g. val loss); return True when training should stop."""
        value = float(value)
        if self.best is None or (self._better(value, self.best) and abs(value - self.best) > self.threshold):
            self.counter = 0
        else:
            self.counter += 1
        self.is_best = self.best is None or self._better(value, self.best)
        if self.is_best:
            self.best = value
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.counter >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"patience": self.patience, "threshold": self.threshold,
                "greater_is_better": self.greater_is_better,
                "best": self.best, "counter": self.counter, "is_best": self.is_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters. Settings come from the current config, so a resumed run may change them."""
        self.best, self.counter, self.is_best = state["best"], state["counter"], state["is_best"]


@dataclass(frozen=True)
class OverfitReport:
    """What OverfitDetector.check saw. gap = val_loss - train_loss (nats)."""

    overfit_warning: bool
    should_stop: bool
    gap: float
    counter: int  # consecutive evaluations with val loss above the best


class OverfitDetector:
    """The seed chapter's detector: train/val gap warning plus patience on a rising val loss.

    patience 0 keeps the warnings and never asks to stop.
    """

    def __init__(self, patience: int = 3, gap: float = 0.5) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = patience
        self.gap = gap
        self.best_val_loss = float("inf")
        self.counter = 0

    def check(self, train_loss: float, val_loss: float) -> OverfitReport:
        """Feed one evaluation. `train_loss` should be the mean over the steps since the last eval."""
        gap = val_loss - train_loss
        if val_loss > self.best_val_loss:
            self.counter += 1
        else:  # ties count as "not rising", as in the seed
            self.best_val_loss = val_loss
            self.counter = 0
        return OverfitReport(gap > self.gap, 0 < self.patience <= self.counter, gap, self.counter)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (no best yet is stored as None, not inf)."""
        best = None if self.best_val_loss == float("inf") else self.best_val_loss
        return {"patience": self.patience, "gap": self.gap, "best_val_loss": best, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state["best_val_loss"]
        self.best_val_loss = float("inf") if best is None else float(best)
        self.counter = int(state["counter"])


def stopping_decision(early: EarlyStopping | None, overfit: OverfitDetector, train_loss: float, val_loss: float,
                      step: int) -> tuple[dict[str, Any], list[str], bool]:
    """Feed one evaluation to both rules: (metrics to log with it, messages for the user, stop now).

    train_loss: the mean since the last evaluation (NaN when there was none: the gap is not judged).
    """
    metrics: dict[str, Any] = {}
    messages: list[str] = []
    stop = False
    report = overfit.check(train_loss, val_loss) if math.isfinite(train_loss) else None
    if report is not None:
        metrics.update(train_val_gap=report.gap, overfit_warning=report.overfit_warning)
        if report.overfit_warning:
            messages.append(f"step {step}: val loss exceeds train loss by {report.gap:.2f} nats: the model may be overfitting")
        if report.should_stop:
            messages.append(f"step {step}: val loss rose {report.counter} evaluations in a row: stopping (overfitting)")
            stop = True
    if early and early.step(val_loss):
        messages.append(f"step {step}: no val-loss improvement above {early.threshold} in {early.patience} "
                        "evaluations: stopping early")
        stop = True
    return metrics, messages, stop


def restore_stopping_rules(early: EarlyStopping | None, overfit: OverfitDetector, state) -> None:
    """Both rules as a checkpoint's trainer state (train.checkpoint.TrainerState) left them."""
    if early and state.early_stopping:
        early.load_state_dict(state.early_stopping)
    if state.overfit:
        overfit.load_state_dict(state.overfit)


def diverged(limit: int, step: int, last_checkpoint: Path | None) -> DivergedError:
    """The error that stops a run after `limit` non-finite steps in a row (the bad streak is not checkpointed)."""
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    return DivergedError(f"{limit} steps in a row had a non-finite loss or gradient (last: step {step}); "
                         f"stopping: {where}. Lower --lr, check the data, or raise --max-skipped-steps")
