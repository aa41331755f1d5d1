"""`python -m train.run`: fine-tune a decoder with full fine-tuning, LoRA or QLoRA.

    python -m train.run --method qlora                      # the built-in demo: tiny model, stdlib docstrings
    python -m train.run --method lora --model Qwen/Qwen2.5-0.5B --data train.jsonl --val-fraction 0.05
    torchrun --nproc_per_node 4 -m train.run --method full --fsdp ...   # several processes (train.distributed)

The run is four plain steps, each a function below: setup (config, data, model, optimizer, resume)
-> fit (the loop: step, log, evaluate, checkpoint, stop early) -> finish (restore the best
checkpoint, write the adapter or model, the loss curve and a summary). Bad input ends the run with
one line on stderr and exit status 2, before anything in the output directory is touched.
A full disk or unwritable directory is also exit status 2 in one line (earlier checkpoints intact);
--max-skipped-steps non-finite steps in a row stop the run with exit status 3.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.config import ModelConfig
from models.hub import CheckpointError, resolve_model_dir
from models.tokenizer import load_tokenizer
from train import checkpoint as ckpt
from train import distributed as dist
from train import memory
from train.config import ConfigError, TrainConfig, parse_args
from train.data import DataError, Datasets, StepLoader, eval_batches, load_datasets
from train.distributed import Parallel
from train.early_stopping import EarlyStopping, OverfitDetector
from train.evaluate import evaluate, generate_references
from train.loop import SINGLE, build_optimizer, train_step
from train.methods import build_model, save_result
from train.schedule import build_scheduler, total_steps_for, warmup_steps_for

# OSErrors the user fixes outside the program (space, permissions, paths), reported in one line.
USER_FIXABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}

OWNED = ("checkpoints", "adapter", "model", "metrics.jsonl", "config.json", "loss.png", "summary.json")


class RunError(ValueError):
    """A problem with the run's inputs or output directory that the user must fix."""


class DivergedError(RuntimeError):
    """--max-skipped-steps non-finite steps in a row: the run stopped (exit status 3)."""


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    out: Path
    model_path: str
    device: torch.device
    amp_dtype: torch.dtype | None
    tokenizer: object
    data: Datasets
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: StepLoader
    total_steps: int
    state: ckpt.TrainerState
    early: EarlyStopping | None
    overfit: OverfitDetector
    val_batches: list = field(default_factory=list)
    best_path: Path | None = None
    saved_step: int | None = None
    parallel: Parallel = SINGLE
    forward: nn.Module | None = None  # what the training forward goes through: DDP's wrapper, else the model

    def say(self, message: str) -> None:
        """A line for the user, from rank 0 only (tqdm-safe)."""
        if self.parallel.is_main:
            tqdm.write(message)


# ----------------------------------------------------------------------------------------- setup
def pick_device_and_dtype(name: str, device: torch.device | None = None) -> tuple[torch.device, torch.dtype | None]:
    """`device`, else cuda if present, else cpu; `auto` means bf16 autocast wherever the hardware has bf16 units."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "float16":
        raise RunError("--dtype float16 training needs loss scaling, which this trainer does not do: use bfloat16")
    if name == "float32":
        return device, None
    if name == "bfloat16":
        return device, torch.bfloat16
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return device, torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_demo_defaults(cfg: TrainConfig) -> str:
    """Without --model / --data, point the run at the built-in demo model and data."""
    from train.config import METHOD_LR
    from train.demo import DEMO_LR, DEMO_RUN_DEFAULTS, ensure_demo_base, ensure_demo_data

    model_path = cfg.run.model or str(ensure_demo_base())
    if cfg.data.data is None:
        cfg.data.data = str(ensure_demo_data())
        defaults = TrainConfig()
        for section, key, value in DEMO_RUN_DEFAULTS:
            if getattr(getattr(cfg, section), key) == getattr(getattr(defaults, section), key):
                setattr(getattr(cfg, section), key, value)
        if cfg.optim.lr == METHOD_LR[cfg.run.method]:
            cfg.optim.lr = DEMO_LR.get(cfg.run.method, cfg.optim.lr)
    return model_path


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Refuse a directory holding another run, unless resuming or told to overwrite."""
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {out} is a file")
    taken = [name for name in OWNED if (out / name).exists()]
    if taken and cfg.run.resume is None and not cfg.run.overwrite:
        raise RunError(f"--output-dir {out} already holds a run ({', '.join(taken)}): pass --resume to continue it or --overwrite to replace it")
    return out


