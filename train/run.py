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
from tqdm import tqdm

from lora.inject import trainable_report
from models.checkpoint import Loaded, load_config
from models.hub import CheckpointError
from models.tokenizer import load_tokenizer
from train import distributed as dist
from train import memory, outputs
from train.checkpoint import TrainerState
from train.checkpointer import Checkpointer
from train.config import TrainConfig, parse_args
from train.data import Datasets, load_datasets
from train.distributed import Parallel
from train.early_stopping import EarlyStopping, OverfitDetector, stopping_decision
from train.errors import ConfigError, DivergedError, RunError, exit_status
from train.evaluate import evaluate, sample_generations
from train.loader import StepLoader, eval_batches
from train.loop import (
    SINGLE,
    build_optimizer,
    pick_device_and_dtype,
    seed_everything,
    train_step,
)
from train.records import DataError
from train.schedule import (
    build_scheduler,
    restore_scheduler,
    total_steps_for,
    warmup_steps_for,
)


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

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def say(self, message: str) -> None:
        """A line for the user, from rank 0 only (tqdm-safe)."""
        if self.parallel.is_main:
            tqdm.write(message)


# ----------------------------------------------------------------------------------------- setup
def check_inputs(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, parallel: Parallel) -> None:
    """Refuse what cannot work before anything is loaded: no model or data, a window too short, too little memory."""
    if cfg.run.model is None or cfg.data.data is None:
        raise RunError("--model and --data are required (python -m demo runs the built-in example)")
    config = load_config(cfg.run.model)
    if cfg.data.seq_len > config.max_position_embeddings:
        raise RunError(f"--seq-len {cfg.data.seq_len} exceeds the model's window of {config.max_position_embeddings} tokens")
    if not (parallel.fsdp or cfg.run.skip_memory_check):  # the estimate is for one whole replica; FSDP2 holds 1/world
        memory.refuse_if_too_big(config, memory.settings_from(cfg, amp_dtype), cfg.optim.grad_accum, device)


def setup(cfg: TrainConfig, parallel: Parallel = SINGLE, device: torch.device | None = None) -> Run:
    seed_everything(cfg.run.seed)  # the same on every rank: same initial adapters, same val split
    device, amp_dtype = pick_device_and_dtype(cfg.run.dtype, device)
    check_inputs(cfg, device, amp_dtype, parallel)
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
    if run.early and state.early_stopping:
        run.early.load_state_dict(state.early_stopping)
    if state.overfit:
        run.overfit.load_state_dict(state.overfit)
    if main:
        run.metrics.truncate(state.step)
        print(f"resume: continuing from {found[1]} (step {state.step} of {run.total_steps})", file=sys.stderr)


# ------------------------------------------------------------------------------------------ fit
def log(run: Run, record: dict) -> None:
    if run.parallel.is_main:
        run.metrics.append(record)


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
    if run.state.best_val_loss is None or val < run.state.best_val_loss:
        run.state.best_val_loss, run.state.best_step = val, step
        save(run, best=True)
    return metrics, stop


def fit(run: Run) -> None:
    cfg, s = run.cfg, run.state
    bar = tqdm(total=run.total_steps, initial=s.step, desc=cfg.run.method, dynamic_ncols=True,
               disable=None if run.parallel.is_main else True)
    window = s.recent_losses  # in the trainer state, so a resume sees the same train/val gap
    started = time.perf_counter() - s.elapsed_s
    stop = s.stopped
    while s.step < run.total_steps and not stop:
        t0 = time.perf_counter()
        result = train_step(run.model, run.optimizer, run.scheduler, run.loader.next_step(), run.device,
                            run.amp_dtype, cfg.optim.max_grad_norm, run.parallel, run.forward)
        s.step += 1
        s.tokens_seen += result.tokens
        s.elapsed_s = time.perf_counter() - started
        tps = result.tokens / max(time.perf_counter() - t0, 1e-9)
        s.skipped_steps += result.skipped
        s.skipped_in_a_row = s.skipped_in_a_row + 1 if result.skipped else 0
        if result.skipped:
            run.say(f"step {s.step}: non-finite loss or gradient, update skipped")
        else:
            window.append(result.loss)
        lr = run.optimizer.param_groups[0]["lr"]
        log(run, {"step": s.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens": result.tokens, "tokens_per_s": tps, "skipped": result.skipped})
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        check_divergence(run)
        if run.val_batches and (s.step == run.total_steps or (cfg.eval.eval_every and s.step % cfg.eval.eval_every == 0)):
            recent = sum(window) / len(window) if window else float("nan")
            window.clear()  # before run_eval, whose checkpoint must hold the emptied window
            metrics, stop = run_eval(run, recent)
            bar.set_postfix(loss=f"{result.loss:.3f}", val=f"{metrics['val_loss']:.3f}", lr=f"{lr:.2e}")
        if cfg.checkpoint.save_every and s.step % cfg.checkpoint.save_every == 0:
            save(run)
    bar.close()
    save(run)


def check_divergence(run: Run) -> None:
    """Stop after --max-skipped-steps non-finite steps in a row, without checkpointing the bad streak."""
    limit = run.cfg.optim.max_skipped_steps
    if run.state.skipped_in_a_row >= limit:
        last = run.checkpointer.latest()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise DivergedError(f"{limit} steps in a row had a non-finite loss or gradient (last: step {run.state.step}); "
                            f"stopping: {where}. Lower --lr, check the data, or raise --max-skipped-steps")


# --------------------------------------------------------------------------------------- finish
def show_samples(run: Run, title: str) -> None:
    """A few greedy generations, printed by rank 0 (every rank generates: a sharded model needs them all)."""
    samples = sample_generations(run.model, run.data, run.tokenizer, run.device, run.amp_dtype)
    if samples and run.parallel.is_main:
        outputs.print_samples(title, *samples)


def finish(run: Run) -> dict:
    run.checkpointer.restore_best(run.model)
    product = outputs.save_product(run.cfg.method, run.loaded, run.cfg, run.out, run.parallel, run.checkpointer.best,
                                   run.amp_dtype or torch.float32)
    summary = outputs.summary(run.cfg.run.method, run.state, run.device, run.parallel, product)
    if run.parallel.is_main:
        outputs.write_summary(run.out, summary)
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
            show_samples(run, "Before fine-tuning:")
        if run.val_batches:
            first = evaluate(run.model, run.val_batches, [], run.tokenizer, "lm", run.device, run.amp_dtype, parallel=parallel)
            run.state.first_val_loss = first["val_loss"]  # in the trainer state: a resumed run reports it too
            log(run, {"step": 0, **first})
    fit(run)
    summary = finish(run)
    if samples:
        show_samples(run, "After fine-tuning (best checkpoint):")
    return summary


def main(argv: list[str] | None = None, prepare: Callable[[TrainConfig, Parallel], None] | None = None) -> int:
    """The command line; `prepare(cfg, parallel)` may fill in settings after parsing (python -m demo does)."""
    parallel = SINGLE
    try:
        cfg = parse_args(argv)
        parallel = dist.from_env(cfg.run.fsdp)
        device = dist.start(parallel)
        if prepare is not None:
            prepare(cfg, parallel)
        train(cfg, parallel=parallel, device=device)
    except (ConfigError, DataError, CheckpointError, RunError, DivergedError, OSError) as err:
        status, message = exit_status(err, parallel.rank if parallel.enabled else None)
        if status is None:  # an OSError the user cannot fix from outside: a bug to see whole
            raise
        if message:
            print(message, file=sys.stderr)
        return status
    except KeyboardInterrupt:
        if parallel.is_main:
            print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    finally:
        dist.stop(parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
