"""The seed's comparison table, measured: every method on a real model and two real tasks.

    python -m benchmarks.quality --quick            # <= 10 min on 2 CPU cores: one task, one seed
    python -m benchmarks.quality                    # the full CPU protocol (<= 60 min): two tasks, two seeds
    python -m benchmarks.quality --device cuda      # the same protocol with a GPU-sized budget
    python -m benchmarks.quality --report-only      # QUALITY.md and the plot again from the JSON

Writes benchmarks/QUALITY[-quick|-cuda].md, its plot quality[-quick|-cuda].png and
benchmarks/results/quality[-quick|-cuda].json.

Protocol, per task (benchmarks.quality_tasks: fixed train / validation / test splits):
1. Row 0 is the untouched base, scored on the test split.
2. Every method row (full, lora, qlora, prefix, prompt, and the LoRA variants dora and rslora) trains
   with seed 0 at three learning rates around its own default (x0.3, x1, x3); each run is `train.run`
   in a fresh process (so its peak memory is its own), with the same steps, batch size and sequence
   length, and so the same token budget and the same data order for a given seed.
3. The learning rate with the lowest validation loss at the end of training is chosen (validation
   only: the test split is never read before this choice). That learning rate then also trains with
   the other seeds.
4. The saved product of each chosen run (adapter or model directory, loaded as any user would) is
   scored on the test split: loss and perplexity, and the task's metrics.
The report (benchmarks.quality_report) gives mean and spread over seeds and "quality recovered",
(method - base) / (full - base), on loss and on each task metric.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import torch

from adapters.load import load_adapted
from benchmarks.methods import tensor_elements
from benchmarks.quality_report import MissingCell, write_report
from benchmarks.quality_tasks import TASKS, Task, answer_of
from demo.base import shipped_model
from models.checkpoint import load_checkpoint, save_pretrained
from models.gguf import is_gguf
from models.tokenizer import load_tokenizer
from train.config import parse_args
from train.data import build_examples
from train.errors import ConfigError
from train.evaluate import classification_metrics, generation_metrics
from train.loader import eval_batches
from train.loop import evaluate_loss, pick_device_and_dtype
from train.methods import METHODS
from train.metrics import perplexity
from train.records import parse_record
from train.run import train

ROOT = Path(__file__).resolve().parents[1]
# Table row -> (train.run --method, extra flags)
ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "full": ("full", ()), "lora": ("lora", ()), "qlora": ("qlora", ()), "prefix": ("prefix", ()),
    "prompt": ("prompt", ()), "dora": ("lora", ("--use-dora",)), "rslora": ("lora", ("--use-rslora",)),
}
LR_FACTORS = (0.3, 1.0, 3.0)


@dataclass(frozen=True)
class Budget:
    """How much each run trains, and on what."""

    tasks: tuple[str, ...]
    steps: int
    batch_size: int
    seq_len: int
    seeds: tuple[int, ...]
    test_limit: int | None = None  # score the first N test records only (a fixed subset)


BUDGETS = {
    "quick": Budget(("docstring",), steps=8, batch_size=8, seq_len=128, seeds=(0,), test_limit=60),
    "cpu": Budget(("docstring", "module"), steps=30, batch_size=8, seq_len=128, seeds=(0, 1)),
    "cuda": Budget(("docstring", "module"), steps=300, batch_size=16, seq_len=256, seeds=(0, 1, 2)),
}


def default_lr(row: str) -> float:
    """The method's own learning rate for a short run on a real model (its demo lr where it has one)."""
    method = METHODS[ROWS[row][0]]
    return method.demo_lr if method.demo_lr is not None else method.lr


def sweep_lrs(row: str) -> tuple[float, ...]:
    return tuple(float(f"{default_lr(row) * f:.3g}") for f in LR_FACTORS)


def pick_lr(runs: list[dict]) -> float:
    """The learning rate whose run ended with the lowest validation loss (ties: the smaller lr). Reads
    nothing but `val_loss`, so no test number can steer the choice."""
    finite = [r for r in runs if r.get("val_loss") is not None and r["val_loss"] == r["val_loss"]]
    if not finite:
        raise RuntimeError("no run of the sweep ended with a finite validation loss")
    return min(finite, key=lambda r: (r["val_loss"], r["lr"]))["lr"]