def check_model_window(cfg: TrainConfig, model_path: str) -> ModelConfig:
    config = ModelConfig.from_file(resolve_model_dir(model_path) / "config.json")
    if cfg.data.seq_len > config.max_position_embeddings:
        raise RunError(f"--seq-len {cfg.data.seq_len} exceeds the model's window of {config.max_position_embeddings} tokens")
    return config


def check_memory(cfg: TrainConfig, config: ModelConfig, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """The safety valve: refuse a run whose estimated peak memory exceeds what the device has free."""
    problem = memory.check_fits(config, memory.settings_from(cfg, amp_dtype), cfg.optim.grad_accum, device)
    if problem:
        raise RunError(problem)


def resolve_model_path(cfg: TrainConfig, parallel: Parallel) -> str:
    """--model, or the built-in demo; rank 0 builds the demo base (once, cached) while the others wait."""
    if cfg.run.model is not None and cfg.data.data is not None:
        return cfg.run.model
    if not parallel.is_main:
        dist.barrier(parallel)
    model_path = apply_demo_defaults(cfg)
    if parallel.is_main:
        dist.barrier(parallel)
    return model_path


def setup(cfg: TrainConfig, parallel: Parallel = SINGLE, device: torch.device | None = None) -> Run:
    seed_everything(cfg.run.seed)  # the same on every rank: same initial adapters, same val split
    model_path = resolve_model_path(cfg, parallel)
    out = prepare_output_dir(cfg)
    device, amp_dtype = pick_device_and_dtype(cfg.run.dtype, device)
    config = check_model_window(cfg, model_path)
    if not (parallel.fsdp or cfg.run.skip_memory_check):  # the estimate is for one whole replica; FSDP2 holds 1/world
        check_memory(cfg, config, device, amp_dtype)
    tokenizer = load_tokenizer(model_path)
    data = load_datasets(cfg.data, tokenizer, cfg.run.seed)
    compute = amp_dtype or torch.float32
    full_state = None
    if not parallel.fsdp:
        model = build_model(cfg, model_path, device, compute)
    else:  # a skeleton everywhere; rank 0 alone reads the weights and sends each rank its shards
        model = build_model(cfg, model_path, torch.device("meta"), compute)
        if parallel.is_main:
            full_state = build_model(cfg, model_path, torch.device("cpu"), compute).state_dict()
    forward = dist.wrap(model, parallel, device, full_state)
    del full_state
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.optim)  # after sharding
    loader = StepLoader(data.train, cfg.data.batch_size, tokenizer.pad_id, cfg.optim.grad_accum, cfg.run.seed,
                        rank=parallel.rank, world_size=parallel.world_size)
    total = total_steps_for(loader.steps_per_epoch, cfg.optim.epochs, cfg.optim.max_steps)
    warmup = warmup_steps_for(total, cfg.optim.warmup_ratio, cfg.optim.warmup_steps)
    scheduler = build_scheduler(optimizer, total, cfg.optim.schedule, warmup)
    early = None
    if cfg.eval.early_stopping_patience:
        early = EarlyStopping(cfg.eval.early_stopping_patience, cfg.eval.early_stopping_threshold)
    val = []
    if data.val:
        val = eval_batches(data.val, cfg.data.batch_size, tokenizer.pad_id, parallel.rank, parallel.world_size)
    state = ckpt.TrainerState(world_size=parallel.world_size, fsdp=parallel.fsdp)
    run = Run(cfg, out, model_path, device, amp_dtype, tokenizer, data, model, optimizer, scheduler, loader,
              total, state, early, OverfitDetector(cfg.eval.overfit_patience, cfg.eval.overfit_gap), val,
              parallel=parallel, forward=forward)
    if parallel.enabled:
        seed_everything(cfg.run.seed + parallel.rank)  # from here on each rank draws its own dropout masks
    if parallel.is_main:
        make_output_dir(cfg, out)
    dist.barrier(parallel)
    if cfg.run.resume is not None:
        resume(run)
    if parallel.is_main:
        (out / "config.json").write_text(cfg.to_json())
    return run


