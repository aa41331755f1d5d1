"""`python -m train.run`: fine-tune a decoder with full fine-tuning, LoRA, QLoRA, prefix or prompt tuning.

    python -m train.run --method lora --model Qwen/Qwen2.5-0.5B --data train.jsonl --val-fraction 0.05
    torchrun --nproc_per_node 4 -m train.run --method full --fsdp ...   # several processes (train.distributed)
    python -m demo                                                     # the built-in example (demo/)

Three plain steps, each a function below: setup (config, model, data, optimizer, resume) -> fit (the
loop: step, log, evaluate, checkpoint, stop early) -> finish (restore the best checkpoint, write the
product, the loss curve and a summary). What each method does is train.methods; checkpoints are
train.checkpointer; the run directory is train.outputs. Bad input ends the run with one line on stderr
and exit status 2, before anything in the output directory is touched; a full disk or unwritable
directory is also exit status 2 in one line (earlier checkpoints intact); --max-skipped-steps
non-finite steps in a row stop the run with exit status 3.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora.inject import trainable_report
from models.checkpoint import Loaded
from models.hub import CheckpointError
from models.tokenizer import load_tokenizer
from train import distributed as dist
from train import memory, outputs
from train.checkpoint import TrainerState
from train.checkpointer import Checkpointer
from train.config import TrainConfig, parse_args
from train.data import Datasets, load_datasets
from train.distributed import Parallel
from train.early_stopping import EarlyStopping, OverfitDetector, diverged, restore_stopping_rules, stopping_decision
from train.errors import ConfigError, DivergedError, RunError, exit_status
from train.evaluate import evaluate
from train.loader import StepLoader, eval_batches
from train.loop import SINGLE, build_optimizer, pick_device_and_dtype, seed_everything, train_step
from train.preemption import Preempted, Preemption
from train.progress import Progress
from train.records import DataError
from train.schedule import build_scheduler, restore_scheduler, total_steps_for, warmup_steps_for
from train.tracking import Trackers


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    amp_dtype: torch.dtype | None  # bf16 autocast, or None for float32
    tokenizer: object
    data: Datasets
    loaded: Loaded  # the model (sharded under FSDP2), where it came from and how its base is held
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: StepLoader
    total_steps: int
    checkpointer: Checkpointer
    metrics: outputs.MetricsLog
    early: EarlyStopping | None
    overfit: OverfitDetector
    val_batches: list = field(default_factory=list)
    state: TrainerState = field(default_factory=TrainerState)
    parallel: Parallel = SINGLE
    forward: torch.nn.Module | None = None  # what the training forward goes through: DDP's wrapper, else the model
    progress: Progress | None = None  # while fit runs
    trackers: Trackers | None = None  # rank 0's TensorBoard / W&B (train.tracking)
    started: float = field(default_factory=time.perf_counter)  # when setup began (wall time)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def say(self, message: str) -> None:
        """A line for the user, from rank 0 only (beside the bar, or plain without a terminal)."""
        if self.progress:
            self.progress.say(message)
        elif self.parallel.is_main:
            print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, parallel: Parallel = SINGLE, device: torch.device | None = None) -> Run:
    seed_everything(cfg.run.seed)  # the same on every rank: same initial adapters, same val split
    device, amp_dtype = pick_device_and_dtype(cfg.run.dtype, device)
    memory.check_run(cfg, device, amp_dtype, parallel.fsdp)
    out = outputs.prepare_output_dir(cfg)
    tokenizer = load_tokenizer(cfg.run.model)
    data = load_datasets(cfg.data, tokenizer, cfg.run.seed)
    compute = amp_dtype or torch.float32
    loaded, forward = dist.load_and_wrap(lambda on: cfg.method.build(cfg, cfg.run.model, on, compute), parallel, device)
    optimizer = build_optimizer(loaded.model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.optim)  # after sharding
    loader = StepLoader(data.train, cfg.data.batch_size, tokenizer.pad_id, cfg.optim.grad_accum, cfg.run.seed,
                        rank=parallel.rank, world_size=parallel.world_size)
    total = total_steps_for(loader.steps_per_epoch, cfg.optim.epochs, cfg.optim.max_steps)
    scheduler = build_scheduler(optimizer, total, cfg.optim.schedule,
                                warmup_steps_for(total, cfg.optim.warmup_ratio, cfg.optim.warmup_steps))
    e = cfg.eval
    early = EarlyStopping(e.early_stopping_patience, e.early_stopping_threshold) if e.early_stopping_patience else None
    val = eval_batches(data.val, cfg.data.batch_size, tokenizer.pad_id, parallel.rank, parallel.world_size) if data.val else []
    checkpointer = Checkpointer(out / "checkpoints", parallel, cfg.checkpoint.keep_last, cfg.to_dict())
    run = Run(cfg, out, device, amp_dtype, tokenizer, data, loaded, optimizer, scheduler, loader, total,
              checkpointer, outputs.MetricsLog(out / "metrics.jsonl"), early, OverfitDetector(e.overfit_patience, e.overfit_gap),
              val, TrainerState(world_size=parallel.world_size, fsdp=parallel.fsdp), parallel, forward)
    if parallel.enabled:
        seed_everything(cfg.run.seed + parallel.rank)  # from here on each rank draws its own dropout masks
    if parallel.is_main:
        outputs.make_output_dir(cfg, out)
        run.trackers = Trackers(cfg.run.report_to, out, cfg.to_dict(), run.say)
    dist.barrier(parallel)
    if cfg.run.resume is not None:
        resume(run)
    if parallel.is_main:
        (out / "config.json").write_text(cfg.to_json())
    return run


def resume(run: Run) -> None:
    """Continue from the newest complete checkpoint (or `--resume DIR`); none yet: start afresh."""
    found = run.checkpointer.resume(run.cfg.run.resume, run.model, run.optimizer)
    main = run.parallel.is_main
    if found is None:
        if main:
            print(f"resume: no complete checkpoint in {run.checkpointer.root}; starting from the beginning", file=sys.stderr)
            run.metrics.truncate(-1)  # the killed run's step-0 evaluation is redone
        return
    run.state = state = found[0]
    restore_scheduler(run.scheduler, state.scheduler, state.step)
    run.loader.load_state_dict(state.data)
    restore_stopping_rules(run.early, run.overfit, state)
    if main:
        run.metrics.truncate(state.step)
        print(f"resume: continuing from {found[1]} (step {state.step} of {run.total_steps})", file=sys.stderr)


# ------------------------------------------------------------------------------------------ fit
def log(run: Run, record: dict) -> None:
    if run.parallel.is_main:
        run.metrics.append(record)
        run.trackers.log(record)


def save(run: Run, best: bool = False) -> Path:
    """Checkpoint the current step with everything a resume needs besides the tensors."""
    s = run.state
    s.data, s.overfit, s.scheduler = run.loader.state_dict(), run.overfit.state_dict(), run.scheduler.state_dict()
    s.early_stopping = run.early.state_dict() if run.early else {}
    return run.checkpointer.save(run.model, run.optimizer, s, best)


def run_eval(run: Run, recent_train_loss: float) -> tuple[dict, bool]:
    """Evaluate, keep the best checkpoint, consult early stopping; return (metrics, stop)."""
    metrics = evaluate(run.model, run.val_batches, run.data.val_records, run.tokenizer, run.cfg.eval.task,
                       run.device, run.amp_dtype, parallel=run.parallel)
    metrics = dist.broadcast(run.parallel, metrics)  # every rank takes rank 0's stopping decisions
    step, val = run.state.step, metrics["val_loss"]
    extra, messages, stop = stopping_decision(run.early, run.overfit, recent_train_loss, val, step)
    metrics.update(extra)
    for message in messages:
        run.say(message)
    run.state.stopped = stop
    # Log, then checkpoint: a checkpoint of step N must already hold this evaluation (log line,
    # early-stopping count, stop flag), or a run resumed from it would never see it.
    log(run, {"step": step, **metrics})
    if run.progress:
        run.progress.evaluation(step, metrics)
    if run.state.best_val_loss is None or val < run.state.best_val_loss:
        run.state.best_val_loss, run.state.best_step = val, step
        run.state.best_metrics = {k: v for k, v in metrics.items() if k not in ("val_loss", "overfit_warning")}
        save(run, best=True)
    return metrics, stop


def fit(run: Run) -> None:
    """Steps until the last (or a stopping rule, or a signal: train.preemption), evaluating and checkpointing."""
    cfg, s = run.cfg, run.state
    run.progress = progress = Progress(run.total_steps, s.step, cfg.run.method, run.parallel.is_main, cfg.run.log_every)
    window = s.recent_losses  # in the trainer state, so a resume sees the same train/val gap
    started = time.perf_counter() - s.elapsed_s
    stop = s.stopped
    with Preemption() as preemption:
        while s.step < run.total_steps and not stop:
            t0 = time.perf_counter()
            result = train_step(run.model, run.optimizer, run.scheduler, run.loader.next_step(), run.device,
                                run.amp_dtype, cfg.optim.max_grad_norm, run.parallel, run.forward)
            seconds = max(time.perf_counter() - t0, 1e-9)
            s.step += 1
            s.tokens_seen += result.tokens
            s.input_tokens_seen += result.input_tokens
            s.elapsed_s = time.perf_counter() - started
            s.skipped_steps += result.skipped
            s.skipped_in_a_row = s.skipped_in_a_row + 1 if result.skipped else 0
            if result.skipped:
                run.say(f"step {s.step}: non-finite loss or gradient, update skipped")
            else:
                window.append(result.loss)
            lr = run.optimizer.param_groups[0]["lr"]
            log(run, {"step": s.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                      "tokens": result.tokens, "tokens_per_s": result.tokens / seconds,  # target tokens: loss-carrying
                      "input_tokens": result.input_tokens, "input_tokens_per_s": result.input_tokens / seconds,
                      "skipped": result.skipped})
            progress.step(s.step, result.loss, lr, result.grad_norm, result.input_tokens / seconds,
                          result.tokens / seconds, s.elapsed_s)
            if s.skipped_in_a_row >= cfg.optim.max_skipped_steps:
                raise diverged(cfg.optim.max_skipped_steps, s.step, run.checkpointer.latest())
            if run.val_batches and (s.step == run.total_steps or (cfg.eval.eval_every and s.step % cfg.eval.eval_every == 0)):
                recent = sum(window) / len(window) if window else float("nan")
                window.clear()  # before run_eval, whose checkpoint must hold the emptied window
                stop = run_eval(run, recent)[1]
            if cfg.checkpoint.save_every and s.step % cfg.checkpoint.save_every == 0:
                save(run)
            if dist.any_rank(run.parallel, preemption.signum is not None, run.device):
                save(run)
                raise Preempted(preemption.signum or 15, s.step)  # every rank stops; rank 0 names the signal
    progress.close()
    save(run)


# --------------------------------------------------------------------------------------- finish
def finish(run: Run) -> dict:
    run.checkpointer.restore_best(run.model)
    product = outputs.save_product(run.cfg.method, run.loaded, run.cfg, run.out, run.parallel, run.checkpointer.best,
                                   run.amp_dtype or torch.float32)
    summary = outputs.summary(run.cfg.run.method, run.state, run.device, run.parallel, product,
                              time.perf_counter() - run.started)
    if run.parallel.is_main:
        outputs.write_summary(run.out, summary)
        run.trackers.close()
    return summary


def train(cfg: TrainConfig, samples: bool = True, parallel: Parallel = SINGLE, device: torch.device | None = None) -> dict:
    """Run a whole fine-tuning job as `cfg` says; return the summary.

    samples: print a few generations on validation prompts before and after training.
    parallel, device: this process's place in a torchrun job (train.distributed); default one process.
    """
    run = setup(cfg, parallel, device)
    if parallel.is_main:
        report = trainable_report(run.model) if run.cfg.method.product == "adapter" and not parallel.fsdp else None
        outputs.print_start(cfg, run.device, run.amp_dtype, run.total_steps, parallel, run.data.summary(), report)
    if run.state.step == 0:
        if samples:
            outputs.show_samples("Before fine-tuning:", run.model, run.data, run.tokenizer, run.device, run.amp_dtype,
                                 run.parallel.is_main)
        if run.val_batches:
            first = evaluate(run.model, run.val_batches, [], run.tokenizer, "lm", run.device, run.amp_dtype, parallel=parallel)
            run.state.first_val_loss = first["val_loss"]  # in the trainer state: a resumed run reports it too
            log(run, {"step": 0, **first})
    fit(run)
    summary = finish(run)
    if samples:
        outputs.show_samples("After fine-tuning (best checkpoint):", run.model, run.data, run.tokenizer, run.device,
                             run.amp_dtype, run.parallel.is_main)
    return summary


def main(argv: list[str] | None = None, prepare: Callable[[TrainConfig, Parallel], None] | None = None) -> int:
    """The command line; `prepare(cfg, parallel)` may fill in settings after parsing (python -m demo does).
    A rank of a torchrun job ends its process here (train.distributed.leave) instead of returning."""
    outcome = Outcome()
    status = _main(argv, prepare, outcome)
    if outcome.parallel.enabled:
        dist.leave(outcome.parallel, outcome.finished, status)
    return status


@dataclass
class Outcome:
    """What `main` needs to know after `_main`: this process's place in the job, and whether the run
    finished (every rank stopped at the same point: done, or pre-empted)."""

    parallel: Parallel = SINGLE
    finished: bool = False


def _main(argv: list[str] | None, prepare: Callable[[TrainConfig, Parallel], None] | None, outcome: Outcome) -> int:
    """Parse, train, and map a failure to its exit status, filling in `outcome` on the way."""
    parallel = SINGLE
    try:
        cfg = parse_args(argv)
        outcome.parallel = parallel = dist.from_env(cfg.run.fsdp)
        device = dist.start(parallel)
        if prepare is not None:
            prepare(cfg, parallel)
        train(cfg, parallel=parallel, device=device)
        outcome.finished = True
    except (ConfigError, DataError, CheckpointError, RunError, DivergedError, OSError) as err:
        status, message = exit_status(err, parallel.rank if parallel.enabled else None)
        if status is None:  # an OSError the user cannot fix from outside: a bug to see whole
            raise
        if message:
            print(message, file=sys.stderr)
        return status
    except Preempted as stopped:
        outcome.finished = True  # every rank stops at the same step boundary
        if parallel.is_main:
            print(str(stopped), file=sys.stderr)
        return stopped.status
    except KeyboardInterrupt:
        if parallel.is_main:
            print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