# --- one training run, in its own process ----------------------------------------------------------------
def train_argv(row: str, model: str, data: dict[str, Path], lr: float, seed: int, budget: Budget,
               out: Path) -> list[str]:
    method, extra = ROWS[row]
    return ["--method", method, *extra, "--model", model, "--data", str(data["train"]),
            "--val-data", str(data["val"]), "--lr", repr(lr), "--seed", str(seed),
            "--max-steps", str(budget.steps), "--batch-size", str(budget.batch_size),
            "--seq-len", str(budget.seq_len), "--warmup-ratio", "0.1", "--eval-every", "0",
            "--save-every", "0", "--keep-last", "1", "--task", "lm", "--output-dir", str(out), "--overwrite"]


def train_run(row: str, model: str, data: dict[str, Path], lr: float, seed: int, budget: Budget,
              out: Path, device: str) -> dict:
    """Train one cell in a fresh process; its summary's numbers, the trainable count and the saved size."""
    cmd = [sys.executable, "-m", "benchmarks.quality", "--train-one", *train_argv(row, model, data, lr, seed, budget, out)]
    env = None if device == "cuda" else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} lr {lr} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    found = re.search(r"trainable params: ([\d,]+)", proc.stderr)  # printed for adapters
    product = Path(summary["output"])
    # a whole model trains every tensor it saves (a tied head is saved once, as it is one parameter)
    trainable = int(found.group(1).replace(",", "")) if found else tensor_elements(sorted(product.glob("*.safetensors")))
    return {
        "lr": lr, "seed": seed, "val_loss": summary["best_val_loss"], "first_val_loss": summary["first_val_loss"],
        "trainable": trainable,
        "peak_memory_mib": summary["peak_memory_mib"], "train_time_s": summary["time_s"],
        "process_wall_s": round(time.perf_counter() - started, 1),
        "tokens_per_s": summary["input_tokens_per_s"], "target_tokens_per_s": summary["target_tokens_per_s"],
        "saved_bytes": sum(f.stat().st_size for f in product.rglob("*") if f.is_file()),
        "product": str(product),
    }


def train_one(argv: list[str]) -> int:
    """`--train-one ARGS`: train.run with ARGS, without the before/after sample generations."""
    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    train(cfg, samples=False)
    return 0


# --- scoring on the test split ------------------------------------------------------------------------------
def score(model, tokenizer, task: Task, seq_len: int, device: torch.device) -> dict[str, float]:
    """Test loss, perplexity and the task's metrics of `model` (bf16 autocast where the hardware has it)."""
    amp = pick_device_and_dtype("auto", device)[1]  # what train.run trains under
    records = [parse_record(r, "test", i + 1) for i, r in enumerate(task.test)]
    examples, _ = build_examples(records, tokenizer, seq_len, "test")
    model.eval()
    loss = evaluate_loss(model, eval_batches(examples, 16, tokenizer.pad_id), device, amp)
    out = {"loss": loss, "perplexity": perplexity(loss)}
    if task.kind == "classification":
        out.update(classification_metrics(model, records, tokenizer, device, amp))
    else:
        out.update(generation_metrics(model, records, tokenizer, device, amp))
    return out


def score_product(base: str, product: Path, task: Task, seq_len: int, device: torch.device) -> dict[str, float]:
    """Score what a run saved, loaded as a user would load it: a model directory, or the base plus an
    adapter (a QLoRA adapter on the 4-bit base it was trained on, as its record says)."""
    if (product / "config.json").is_file():
        model = load_checkpoint(product, device=device).model
    else:
        model = load_adapted(base, product, dtype=torch.bfloat16, device=device).model
    return score(model, load_tokenizer(base), task, seq_len, device)


# --- the protocol ---------------------------------------------------------------------------------------------
def prepare_base(model: str, work: Path) -> str:
    """A `.gguf` base is dequantized once into a Hugging Face directory (float32: exactly the file's values),
    so that each of the many runs loads it in a second instead of decoding the file again."""
    if not is_gguf(model):
        return model
    out = work / "base"
    loaded = load_checkpoint(model, dtype=torch.float32)
    save_pretrained(loaded.model, out, tokenizer_dir=model)
    return str(out)


def write_splits(task: Task, work: Path) -> dict[str, Path]:
    paths = {}
    for split in ("train", "val"):
        paths[split] = work / f"{task.name}-{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in getattr(task, split)))
    return paths