def make_output_dir(cfg: TrainConfig, out: Path) -> None:
    if cfg.run.overwrite:
        for name in OWNED:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"--output-dir {out}: cannot create it ({err.strerror or err})") from None


def resume(run: Run) -> None:
    """Continue from the newest complete checkpoint (or `--resume DIR`); none yet: start afresh."""
    root = run.out / "checkpoints"
    p = run.parallel
    if p.is_main:
        ckpt.remove_partial(root)
    chosen = run.cfg.run.resume
    path = Path(chosen) if chosen != "latest" else (ckpt.complete_checkpoints(root) or [None])[-1]
    path = dist.broadcast(p, path)  # every rank resumes from the checkpoint rank 0 chose
    if path is None:
        if p.is_main:
            print(f"resume: no complete checkpoint in {root}; starting from the beginning", file=sys.stderr)
            truncate_metrics(run.out / "metrics.jsonl", -1)  # the killed run's step-0 evaluation is redone
        return
    if not (path / "state.json").is_file():
        raise RunError(f"--resume {path}: not a complete checkpoint (no state.json)")
    run.state, tensors, optimizer_state = ckpt.read_checkpoint(path, p.rank, p.world_size, p.fsdp)
    if p.fsdp:
        dist.load_sharded(run.model, run.optimizer, path / ckpt.SHARDED)
    else:
        ckpt.load_trainable_state(run.model, tensors, path)
        run.optimizer.load_state_dict(optimizer_state)
    _set_schedule(run)
    run.loader.load_state_dict(run.state.data)
    if run.early and run.state.early_stopping:
        run.early.load_state_dict(run.state.early_stopping)
    if run.state.overfit:
        run.overfit.load_state_dict(run.state.overfit)
    if run.state.best_step is not None:
        run.best_path = root / f"{ckpt.STEP_PREFIX}{run.state.best_step:08d}"
    if p.is_main:
        truncate_metrics(run.out / "metrics.jsonl", run.state.step)
        print(f"resume: continuing from {path} (step {run.state.step} of {run.total_steps})", file=sys.stderr)


