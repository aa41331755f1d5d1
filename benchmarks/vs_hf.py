"""This project's trainer vs Hugging Face Trainer + PEFT (+ bitsandbytes): tokens/s, peak memory, loss.

    OMP_NUM_THREADS=2 python -m benchmarks.vs_hf [--quick] [--shape NAME] [--methods lora,qlora,full]
        [--seq N] [--batch N] [--grad-checkpointing] [--compile] [--device cpu|cuda] [--json PATH] [--profile]

One random model in a published shape (SmolLM2-135M's by default; --quick: a ~33M-parameter Llama;
--shape qwen2.5-0.5b / qwen2.5-1.5b: Qwen2.5's, 494M / 1.54B parameters) is saved once; each
(implementation, method) pair then trains it in a fresh process on the same synthetic token rows, with the same sequence
length, batch, steps, optimizer (AdamW, constant lr, no weight decay, clip 1.0), LoRA settings
(r=16, alpha=32, dropout 0.05 on q,k,v,o), precision (bf16 autocast; HF: TrainingArguments(bf16=True,
use_cpu=True on the CPU)) and activation-checkpointing setting (off unless --grad-checkpointing,
which turns it on for both).

- ours: `train.methods` (Method.build) + `train.loop.train_step`, the functions `train.run` uses
  (no evaluation, checkpoints or logging files, so only the step itself is timed).
- hf:   `AutoModelForCausalLM` (+ `peft.get_peft_model`; qlora: `BitsAndBytesConfig` nf4 4-bit) + `Trainer`.
- method qlora+embed: ours only, QLoRA with --quantize-embeddings (HF + PEFT has no 4-bit embedding).
- method M+compile (or --compile: every method also as M+compile, in rows beside the eager ones): ours with
  `train.run --compile` (each decoder block torch.compiled), hf with TrainingArguments(torch_compile=True) (the
  whole model compiled by Trainer). The compile time falls in the warm-up steps; use --warmup 2 or more.

tokens/s counts the steps after --warmup steps (on a GPU each step is synchronised before its clock
stops). Step times on a shared 2-core VM drift by 10-20 % between runs; --repeat N runs every pair N
times, ours and hf alternating, and keeps the run with the median tokens/s. Peak memory on the CPU is VmHWM (peak resident set) minus the resident set measured after
that process's imports and before the model is built, so the two sides' different import
footprints (transformers + peft are large) cancel out; the absolute VmHWM is in the JSON as
peak_rss_mib. On a GPU it is torch.cuda.max_memory_allocated of the worker process. The
utilisation line divides achieved FLOP/s (6N per token for full, 4N_frozen + 6N_adapter for LoRA)
by bf16 and fp32 matmul rates timed in this run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True}
QWEN25_05B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "head_dim": 64, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6}
QWEN25_15B = {**QWEN25_05B, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "head_dim": 128}
QUICK = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 10, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8192, "tie_word_embeddings": True}
SHAPES = {"quick": QUICK, "smollm2-135m": SMOLLM2_135M, "qwen2.5-0.5b": QWEN25_05B, "qwen2.5-1.5b": QWEN25_15B}
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}


# ------------------------------------------------------------------------------------- helpers
def rss_mib(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of this process, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def synthetic_rows(vocab: int, rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    """The same random token rows for both sides (labels = inputs; both shift internally)."""
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def build_model(out_dir: Path, shape: dict) -> Path:
    """A random Llama of `shape`, saved in Hugging Face format (no tokenizer: the data is token ids)."""
    from models.checkpoint import save_pretrained
    from models.config import ModelConfig
    from models.decoder import Decoder

    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_hf_dict({**_base_config(), **shape, "max_position_embeddings": 4096}))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, out_dir)
    return out_dir


def _base_config() -> dict:
    from demo.tiny import DEMO_MODEL_CONFIG

    return dict(DEMO_MODEL_CONFIG)


def param_counts(shape: dict) -> tuple[int, int]:
    """(all parameters with the tied head counted once, LoRA adapter parameters) for `shape`."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    if shape.get("model_type") == "qwen2":  # q/k/v biases
        per_layer += q + 2 * kv
    total = n * per_layer + shape["vocab_size"] * h * (1 if shape["tie_word_embeddings"] else 2) + h
    r = LORA["r"]
    adapter = n * r * ((h + q) + 2 * (h + kv) + (q + h))
    return total, adapter