def run_task(task: Task, base: str, rows: list[str], budget: Budget, work: Path, device: torch.device,
             say) -> dict:
    data = write_splits(task, work)
    tok = load_tokenizer(base)
    say(f"[{task.name}] base on {len(task.test)} test records")
    base_model = load_checkpoint(base, dtype=torch.bfloat16, device=device).model
    result = {"kind": task.kind, "sizes": {s: len(getattr(task, s)) for s in ("train", "val", "test")},
              "labels": sorted({answer_of(r) for r in task.test}) if task.kind == "classification" else None,
              "base": {"test": score(base_model, tok, task, budget.seq_len, device)}, "rows": {}}
    del base_model
    for row in rows:
        sweep = []
        for lr in sweep_lrs(row):
            out = work / f"{task.name}-{row}-lr{lr:g}-s{budget.seeds[0]}"
            sweep.append(train_run(row, base, data, lr, budget.seeds[0], budget, out, device.type))
            say(f"[{task.name}] {row:7s} lr {lr:<8g} val loss {sweep[-1]['val_loss']:.4f}  "
                f"({sweep[-1]['process_wall_s']:.0f} s)")
        chosen = pick_lr(sweep)
        seeds = [next(r for r in sweep if r["lr"] == chosen)]
        for seed in budget.seeds[1:]:
            out = work / f"{task.name}-{row}-lr{chosen:g}-s{seed}"
            seeds.append(train_run(row, base, data, chosen, seed, budget, out, device.type))
        for run in seeds:  # the test split is read only now, after the choice
            run["test"] = score_product(base, Path(run["product"]), task, budget.seq_len, device)
        say(f"[{task.name}] {row:7s} chose lr {chosen:g}: test " +
            ", ".join(f"{k} {v:.4f}" for k, v in seeds[0]["test"].items()))
        for run in sweep + seeds[1:]:  # (seeds[0] is one of the sweep's runs)
            shutil.rmtree(Path(run.pop("product")).parent, ignore_errors=True)  # full runs write ~0.5 GB each
        result["rows"][row] = {"sweep": sweep, "chosen_lr": chosen, "seeds": seeds}
    return result


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "bitsandbytes", "tokenizers", "sacrebleu", "gguf"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    return out


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-one"]:
        return train_one(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one task, one seed, fewer steps (<= 10 min on 2 CPU cores)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", help="base model (default: the shipped SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated method rows to run")
    ap.add_argument("--json", type=Path, help="results file (default benchmarks/results/quality[-quick|-cuda].json)")
    ap.add_argument("--markdown", type=Path, help="report (default benchmarks/QUALITY[-quick|-cuda].md)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from --json without running")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"--rows: unknown {', '.join(unknown)} (choose from {', '.join(ROWS)})", file=sys.stderr)
        return 2
    name = "quick" if args.quick else args.device
    suffix = "" if name == "cpu" else f"-{name}"
    path = args.json or ROOT / "benchmarks" / "results" / f"quality{suffix}.json"
    markdown = args.markdown or ROOT / "benchmarks" / f"QUALITY{suffix}.md"
    if not args.report_only:
        results = run(args, name, rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    try:
        write_report(json.loads(path.read_text()), markdown, markdown.with_name(f"quality{suffix}.png"))
    except (OSError, ValueError, MissingCell) as err:
        print(f"{path}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {markdown} from {path}")
    return 0


def run(args: argparse.Namespace, name: str, rows: list[str]) -> dict:
    budget, device = BUDGETS[name], torch.device(args.device)
    started = time.perf_counter()
    model = args.model or str(shipped_model())

    def say(message: str) -> None:
        print(f"{time.perf_counter() - started:7.0f} s  {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        work = Path(tmp)
        base = prepare_base(model, work)
        params = sum(p.numel() for p in load_checkpoint(base, dtype=torch.bfloat16).model.parameters())
        tasks = {}
        for t in budget.tasks:
            task = TASKS[t]()
            task = replace(task, test=task.test[: budget.test_limit]) if budget.test_limit else task
            tasks[t] = run_task(task, base, rows, budget, work, device, say)
    command = "python -m benchmarks.quality" + (" --quick" if args.quick else "") + \
        (f" --device {args.device}" if args.device != "cpu" else "") + (f" --model {args.model}" if args.model else "")
    return {"command": command, "budget": {"name": name, **asdict(budget)}, "model": Path(model).name,
            "base_params": params, "rows": rows, "lr_factors": LR_FACTORS, "machine": machine(device),
            "versions": versions(), "date": time.strftime("%Y-%m-%d"), "total_s": round(time.perf_counter() - started),
            "tasks": tasks}


if __name__ == "__main__":
    sys.exit(main())