def _set_schedule(run: Run) -> None:
    """Put the LambdaLR where it was after `state.step` steps."""
    run.scheduler.last_epoch = run.state.step
    for group, base, fn in zip(run.optimizer.param_groups, run.scheduler.base_lrs, run.scheduler.lr_lambdas):
        group["lr"] = base * fn(run.state.step)
    run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after `step` by the interrupted run, so the log reads as one run.

    A line cut short by a kill is dropped too; the file is replaced atomically, so a second kill
    during this rewrite leaves either the old log or the new one.
    """
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


# ------------------------------------------------------------------------------------------ fit
def log(run: Run, record: dict) -> None:
    if run.parallel.is_main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def save(run: Run) -> Path:
    """Checkpoint the current step (once), keeping the last N and the best. Rank 0 writes it; with
    several processes every rank takes part (its RNG states, and FSDP2's gathering of shards)."""
    p = run.parallel
    path = run.out / "checkpoints" / f"{ckpt.STEP_PREFIX}{run.state.step:08d}"
    if run.saved_step == run.state.step and dist.broadcast(p, path.is_dir()):
        return path
    run.state.data = run.loader.state_dict()
    run.state.early_stopping = run.early.state_dict() if run.early else {}
    run.state.overfit = run.overfit.state_dict()
    root = run.out / "checkpoints"
    tensors = optimizer_state = tmp = None
    rngs = dist.all_gather(p, ckpt.rng_state())
    try:
        if p.fsdp:  # each rank writes its own shards into rank 0's temporary directory
            tmp = dist.broadcast(p, ckpt.temp_dir(root, run.state.step))
            if p.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            dist.barrier(p)
            dist.save_sharded(run.model, run.optimizer, tmp / ckpt.SHARDED)
            dist.barrier(p)
        elif p.is_main:
            tensors, optimizer_state = ckpt.trainable_state(run.model), run.optimizer.state_dict()
        if p.is_main:
            path = ckpt.save_checkpoint(root, tensors, optimizer_state, run.state, run.cfg.to_dict(), rngs, tmp)
            keep = {run.best_path} if run.best_path else set()
            ckpt.prune(root, run.cfg.checkpoint.keep_last, keep)
    except OSError as err:  # full disk, read-only or vanished directory: earlier checkpoints are untouched
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"cannot write checkpoint {path.name} in {path.parent} ({err.strerror or err}); "
                       f"earlier checkpoints are intact: free space and rerun with --resume") from None
    dist.barrier(p)  # no rank moves on (or resumes) before the checkpoint exists
    run.saved_step = run.state.step
    return path


def run_eval(run: Run, recent_train_loss: float) -> tuple[dict, bool]:
    """Evaluate, keep the best checkpoint, consult early stopping; return (metrics, stop)."""
    metrics = evaluate(run.model, run.val_batches, run.data.val_records, run.tokenizer, run.cfg.eval.task,
                       run.device, run.amp_dtype, parallel=run.parallel)
    metrics = dist.broadcast(run.parallel, metrics)  # every rank takes rank 0's stopping decisions
    step = run.state.step
    val = metrics["val_loss"]
    report = run.overfit.check(recent_train_loss, val) if math.isfinite(recent_train_loss) else None
    stop = False
    if report is not None:
        metrics.update(train_val_gap=report.gap, overfit_warning=report.overfit_warning)
        if report.overfit_warning:
            run.say(f"step {step}: val loss exceeds train loss by {report.gap:.2f} nats: the model may be overfitting")
        if report.should_stop:
            run.say(f"step {step}: val loss rose {report.counter} evaluations in a row: stopping (overfitting)")
            stop = True
    if run.early and run.early.step(val):
        run.say(f"step {step}: no val-loss improvement above {run.early.threshold} in {run.early.patience} evaluations: stopping early")
        stop = True
    run.state.stopped = stop
    # Log, then checkpoint: a checkpoint of step N must already hold this evaluation (log line,
    # early-stopping count, stop flag), or a run resumed from it would never see it.
    log(run, {"step": step, **metrics})
    if run.state.best_val_loss is None or val < run.state.best_val_loss:
        run.state.best_val_loss, run.state.best_step = val, step
        run.best_path = save(run)
    return metrics, stop