def matmul_tflops(dtype: torch.dtype, n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best-of-reps dense matmul rate, TFLOP/s: the ceiling the training step is compared with."""
    if device == "cuda":
        n *= 4  # 8192^3: big enough to keep a GPU busy
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a clock read after it measures the work."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: str, base_rss: float) -> float:
    """The peak this process has reached: GPU bytes allocated, or on the CPU VmHWM minus `base_rss`."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib("VmHWM") - base_rss


# -------------------------------------------------------------------------------------- workers
def split_method(method: str) -> tuple[str, set[str]]:
    """"qlora+embed+compile" -> ("qlora", {"embed", "compile"}): the train.methods name and the options."""
    base, *options = method.split("+")
    unknown = set(options) - {"embed", "compile"}
    if unknown:
        raise ValueError(f"unknown method option(s) {sorted(unknown)} in {method!r}: embed, compile")
    return base, set(options)


def ours_config(method: str, grad_checkpointing: bool):
    """The TrainConfig of our side: `method` (+embed: --quantize-embeddings, +compile: --compile) with the LORA
    settings."""
    from train.config import TrainConfig

    cfg = TrainConfig()
    cfg.run.method, options = split_method(method)
    cfg.lora.quantize_embeddings = "embed" in options
    cfg.run.compile = "compile" in options
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = LORA["r"], LORA["alpha"], LORA["dropout"]
    cfg.lora.target_modules = list(LORA["targets"])
    cfg.run.grad_checkpointing = grad_checkpointing
    return cfg


def ours_trainer(cfg, model_dir: str | Path, device: torch.device):
    """Our side as train.run builds it from `cfg` (ours_config): (model, AdamW at LR[method] without weight
    decay, a constant schedule). AdamW's state appears with the first step."""
    from train.loop import build_optimizer

    model = cfg.method.build(cfg, str(model_dir), device, torch.bfloat16).model
    opt = build_optimizer(model, LR[cfg.run.method], 0.0)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def worker_ours(args: argparse.Namespace, base_rss: float) -> dict:
    from train.loop import train_step

    device = torch.device(args.device)
    model, opt, sched = ours_trainer(ours_config(args.method, bool(args.grad_checkpointing)), args.model, device)
    loaded = peak_mib(args.device, base_rss)
    rows = synthetic_rows(args.vocab, args.batch * (args.warmup + args.steps), args.seq)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        x = rows[step * args.batch : (step + 1) * args.batch]
        last = step == args.warmup + args.steps - 1
        with _profiler(bool(getattr(args, "profile", False)) and last):
            sync(args.device)
            t0 = time.perf_counter()
            res = train_step(model, opt, sched, [{"input_ids": x, "labels": x}], device, torch.bfloat16, 1.0)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        losses.append(res.loss)
    return _result(args, times, losses, base_rss, loaded)


@contextlib.contextmanager
def _profiler(on: bool):
    """torch.profiler around one step when `on`: top ops by time and by allocated memory, to stderr."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    print(table.table(sort_by="self_cpu_memory_usage", row_limit=12), file=sys.stderr)


def worker_hf(args: argparse.Namespace, base_rss: float) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()
    method, options = split_method(args.method)
    kwargs: dict = {"dtype": torch.float32 if method == "full" else torch.bfloat16}
    if method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if args.device == "cuda":
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if method != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    loaded = peak_mib(args.device, base_rss)
    rows = synthetic_rows(args.vocab, args.batch * (args.warmup + args.steps), args.seq)
    data = [{"input_ids": r, "labels": r} for r in rows]
    times, losses, clock = [], [], {}

    class Clock(TrainerCallback):
        """Wall time per optimizer step, and the loss Trainer logs for it."""

        def on_step_begin(self, *a, **k):
            sync(args.device)
            clock["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(args.device)
            times.append(time.perf_counter() - clock["t0"])

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(output_dir=args.out, per_device_train_batch_size=args.batch,
                              max_steps=args.warmup + args.steps, learning_rate=LR[method], weight_decay=0.0,
                              lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, bf16=True,
                              use_cpu=args.device == "cpu", logging_steps=1,
                              gradient_checkpointing=bool(args.grad_checkpointing),
                              gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no", report_to=[],
                              dataloader_num_workers=0, disable_tqdm=True, seed=0, torch_compile="compile" in options)
    Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()]).train()
    return _result(args, times, losses, base_rss, loaded)


def _result(args: argparse.Namespace, times: list[float], losses: list[float], base_rss: float, loaded: float) -> dict:
    """One row; load_peak_mib is VmHWM - base right after the model was built (before any step)."""
    measured = times[args.warmup :]
    return {"impl": args.worker, "method": args.method,
            "tokens_per_s": args.batch * args.seq * len(measured) / sum(measured),
            "step_s": measured, "peak_mem_mib": peak_mib(args.device, base_rss), "peak_rss_mib": rss_mib("VmHWM"),
            "base_rss_mib": base_rss, "load_peak_mib": loaded, "final_loss": losses[-1] if losses else None}


def run_worker(args: argparse.Namespace) -> None:
    """Worker entry: imports first (the baseline RSS is taken after them), then train, then one JSON line."""
    if args.worker == "hf":
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        import train.loop
        import train.methods  # noqa: F401
    base = rss_mib()
    result = worker_ours(args, base) if args.worker == "ours" else worker_hf(args, base)
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------- parent
def spawn(impl: str, method: str, model: Path, out: Path, opts: argparse.Namespace, vocab: int) -> dict:
    """One run in a fresh interpreter, so its peak RSS is its own; an error is returned, not raised."""
    cmd = [sys.executable, "-m", "benchmarks.vs_hf", "--worker", impl, "--method", method, "--model", str(model),
           "--out", str(out), "--seq", str(opts.seq), "--batch", str(opts.batch), "--steps", str(opts.steps),
           "--warmup", str(opts.warmup), "--vocab", str(vocab), "--device", opts.device]
    if opts.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"impl": impl, "method": method, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}


def median_run(runs: list[dict]) -> dict:
    """Of repeated runs of one (impl, method): the one with the median tokens/s (the lower middle for an
    even count), with every successful run's tokens/s under "runs_tokens_per_s"; a failure if all failed."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["tokens_per_s"])
    if not ok:
        return runs[-1]
    return {**ok[(len(ok) - 1) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs if "error" not in r]}


def flops_per_token(method: str, shape: dict) -> float:
    """Training FLOPs per token: 6N for full; frozen weights need no weight gradient, so 4N + 6N_adapter."""
    total, adapter = param_counts(shape)
    return 6.0 * total if split_method(method)[0] == "full" else 4.0 * total + 6.0 * adapter


def report(rows: list[dict], shape: dict, rates: dict[str, float]) -> str:
    """The markdown tables: per-row numbers, ours/hf ratios, utilisation."""
    lines = ["| impl | method | tokens/s | step s (min-max) | peak MiB (VmHWM - base) | of which at load | abs VmHWM MiB | final loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['method']} | failed: {' '.join(r['error'])[:120]} | | | | | |")
        else:
            lines.append(f"| {r['impl']} | {r['method']} | {r['tokens_per_s']:,.1f} | {min(r['step_s']):.2f}-{max(r['step_s']):.2f} "
                         f"| {r['peak_mem_mib']:,.0f} | {r['load_peak_mib']:,.0f} "
                         f"| {r['peak_rss_mib']:,.0f} | {r['final_loss']:.4f} |")
    lines += ["", "| method | tokens/s ours/hf | peak memory ours/hf |", "|---|---:|---:|"]
    by = {(r["impl"], r["method"]): r for r in rows if "error" not in r}
    for m in dict.fromkeys(r["method"] for r in rows):
        if ("ours", m) in by and ("hf", m) in by:
            o, h = by[("ours", m)], by[("hf", m)]
            lines.append(f"| {m} | {o['tokens_per_s'] / h['tokens_per_s']:.2f} | "
                         f"{o['peak_mem_mib'] / h['peak_mem_mib']:.2f} |")
    lines += ["", f"Matmul ceiling (2048^3, this run): bf16 {rates['bf16']:.2f} TFLOP/s, fp32 {rates['fp32']:.2f} TFLOP/s", "",
              "| impl | method | achieved GFLOP/s | % of bf16 matmul | % of fp32 matmul |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" not in r:
            achieved = flops_per_token(r["method"], shape) * r["tokens_per_s"] / 1e12
            lines.append(f"| {r['impl']} | {r['method']} | {achieved * 1e3:,.1f} | {100 * achieved / rates['bf16']:.1f}% "
                         f"| {100 * achieved / rates['fp32']:.1f}% |")
    return "\n".join(lines)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001  (a missing or broken package is reported, not fatal)
            out[name] = f"unavailable ({type(err).__name__})"
    return out


def machine() -> dict:
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    with open("/proc/meminfo") as info:
        mem_kib = next((int(line.split()[1]) for line in info if line.startswith("MemTotal:")), 0)
    out = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "mem_gib": round(mem_kib / 2**20, 1),
           "bf16_units": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "platform": platform.platform()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return out


def profile_ours(args: argparse.Namespace, shape: dict) -> int:
    """Profile our step per method (the tables go to stderr); no memory numbers: one shared process."""
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(args.keep or tmp) / "model", shape)
        for method in args.methods.split(","):
            ns = argparse.Namespace(**{**vars(args), "worker": "ours", "method": method, "model": str(model),
                                       "vocab": shape["vocab_size"]})
            print(f"== ours {method}", file=sys.stderr)
            print(json.dumps(worker_ours(ns, rss_mib())))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_hf", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~33M-parameter shape, 2 x 256 tokens, 2+6 steps (~1.5 min on 2 idle cores)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: smollm2-135m; quick with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--compile", action="store_true",
                   help="also run every method compiled (M+compile: ours --compile, hf torch_compile=True), rows beside")
    p.add_argument("--methods", default="lora,qlora,full",
                   help="comma-separated: lora, qlora, full, qlora+embed (ours only: --quantize-embeddings); "
                        "+compile after any of them: torch.compile on both sides")
    p.add_argument("--seq", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every (impl, method) pair this many times, ours and hf alternating; each row is the run "
                        "with the median tokens/s (every run's tokens/s is kept in the JSON)")
    p.add_argument("--json", help="write machine, versions and rows here")
    p.add_argument("--keep", help="build the model in this directory instead of a temporary one")
    p.add_argument("--profile", action="store_true",
                   help="instead of comparing: profile the last step of ours for each --methods, in this process")
    # worker-only flags (the parent passes them to its child processes)
    p.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    shape = SHAPES[args.shape or ("quick" if args.quick else "smollm2-135m")]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    args.seq = args.seq or (256 if args.quick else 512)
    args.batch = args.batch or 2
    args.steps = args.steps or (6 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 2
    from tqdm import tqdm

    rates = {"bf16": matmul_tflops(torch.bfloat16, device=args.device),
             "fp32": matmul_tflops(torch.float32, device=args.device)}
    if args.profile:
        return profile_ours(args, shape)
    methods = args.methods.split(",")
    if args.compile:
        methods = [v for m in methods for v in (m, m if m.endswith("+compile") else m + "+compile")]
    try:
        for m in methods:
            split_method(m)
    except ValueError as err:
        p.error(str(err))
    # +embed (QLoRA with a 4-bit embedding and head) has no counterpart in HF + PEFT: ours only
    pairs = [(impl, m) for m in dict.fromkeys(methods) for impl in ("ours", "hf")
             if impl == "ours" or "embed" not in split_method(m)[1]]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        model = build_model(root / "model", shape)
        runs: dict[tuple[str, str], list[dict]] = {}
        for impl, m in tqdm(pairs * args.repeat, desc="runs", unit="run"):
            runs.setdefault((impl, m), []).append(spawn(impl, m, model, root / f"{impl}-{m}", args, shape["vocab_size"]))
        rows = [median_run(r) for r in runs.values()]
    total, adapter = param_counts(shape)
    print(f"\nRandom {shape.get('model_type', 'llama')}, {total / 1e6:.1f}M parameters ({shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}, LoRA adapters {adapter / 1e6:.2f}M, vocab {shape['vocab_size']}), batch {args.batch} x {args.seq} tokens, "
          f"{args.warmup} warm-up + {args.steps} timed steps, bf16 autocast, {args.device}, {torch.get_num_threads()} threads, "
          f"activation checkpointing {'on' if args.grad_checkpointing else 'off'}\n")
    print(report(rows, shape, rates))
    if args.json:
        command = " ".join(["python -m benchmarks.vs_hf", *(sys.argv[1:] if argv is None else argv)])
        doc = {"machine": machine(), "versions": versions(), "command": command,
               "shape_name": args.shape or ("quick" if args.quick else "smollm2-135m"), "shape": shape,
               "params": total, "adapter_params": adapter, "seq": args.seq, "batch": args.batch, "steps": args.steps,
               "warmup": args.warmup, "repeat": args.repeat, "device": args.device, "grad_checkpointing": bool(args.grad_checkpointing),
               "compile": bool(args.compile),
               "matmul_tflops": rates, "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