def fit(run: Run) -> None:
    cfg = run.cfg
    bar = tqdm(total=run.total_steps, initial=run.state.step, desc=f"{cfg.run.method}", dynamic_ncols=True,
               disable=None if run.parallel.is_main else True)
    window = run.state.recent_losses  # in the trainer state, so a resume sees the same train/val gap
    started = time.perf_counter() - run.state.elapsed_s
    stop = run.state.stopped
    while run.state.step < run.total_steps and not stop:
        t0 = time.perf_counter()
        result = train_step(run.model, run.optimizer, run.scheduler, run.loader.next_step(), run.device,
                            run.amp_dtype, cfg.optim.max_grad_norm, run.parallel, run.forward)
        run.state.step += 1
        run.state.tokens_seen += result.tokens
        run.state.elapsed_s = time.perf_counter() - started
        tps = result.tokens / max(time.perf_counter() - t0, 1e-9)
        if result.skipped:
            run.state.skipped_steps += 1
            run.state.skipped_in_a_row += 1
            run.say(f"step {run.state.step}: non-finite loss or gradient, update skipped")
        else:
            run.state.skipped_in_a_row = 0
            window.append(result.loss)
        lr = run.optimizer.param_groups[0]["lr"]
        log(run, {"step": run.state.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens": result.tokens, "tokens_per_s": tps, "skipped": result.skipped})
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        check_divergence(run)
        last = run.state.step == run.total_steps
        if run.val_batches and (last or (cfg.eval.eval_every and run.state.step % cfg.eval.eval_every == 0)):
            recent = sum(window) / len(window) if window else float("nan")
            window.clear()  # before run_eval, whose checkpoint must hold the emptied window
            metrics, stop = run_eval(run, recent)
            bar.set_postfix(loss=f"{result.loss:.3f}", val=f"{metrics['val_loss']:.3f}", lr=f"{lr:.2e}")
        if cfg.checkpoint.save_every and run.state.step % cfg.checkpoint.save_every == 0:
            save(run)
    bar.close()
    save(run)


def check_divergence(run: Run) -> None:
    """Stop after --max-skipped-steps non-finite steps in a row, without checkpointing the bad streak."""
    limit = run.cfg.optim.max_skipped_steps
    if run.state.skipped_in_a_row >= limit:
        last = ckpt.complete_checkpoints(run.out / "checkpoints")
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
        raise DivergedError(f"{limit} steps in a row had a non-finite loss or gradient (last: step {run.state.step}); "
                            f"stopping: {where}. Lower --lr, check the data, or raise --max-skipped-steps")


# --------------------------------------------------------------------------------------- finish
def restore_best(run: Run) -> None:
    """Put the best checkpoint's trainable tensors back into the model."""
    best = run.best_path
    if best is None or not best.is_dir():
        return
    if run.parallel.fsdp:
        dist.load_sharded(run.model, None, best / ckpt.SHARDED)
    else:
        from safetensors.torch import load_file

        ckpt.load_trainable_state(run.model, load_file(str(best / "trainable.safetensors")), best)


def save_product(run: Run) -> Path:
    """Rank 0 writes the adapter or model. A sharded model is first rebuilt whole on the CPU from the
    gathered tensors, so the files are the same Hugging Face / PEFT files one process would write."""
    p = run.parallel
    product = run.out / ("model" if run.cfg.run.method == "full" else "adapter")
    tensors = dist.full_trainable_state(run.model, p) if p.fsdp else {}
    if p.is_main:
        model = run.model
        if p.fsdp:
            model = build_model(run.cfg, run.model_path, torch.device("cpu"), run.amp_dtype or torch.float32)
            ckpt.load_trainable_state(model, tensors, run.best_path or run.out)
        product = save_result(model, run.cfg, run.out, run.model_path)
    dist.barrier(p)
    return product


def plot_losses(metrics_path: Path, out_png: Path) -> bool:
    """Train and val loss against step as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(status["VmHWM"].split()[0]) / 1024


def show_samples(run: Run, title: str, n: int = 3) -> None:
    """A few greedy generations, printed by rank 0 (every rank generates: a sharded model needs them all)."""
    pool = [r for r in (run.data.val_records or run.data.train_records) if r.shape != "text"]
    records = pool[:: max(1, len(pool) // n)][:n]  # spread over the set, not its first few lines
    if not records:
        return
    preds, refs = generate_references(run.model, records, run.tokenizer, run.device, run.amp_dtype, max_new_tokens=32)
    if not run.parallel.is_main:
        return
    print(f"\n{title}")
    for record, pred, ref in zip(records, preds, refs):
        prompt = record.prompt if record.shape != "chat" else record.messages[-2]["content"]
        print(f"  prompt:    {prompt.strip()[:100]}\n  generated: {pred[:120]}\n  reference: {ref[:120]}\n")


def finish(run: Run, first_val: float | None) -> dict:
    restore_best(run)
    product = save_product(run)
    best = run.state.best_val_loss
    summary = {
        "method": run.cfg.run.method,
        "steps": run.state.step,
        "skipped_steps": run.state.skipped_steps,
        "first_val_loss": first_val,
        "best_val_loss": best,
        "best_step": run.state.best_step,
        "best_perplexity": math.exp(best) if best is not None and best < 50 else None,
        "time_s": round(run.state.elapsed_s, 1),
        "tokens_seen": run.state.tokens_seen,
        "peak_memory_mib": round(peak_memory_mib(run.device), 1),  # rank 0's
        "processes": run.parallel.world_size,
        "sharding": run.parallel.mode,
        "output": str(product),
    }
    if not run.parallel.is_main:
        return summary
    plotted = plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [(k.replace("_", " "), v) for k, v in summary.items() if v is not None]
    if plotted:
        rows.append(("loss curve", str(run.out / "loss.png")))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in rows))
    return summary


def train(cfg: TrainConfig, samples: bool = True, parallel: Parallel = SINGLE, device: torch.device | None = None) -> dict:
    """Run a whole fine-tuning job as `cfg` says; return the summary.

    samples: print a few generations on validation prompts before and after training.
    parallel, device: this process's place in a torchrun job (train.distributed); default one process.
    """
    run = setup(cfg, parallel, device)
    if parallel.is_main:
        b, k, n = run.cfg.data.batch_size, run.cfg.optim.grad_accum, parallel.world_size
        layout = f", {n} processes ({parallel.mode}), global batch {b} x {k} x {n} = {b * k * n} rows" if n > 1 else ""
        print(f"{run.cfg.run.method} on {run.model_path} ({run.device}, "
              f"{'bf16 autocast' if run.amp_dtype else 'float32'}{layout}); {run.total_steps} steps", file=sys.stderr)
        print(run.data.summary(), file=sys.stderr)
        if run.cfg.run.method != "full" and not parallel.fsdp:  # sharded parameters would be counted 1/world
            from lora.inject import trainable_report

            print(trainable_report(run.model), file=sys.stderr)
    if run.state.step == 0:
        if samples:
            show_samples(run, "Before fine-tuning:")
        if run.val_batches:
            first = evaluate(run.model, run.val_batches, [], run.tokenizer, "lm", run.device, run.amp_dtype,
                             parallel=parallel)
            run.state.first_val_loss = first["val_loss"]  # in the trainer state: a resumed run reports it too
            log(run, {"step": 0, **first})
    fit(run)
    summary = finish(run, run.state.first_val_loss)
    if samples:
        show_samples(run, "After fine-tuning (best checkpoint):")
    return summary


def main(argv: list[str] | None = None) -> int:
    parallel = SINGLE
    try:
        cfg = parse_args(argv)
        parallel = dist.from_env(cfg.run.fsdp)
        if cfg.run.fsdp and not parallel.enabled:
            raise RunError("--fsdp shards over several processes: start the run with torchrun --nproc_per_node N")
        if parallel.enabled and torch.cuda.is_available() and parallel.local_rank >= torch.cuda.device_count():
            raise RunError(f"local rank {parallel.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                           "start at most one process per GPU (torchrun --nproc_per_node)")
        device = dist.start(parallel)
        train(cfg, parallel=parallel, device=device)
    except (ConfigError, DataError, CheckpointError, RunError) as err:
        if parallel.is_main:  # every rank read the same input and stops with the same message
            print(f"error: {err}", file=sys.stderr)
        return 2
    except DivergedError as err:
        if parallel.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 3
    except OSError as err:  # e.g. the disk filled while writing logs or the result: one line, no traceback
        if err.errno not in USER_FIXABLE_ERRNOS:
            raise
        where = f"rank {parallel.rank}: " if parallel.enabled else ""
        print(f"{where}error: {err.filename or 'output'}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if parallel.is_main:
            print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    finally:
        dist.stop(parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
