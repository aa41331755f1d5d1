"""benchmarks/RESULTS.md from the JSON files the benchmarks write, optionally running them first.

    OMP_NUM_THREADS=2 python -m benchmarks.report --run     # run every CPU benchmark (~25 min on 2 cores), then write
    python -m benchmarks.report                             # rewrite RESULTS.md from benchmarks/results/*.json
    OMP_NUM_THREADS=2 python -m benchmarks.report --run --only vs_hf_quick,methods   # re-run some, then write

Every number in RESULTS.md comes from a JSON file in benchmarks/results/ (which says the command,
machine and versions that produced it), except the profiling findings, which are prose written from
profiles taken with `python -m benchmarks.vs_hf --profile` and `python -m benchmarks.memory_breakdown`
and say so. GPU files (written by benchmarks/gpu.sh) get their own section when present.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "benchmarks" / "RESULTS.md"

# name -> (module, arguments); each writes benchmarks/results/<name>.json (scaling also a PNG)
RUNS: dict[str, tuple[str, list[str]]] = {
    "vs_hf_quick": ("benchmarks.vs_hf", ["--quick", "--repeat", "3"]),
    "vs_hf_quick_seq512": ("benchmarks.vs_hf", ["--quick", "--seq", "512", "--repeat", "3"]),
    "vs_hf_smollm2": ("benchmarks.vs_hf", ["--repeat", "3"]),
    "vs_hf_smollm2_ckpt": ("benchmarks.vs_hf", ["--methods", "lora,qlora", "--grad-checkpointing"]),
    # eager and torch.compile rows side by side (ours --compile, HF torch_compile=True); compiling falls in the warm-up
    "vs_hf_smollm2_compile": ("benchmarks.vs_hf", ["--methods", "lora", "--compile", "--warmup", "3"]),
    "vs_hf_qwen05b": ("benchmarks.vs_hf", ["--shape", "qwen2.5-0.5b", "--methods", "lora,qlora,qlora+embed", "--seq",
                                           "256", "--batch", "1", "--steps", "3", "--warmup", "1"]),
    "memory_qwen05b": ("benchmarks.memory_breakdown", ["--shape", "qwen2.5-0.5b", "--methods", "lora,qlora,qlora+embed",
                                                       "--seq", "256", "--batch", "1"]),
    "memory_qwen05b_ckpt": ("benchmarks.memory_breakdown", ["--shape", "qwen2.5-0.5b", "--methods",
                                                            "lora,qlora,qlora+embed", "--seq", "256", "--batch", "1",
                                                            "--grad-checkpointing"]),
    "memory_qwen15b": ("benchmarks.memory_breakdown", ["--shape", "qwen2.5-1.5b", "--methods", "lora,qlora,qlora+embed",
                                                       "--seq", "256", "--batch", "1"]),
    "memory_smollm2": ("benchmarks.memory_breakdown", ["--shape", "smollm2-135m", "--seq", "512", "--batch", "2"]),
    "methods": ("benchmarks.methods", []),
    "scaling": ("benchmarks.scaling", ["--quick", "--png", "benchmarks/results/scaling.png"]),
    "dropout": ("benchmarks.dropout", []),
    "attention": ("benchmarks.attention", ["--rounds", "9"]),
    "profile": ("benchmarks.profile", []),
}
BEFORE_COMMIT = "b23434d"  # the code before the activation-memory work (results/before_*.json)
LOSS_COMMIT = "ecc8aaa"  # loss chunks sized in bytes; results/pre_ecc8aaa_*.json were measured just before it
FUSED_LOSS_COMMIT = "8ba74d3"  # the head's cross-entropy gradient computed in forward


def run(names: list[str]) -> None:
    from tqdm import tqdm

    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in tqdm(names, desc="benchmarks", unit="run"):
        module, extra = RUNS[name]
        cmd = [sys.executable, "-m", module, *extra, "--json", f"benchmarks/results/{name}.json"]
        subprocess.run(cmd, cwd=ROOT, check=True)


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ------------------------------------------------------------------------------------ tables
def by_impl(doc: dict) -> dict[tuple[str, str], dict]:
    return {(r["impl"], r["method"]): r for r in doc["rows"] if "error" not in r}


def ratios(doc: dict) -> dict[str, tuple[float, float]]:
    """method -> (tokens/s ours/hf, peak memory ours/hf)."""
    rows = by_impl(doc)
    out = {}
    for m in dict.fromkeys(r["method"] for r in doc["rows"]):
        if ("ours", m) in rows and ("hf", m) in rows:
            o, h = rows[("ours", m)], rows[("hf", m)]
            out[m] = (o["tokens_per_s"] / h["tokens_per_s"], o["peak_mem_mib"] / h["peak_mem_mib"])
    return out


def describe(doc: dict) -> str:
    s = doc["shape"]
    runs = f", {doc['repeat']} runs per row (the one with the median tokens/s)" if doc.get("repeat", 1) > 1 else ""
    return (f"{doc.get('shape_name', '?')} shape ({doc.get('params', 0) / 1e6:.1f}M parameters, {s['num_hidden_layers']} layers, "
            f"hidden {s['hidden_size']}, {s['num_attention_heads']}/{s['num_key_value_heads']} heads, vocab {s['vocab_size']}), "
            f"batch {doc['batch']} x {doc['seq']}, {doc['warmup']} warm-up + {doc['steps']} timed steps{runs}, "
            f"activation checkpointing {'on (both sides)' if doc.get('grad_checkpointing') else 'off'}, {doc.get('device', 'cpu')}")


def vs_hf_table(doc: dict) -> str:
    lines = ["| impl | method | tokens/s | step s (min-max) | peak MiB | of which at load | abs VmHWM MiB | final loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['method']} | failed: {' '.join(r['error'])[:100]} | | | | | |")
            continue
        lines.append(f"| {r['impl']} | {r['method']} | {r['tokens_per_s']:,.1f}{_spread(r)} | {min(r['step_s']):.2f}-{max(r['step_s']):.2f} | "
                     f"{r['peak_mem_mib']:,.0f} | {r['load_peak_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | {r['final_loss']:.4f} |")
    lines += ["", "| method | tokens/s ours/hf | peak memory ours/hf | utilisation ours / hf (% of bf16 matmul) |", "|---|---:|---:|---:|"]
    rows = by_impl(doc)
    for m, (t, mem) in ratios(doc).items():
        util = [_util(doc, rows[(i, m)]) for i in ("ours", "hf")]
        lines.append(f"| {m} | {t:.2f} | {mem:.2f} | {util[0]:.0f}% / {util[1]:.0f}% |")
    rates = doc["matmul_tflops"]
    lines += ["", f"Matmul ceiling measured in the same run: bf16 {rates['bf16']:.2f} TFLOP/s, fp32 {rates['fp32']:.2f} TFLOP/s."]
    return "\n".join(lines)


def _spread(row: dict) -> str:
    """" (min-max of n runs)" for a row picked from repeated runs, else nothing."""
    runs = row.get("runs_tokens_per_s", [])
    return f" ({min(runs):,.0f}-{max(runs):,.0f}, {len(runs)} runs)" if len(runs) > 1 else ""


def _util(doc: dict, row: dict) -> float:
    from benchmarks.vs_hf import flops_per_token

    return 100 * flops_per_token(row["method"], doc["shape"]) * row["tokens_per_s"] / (doc["matmul_tflops"]["bf16"] * 1e12)


def before_after(pairs: list[tuple[str, dict, dict]]) -> str:
    lines = [("| shape | method | ours tokens/s before → after | ours peak MiB before → after | "
              "ratio to HF before → after (tokens/s) | (memory) |"), "|---|---|---:|---:|---:|---:|"]
    for label, before, after in pairs:
        rb, ra = by_impl(before), by_impl(after)
        qb, qa = ratios(before), ratios(after)
        for m in qa:
            if ("ours", m) in rb and m in qb:
                lines.append(f"| {label} | {m} | {rb[('ours', m)]['tokens_per_s']:,.0f} → {ra[('ours', m)]['tokens_per_s']:,.0f} | "
                             f"{rb[('ours', m)]['peak_mem_mib']:,.0f} → {ra[('ours', m)]['peak_mem_mib']:,.0f} | "
                             f"{qb[m][0]:.2f} → {qa[m][0]:.2f} | {qb[m][1]:.2f} → {qa[m][1]:.2f} |")
    return "\n".join(lines)


def targets(docs: dict[str, dict]) -> str:
    lines = ["| target | measured | met? |", "|---|---|---|"]
    cpu512 = [(n, d) for n, d in docs.items() if n.startswith("vs_hf") and d and d.get("device", "cpu") == "cpu"
              and d["seq"] >= 512 and not d.get("grad_checkpointing")]
    for method in ("lora", "qlora"):
        for k, (what, goal, ok) in enumerate((("tokens/s", "≥ 1.3× HF", lambda x: x >= 1.3),
                                               ("peak memory", "≤ 0.7× HF", lambda x: x <= 0.7))):
            found = [(n, ratios(d)[method][k]) for n, d in cpu512 if method in ratios(d)]
            text = ", ".join(f"{v:.2f}× ({n.removeprefix('vs_hf_')})" for n, v in found) or "not measured"
            met = "yes" if found and all(ok(v) for _, v in found) else ("partly" if any(ok(v) for _, v in found) else "no")
            lines.append(f"| {'QLoRA' if method == 'qlora' else 'LoRA'} {what} {goal} at seq ≥ 512, CPU | {text} | {met} |")
    for name, doc in docs.items():
        if name.startswith("memory_") and doc and doc["shape_name"] != "smollm2-135m":
            lines += _quarter_rows(doc)
    return "\n".join(lines)


def _quarter_rows(doc: dict) -> list[str]:
    """The 0.45 target's rows of one memory_breakdown file: each QLoRA variant's peak over LoRA's."""
    peaks = {r["method"]: r["peak_mib"] for r in doc["rows"] if "error" not in r}
    setting = (f"{doc['shape_name']} shape, batch {doc['batch']} x {doc['seq']}, activation checkpointing "
               f"{'on' if doc.get('grad_checkpointing') else 'off'}")
    lines = []
    for method, label in (("qlora", "QLoRA (bf16 embedding, as bitsandbytes + PEFT)"),
                          ("qlora+embed", "QLoRA --quantize-embeddings")):
        if method in peaks and "lora" in peaks:
            r = peaks[method] / peaks["lora"]
            lines.append(f"| {label} peak ≤ 0.45× our LoRA | {r:.2f} ({setting}: {peaks[method]:,.0f} / "
                         f"{peaks['lora']:,.0f} MiB) | {'yes' if r <= 0.45 else 'no'} |")
    return lines


def methods_table(doc: dict) -> str:
    from benchmarks.methods import table

    return doc["header"] + "\n\n" + table(doc["rows"], doc["params"])


def scaling_table(doc: dict) -> str:
    lines = ["| sweep | shape | parameters | seq | batch | activation checkpointing | s/step | peak MiB |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for kind in ("seq_sweep", "size_sweep"):
        for r in doc[kind]:
            cell = "failed | " if "error" in r else f"{r['step_s_mean']:.2f} | {r['peak_mem_mib']:,.0f}"
            lines.append(f"| {kind.removesuffix('_sweep')} | {r['shape_name']} | {r['params'] / 1e6:.0f}M | {r['seq']} | "
                         f"{r['batch']} | {'on' if r['grad_checkpointing'] else 'off'} | {cell} |")
    return "\n".join(lines)


def memory_table(doc: dict) -> str:
    from benchmarks.memory_breakdown import report

    return report(doc["rows"], argparse.Namespace(seq=doc["seq"], batch=doc["batch"]))


def memory_heading(doc: dict) -> str:
    ckpt = ", activation checkpointing on" if doc.get("grad_checkpointing") else ""
    return f"## What holds the memory: {doc['shape_name']} shape, batch {doc['batch']} x {doc['seq']}{ckpt}"


def _relative(command: str) -> str:
    """A recorded command with this checkout's absolute path taken out, as a user would type it."""
    return command.replace(str(ROOT) + "/", "")


def machine_line(doc: dict) -> str:
    m, v = doc["machine"], doc["versions"]
    gpu = f", GPU {m['gpu']} ({m['gpu_mem_gib']} GiB)" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores']} cores, {m.get('mem_gib', '?')} GiB RAM, {m['threads']} torch threads, "
            f"CPU bf16 units: {m['bf16_units']}{gpu}; {m['platform']}. Python {v['python']}, torch {v['torch']}, "
            f"transformers {v['transformers']}, peft {v['peft']}, bitsandbytes {v['bitsandbytes']}, accelerate {v['accelerate']}.")


# ------------------------------------------------------------------------------------ document
def dropout_table(d: dict) -> str:
    """Mask draw time and LoRA step time under each mask path, measured in one process."""
    names = list(d["mask_ms"])
    before, after = names
    lines = [f"SmolLM2-135M's shape, {d['batch']} x {d['seq']} tokens, p = {d['p']}, LoRA r 16 on q,k,v,o, bf16 autocast; "
             "the two paths alternate in one process (median step of each round, median over rounds).", "",
             "| mask path | one mask (ms) | LoRA step (s) | tokens/s |", "|---|---:|---:|---:|"]
    for name in names:
        lines.append(f"| {name} | {d['mask_ms'][name]:.2f} | {d['step_s'][name]:.3f} | {d['tokens_per_s'][name]:,.0f} |")
    lines += ["", f"after / before: masks {d['mask_ms'][before] / d['mask_ms'][after]:.1f}x faster, step "
              f"{d['step_s'][before] / d['step_s'][after]:.2f}x the tokens/s."]
    return "\n".join(lines)


def attention_table(d: dict) -> str:
    """Per sequence length: every attention candidate (one layer, fwd + bwd), the matmul ceiling, the projections."""
    layers = d["layers"]
    lines = [f"SmolLM2-135M's attention (batch {d['batch']}, 9 query / 3 kv heads, head dim 64), bf16 inputs as the "
             "decoder makes them; candidates alternate in one process, best of the rounds (the median is in the JSON). Per step = per layer "
             f"x {layers} layers.", ""]
    for T, e in d["seqs"].items():
        cur = next(iter(e["attention_ms"].values()))["fwd_bwd"]  # the first candidate: SDPA, the path before
        gflop = e["gflop_fwd_bwd"]
        ideal = {k: gflop / r * 1e3 for k, r in e["bmm_gflops"].items()}  # ms per layer at that matmul rate
        lines += [f"**{d['batch']} x {T} tokens**: causal attention is {gflop:.2f} GFLOP per layer forward + backward; at "
                  f"the rate of its own Q K^T batched matmul (bf16 {e['bmm_gflops']['bf16']:.0f}, fp32 "
                  f"{e['bmm_gflops']['fp32']:.0f} GFLOP/s) that is {ideal['bf16']:.1f} / {ideal['fp32']:.1f} ms per layer.",
                  "", "| path | fwd + bwd ms / layer | per step (ms) | fwd ms / layer | speed vs SDPA |", "|---|---:|---:|---:|---:|"]
        for name, t in e["attention_ms"].items():
            fwd = f"{t['fwd']:.2f}" if "fwd" in t else "-"
            lines.append(f"| {name} | {t['fwd_bwd']:.2f} | {t['fwd_bwd'] * layers:,.0f} | {fwd} | "
                         f"{cur / t['fwd_bwd']:.2f}x |")
        lines += ["", "| frozen projections, fwd + input grad | separate (ms) | one concatenated matmul (ms) | "
                  "per step saved (ms) |", "|---|---:|---:|---:|"]
        for group, t in e["projection_ms"].items():
            lines.append(f"| {group} | {t['separate']:.2f} | {t['concatenated']:.2f} | "
                         f"{(t['separate'] - t['concatenated']) * layers:,.0f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def profile_table(d: dict) -> str:
    """Where one LoRA step's time goes before and after models.attention, the A/B step times, eager vs compiled."""
    first = next(iter(d["profile"].values()))
    lines = [f"One LoRA step (r 16 on q,k,v,o, dropout 0.05, bf16 autocast) at {d['shape']}'s shape, {d['batch']} x "
             f"{d['seq']} tokens, under torch.profiler (self CPU time per op, bucketed by benchmarks.profile.BUCKETS; the "
             "profiler's own overhead inflates the total).", "",
             "| attention | step (profiled) | " + " | ".join(first["buckets_ms"]) + " |",
             "|---|---:|" + "---:|" * len(first["buckets_ms"])]
    for name, p in d["profile"].items():
        total = sum(p["buckets_ms"].values())
        lines.append(f"| {name} | {p['step_ms']:,.0f} ms | " + " | ".join(
            f"{v:,.0f} ms ({100 * v / total:.0f} %)" for v in p["buckets_ms"].values()) + " |")
    a = d.get("attention")
    if a:
        first_name = next(iter(a["best_step_s"]))
        lines += ["", "The same model stepping with each attention path in turn (no profiler):", "",
                  f"| attention | best step (s) | median step (s) | tokens/s (best) | vs {first_name}: best | median |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k in a["best_step_s"]:
            lines.append(f"| {k} | {a['best_step_s'][k]:.3f} | {a['median_step_s'][k]:.3f} | {a['tokens_per_s'][k]:,.0f} | "
                         f"{a['best_step_s'][first_name] / a['best_step_s'][k]:.2f}x | "
                         f"{a['median_step_s'][first_name] / a['median_step_s'][k]:.2f}x |")
    c = d.get("compile")
    if c:
        be = c["break_even_steps"]
        lines += ["", "Eager vs every block compiled (`--compile`), two copies of the model stepping alternately:", "",
                  "| | first step (s) | second step (s) | best later step (s) | median later step (s) | tokens/s (best) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k in ("eager", "compiled"):
            lines.append(f"| {k} | {c['first_step_s'][k]:.2f} | {c['second_step_s'][k]:.2f} | {c['best_step_s'][k]:.3f} "
                         f"| {c['median_step_s'][k]:.3f} | {c['tokens_per_s'][k]:,.0f} |")
        lines += ["", f"Compile overhead {c['compile_overhead_s']:.0f} s; steady state {c['best_step_s']['eager'] / c['best_step_s']['compiled']:.2f}x "
                  "eager's tokens/s; " + (f"pays after about {be:.0f} steps." if be is not None else "never pays back.")]
    return "\n".join(lines)


def render() -> str:
    docs = {n: load(n) for n in RUNS}
    docs.update({n: load(n) for n in ("gpu_vs_hf_smollm2", "gpu_vs_hf_qwen05b", "gpu_scaling")})
    first = next((d for d in docs.values() if d), None)
    if first is None:
        raise SystemExit(f"no results in {RESULTS}: run `python -m benchmarks.report --run` first")
    out = [HEADER, "## Machine and versions", "", machine_line(first), "", NOISE, "", "## Commands", "",
           "Regenerate everything on the CPU (about 25 minutes on 2 cores) and rewrite this file:", "",
           "    OMP_NUM_THREADS=2 python -m benchmarks.report --run", "", "which runs, each writing benchmarks/results/NAME.json:", ""]
    for name, doc in docs.items():
        if doc and not name.startswith("gpu"):
            out.append(f"    {_relative(doc.get('command', '?')):<100}  # {name}")
    out += ["", "## Targets (measured, not asserted in tests)", "", targets(docs), "", TARGET_NOTES, ""]
    out += ["## Ours vs Hugging Face Trainer + PEFT", ""]
    for name in ("vs_hf_quick", "vs_hf_quick_seq512", "vs_hf_smollm2", "vs_hf_smollm2_ckpt", "vs_hf_smollm2_compile",
                 "vs_hf_qwen05b"):
        if docs.get(name):
            out += [f"### {name}: {describe(docs[name])}", "", vs_hf_table(docs[name]), ""]
    pairs = [(label, load(f"before_{name}"), load(after)) for label, name, after in
             (("quick 33M, 2 x 512", "vs_hf_quick_seq512", "vs_hf_quick_seq512"),
              ("SmolLM2-135M, 2 x 512, without the loss changes", "vs_hf_smollm2", f"pre_{LOSS_COMMIT}_vs_hf_smollm2"),
              ("SmolLM2-135M, 2 x 512, with them", "vs_hf_smollm2", "vs_hf_smollm2"))]
    pairs = [p for p in pairs if p[1] and p[2]]
    if pairs:
        out += ["### Before and after the trainer changes", "",
                (f"\"before\" is the code of commit {BEFORE_COMMIT} run by `benchmarks/vs_hf.py` of that commit on this "
                 "machine on the same day as the \"after\" runs (files results/before_*.json); \"after\" is the current code. "
                 f"HF runs in both. At the SmolLM2-135M shape \"after\" is shown twice: the activation changes alone (measured just "
                 f"before the loss changes of commits {LOSS_COMMIT} and {FUSED_LOSS_COMMIT}: results/pre_{LOSS_COMMIT}_*.json) and "
                 "with the loss changes (the current code). Step "
                 "times on this VM vary by 10-20 % between runs of the same code (compare the HF rows), so only the memory "
                 "columns and large speed changes are beyond noise."), "",
                before_after(pairs), ""]
    memory = [name for name in RUNS if name.startswith("memory_") and docs.get(name)]
    for name in memory:
        d = docs[name]
        out += [memory_heading(d), "", f"`{_relative(d['command'])}`", "", memory_table(d), ""]
    if memory:
        out += [MEMORY_NOTES, ""]
    if docs.get("methods"):
        out += ["## Every method on one model (`python -m benchmarks.methods`)", "", methods_table(docs["methods"]), "",
                METHODS_NOTES, ""]
    if docs.get("dropout"):
        out += ["## LoRA dropout masks, before and after (`python -m benchmarks.dropout`)", "", dropout_table(docs["dropout"]),
                ""]
    if docs.get("attention"):
        out += ["## Attention paths and concatenated projections (`python -m benchmarks.attention`)", "",
                attention_table(docs["attention"]), "", ATTENTION_NOTES, ""]
    if docs.get("profile"):
        out += ["## Profile of a LoRA step, and `--compile` (`python -m benchmarks.profile`)", "",
                profile_table(docs["profile"]), "", COMPILE_NOTES, ""]
    if docs.get("scaling"):
        out += ["## Scaling with sequence length and model size (`python -m benchmarks.scaling --quick`)", "",
                "![scaling](results/scaling.png)", "", scaling_table(docs["scaling"]), ""]
    out += ["## GPU", ""]
    if docs.get("gpu_vs_hf_smollm2") or docs.get("gpu_vs_hf_qwen05b"):
        out += [machine_line(docs.get("gpu_vs_hf_smollm2") or docs["gpu_vs_hf_qwen05b"]), ""]
        for name in ("gpu_vs_hf_smollm2", "gpu_vs_hf_qwen05b"):
            if docs.get(name):
                out += [f"### {name}: {describe(docs[name])}", "", vs_hf_table(docs[name]), ""]
        if docs.get("gpu_scaling"):
            out += ["![gpu scaling](results/gpu_scaling.png)", "", scaling_table(docs["gpu_scaling"]), ""]
    else:
        out += [("Not measured: no GPU was available. `bash benchmarks/gpu.sh` runs the same comparisons on one CUDA GPU "
                 "(about 5 minutes) and writes benchmarks/results/gpu_*.json; `python -m benchmarks.report` then fills this "
                 "section."), ""]
    out += [FINDINGS]
    return "\n".join(out).rstrip() + "\n"


HEADER = """# Benchmarks: this trainer vs Hugging Face Trainer + PEFT (issue #7)

Generated by `python -m benchmarks.report` from benchmarks/results/*.json; do not edit by hand.

`python -m benchmarks.vs_hf` trains one random model in a published shape, with the same synthetic token rows,
sequence length, batch, steps, optimizer (AdamW, constant lr, no weight decay, clip 1.0), LoRA settings (r=16,
alpha=32, dropout 0.05 on q,k,v,o), precision (bf16 autocast) and activation-checkpointing setting, twice.
**ours** is `train.methods` (Method.build) + `train.loop.train_step`, the functions `train.run` calls. **hf** is
`AutoModelForCausalLM` + `peft.get_peft_model` + `Trainer(TrainingArguments(bf16=True, use_cpu=True))`; for QLoRA
it adds `BitsAndBytesConfig(nf4, double quant, bf16 compute)` (bitsandbytes runs its own CPU code: the optional
`kernels` package is not installed). Each run has its own fresh process. Frozen LoRA/QLoRA bases are bf16 on both
sides; full fine-tuning keeps fp32 weights on both sides.

* **tokens/s**: tokens ÷ wall time of the timed steps, after the untimed warm-up steps.
* **peak MiB**: VmHWM − VmRSS, where VmRSS is read after that process's imports and before the model exists
  (cancels the different import footprints; transformers + peft cost about 170 MiB more). "of which at load" is
  the same right after the model is built. "abs VmHWM" is the raw peak resident set. On a GPU: max_memory_allocated.
* **utilisation**: achieved FLOP/s (6N per token for full fine-tuning; 4N_frozen + 6N_adapter for LoRA, whose frozen
  weights need no weight gradient; attention FLOPs left out) ÷ a 2048³ bf16 `torch.matmul` timed in the same run.
"""

NOISE = """Timings on this 2-core VM vary by ±10 % from run to run (see the step-time ranges), more when anything else
runs; every command here was run with nothing else running. Ratios within one file come from one invocation."""

TARGET_NOTES = """Speed and memory against HF at 2 x 512 tokens (each row the median of 3 runs, ours and HF alternating in fresh
processes, dropout 0.05, bf16 autocast, no checkpointing on either side, no `--compile` on either side): met for LoRA
and QLoRA at both shapes (the vs_hf_quick_seq512 and vs_hf_smollm2 tables). Utilisation at 135M: LoRA 35.5 % and
QLoRA 37 % of the bf16 matmul rate measured in the same run (HF: 25 % and 21 %).

What changed since the 1.13x measured when issue #19 was filed, in order (each change's before -> after is in the
section named):
1. LoRA dropout masks from NumPy's SFC64 instead of `bernoulli_` (lora.dropout; masks 7.7x faster: "LoRA dropout
   masks").
2. Training attention as bf16 batched matmuls (models.attention) instead of SDPA's CPU kernel, which runs bf16 at the
   float32 rate; then the same in blocks of 128 query positions, so that a block reads only the keys before it and
   its scores stay in cache (one layer at 2 x 512: SDPA 30 ms, one [T, T] block 24 ms, blocks 12 ms: "Attention
   paths"; whole step: "Profile").
3. The 4-bit matmuls reach bitsandbytes' CPU dequantization kernel by loading its native library by path, where
   they used to import the package: that import alone is ~120 MiB of resident memory (about 1,400 modules, sympy and
   networkx among them), more than the quick shape's 4-bit weights. HF's side imports bitsandbytes before its
   baseline is read, ours did it during the first step, so it counted in our peak only. QLoRA's peak at the quick
   shape, 2 x 512: 427 -> 384 MiB (now below our LoRA's 429), 0.73x -> 0.64x HF's. The 4-bit weights also decode as
   one flat row, which bitsandbytes' kernel does exactly for any shape made of whole blocks (a 512 x 1,376 down_proj
   used to fall back to the table lookup: 1.19 -> 0.13 ms).
4. The loss takes one fused log-softmax per chunk instead of logsumexp's full-size temporaries (about 20 ms of 65 ms
   of elementwise work per 341 x 49,152 chunk, ~60 ms a step at 135M).
Both sides still do the same matmul work in the same library kernels; what is ours alone is the chunked loss (no
float32 [batch, seq, vocab] logits, no second head matmul in backward), the hand-written adapter backward
(lora.lowrank) and these four.

What bounds the step now (profile at 135M, the blocked path): matmuls 50 %, elementwise work (norms, rotary, SwiGLU,
casts, dropout masks, the loss's softmax) 25 %, attention 15 %, other 10 % (see "Profile"); the matmuls themselves
run at 80-90 % of the 2048^3 rate (a profile grouped by input shape, not in the JSON: the MLP's [1024, 576] x
[576, 1536] products at 590-690 GFLOP/s). The elementwise work is what a compiler
could fuse, but `--compile` is slower than eager here; the concatenated q/k/v and gate/up projections were measured
and save under 1 % of the step (see "Attention paths"), so they were not built.

Memory, QLoRA over LoRA. bitsandbytes + PEFT, and `--method qlora` by default, keep the embedding and output head in
bf16. At Qwen2.5's shapes that table (151,936 rows) is a large share of what QLoRA leaves: 260 MiB at 0.5B, more than
its 24 blocks' 4-bit linears (176 MiB). Held in bf16, it alone keeps QLoRA/LoRA above 0.45 at 0.5B: (4-bit block
linears + bf16 embedding) / (bf16 model) = 436 / 942 MiB = 0.46 with nothing else in memory. `--quantize-embeddings`
(quant/embedding.py) holds it in NF4 (67 MiB) and the loss reads the 4-bit head 8,192 vocabulary rows at a time; with it
QLoRA reaches 0.43 at the 1.5B shape and 0.34 at 0.5B with activation checkpointing. Without checkpointing at 0.5B and
1 x 256 tokens the parts every method shares (196 MiB of saved activations, the optimizer state, heap slack and
library workspaces) keep it at 0.47. (These ratios fell by 0.04-0.06 when the 4-bit path stopped importing
bitsandbytes' Python package, change 3 above.)"""

METHODS_NOTES = """tokens/s counts target tokens; the demo rows are short (about 50 target tokens per step), so per-step costs
that do not depend on the batch dominate: QLoRA dequantizes every 4-bit weight twice per step, which is why it is
slower than LoRA here while it is close to LoRA at 512+ tokens per step above. Peak memory is the whole process's
VmHWM. Each method runs once for 6 timed steps, so tokens/s here varies 20-40 % between runs on this 2-core VM
(three runs of the current code: full 154-179 tokens/s, LoRA 296-404)."""

MEMORY_NOTES = """"weights" and "adapter grads + AdamW state" are measured tensor bytes; "saved activations" are the storages
autograd holds after one forward (measured with saved_tensors_hooks); the loss transient is counted from the shapes
(train.loss keeps one chunk of target rows of float32 logits, reused in place for their gradient, and its bf16 copy;
for qlora+embed the chunk spans one 8,192-row vocabulary slice). The measured peak covers loading and two training
steps. The rest is the glibc heap's slack, oneDNN and OpenMP workspaces and short-lived temporaries: after a step at the
0.5B shape `malloc_trim` hands back about 250 MiB that glibc keeps for the next step."""

ATTENTION_NOTES = """Why SDPA was slow (issue #19: ~10 % of the matmul rate): PyTorch's CPU flash kernel runs bf16 inputs no
faster than float32 ones (compare the "fp32 inputs" row), so its block products go at about the float32 matmul
rate, not the bf16 one (the batched-matmul rates above), and its backward recomputes the scores tile by tile.
Neither layout (contiguous vs the decoder's transposed views), GQA handling (enable_gqa vs repeat_interleave), an
explicit mask instead of is_causal nor the math backend changes that; one thread is slower than two.
models.attention runs the products as bf16 batched matmuls instead, with q grouped per kv head (no k/v copies), the
causal bias and 1/sqrt(D) folded into one baddbmm, one softmax pass forward and one softmax-backward pass backward;
the scores are recomputed in backward, so nothing [T, T] is kept (as with flash). The naive version of the same idea
(float32 copies of the scores) wins in the matmuls and loses it again in [T, T] elementwise passes. As one [T, T]
block it was more than twice as fast as SDPA at 128 tokens, about level at 512 and half as fast at 1024: the scores
of a whole row block outgrow the caches. Taken 128 query positions at a time (the rows of a block are those
positions' query heads, so each block is one batched matmul against the keys before it), the masked upper triangle
is mostly skipped (10/16 of the full work at 512) and each block's scores stay in cache: blocks of 64 and 256 were
both slower than 128 at 512 tokens, and the blocked path beats SDPA at every length measured, up to 2,048 tokens.
So the decoder takes it for bf16 self-attention without mask or cache up to 2,048 tokens (models.attention.MAX_SEQ)
and SDPA everywhere else (float32, padding and packing masks, KV cache, prefixes, longer rows). Numerics: the scores are rounded to bf16 before the softmax, as in transformers' eager
attention under bf16; tests/test_attention.py holds its error against float32 SDPA to at most 3x bf16 SDPA's own,
and float32 runs (every transformers-equivalence test) take SDPA as before. The minimum over rounds is the
quiet-machine estimate; the medians (JSON) show the noise.

Concatenated frozen projections (issue #19's second item): one matmul on [W_q; W_k; W_v] instead of three saves
about 0.1-0.2 ms per layer (a few ms of a 30-layer step, well under 1 %), one on [W_gate; W_up] nothing
measurable. Not adopted: it would make the decoder reach into LoRA's and NF4's base layers (and keep a second
copy of the frozen weights) for no measurable gain."""

COMPILE_NOTES = """`--compile` (train.run; off by default) compiles each decoder block in place with `nn.Module.compile`, so
state-dict keys, PEFT adapter files and checkpoints are unchanged; the 30 blocks share two graphs (block 0, whose
input needs no gradient, and the rest), so compiling costs one block's compile, not thirty. LoRA's NumPy-drawn
dropout masks (lora.dropout) cannot be traced and would split every block's graph at each adapted linear, so under
compile the adapter term is written in plain ops with a `bernoulli_` mask (lora.linear._traced_lora_term: still an
independent Bernoulli(1 - p) keep-mask scaled by 1 / (1 - p), drawn from torch's seeded state, but not the masks of
an eager run); tests/test_compile.py checks that compiled blocks give eager's logits and gradients and the same
state-dict keys. It does not pay on this CPU at this shape: the steady-state step is slower than eager's (the
table above), and the first step carries the compile (about 45 s with a cold inductor cache in an earlier run of
this benchmark on the loaded machine; less when inductor's on-disk cache already holds the graphs, as it may for the
run above). The matmuls and attention run in the same library kernels compiled or not, and what the compiler can
fuse (the elementwise work) is about a fifth of the step; the compiled step also loses lora.lowrank's hand-written
adapter backward. On the quick 33M shape with LoRA dropout off and SDPA attention it was about 15 % faster per step
(0.18 vs 0.21 s at 2 x 256 tokens in a side test, not recorded here), after a 17 s compile. `python -m benchmarks.vs_hf --compile` runs every method also compiled on both sides
(ours `--compile`, HF `TrainingArguments(torch_compile=True)`), rows beside the eager ones
(vs_hf_smollm2_compile when present)."""


FINDINGS = """## Profiling findings and what was changed (issue #7: memory, the loss, 4-bit scratch buffers)

Issue #19's changes (dropout masks, blocked attention, the bitsandbytes import, the loss's log-softmax) are
described with their tables above and in the target notes.

Profiles: `python -m benchmarks.vs_hf --quick --seq 512 --profile --methods lora,qlora` (torch.profiler, one step),
saved tensors counted per autograd node with saved_tensors_hooks, and live tensor bytes tracked with a
TorchDispatchMode over one forward + backward (ours and HF in the same script). Numbers quoted here are from those
profiling runs (quick shape, 2 x 512 unless stated), not from the JSON files.

1. **Before the changes the extra memory was not in what autograd saved.** Ours and HF saved the same 197 MiB of
   activations at 2 x 256 (not counting the loss's logits), because they compute the same thing: per adapted linear
   nn.Dropout's float32 noise tensor (4 bytes per element) and autocast's bf16 copy of the dropped input for A's
   matmul (after a float32 copy of the input, as the adapters are float32); RMSNorm kept a float32 copy of its
   input; SwiGLU kept gate, silu(gate) and up. The live tensor peaks were about equal too (245 vs 253 MiB at
   2 x 256), yet ours had the higher peak resident set (805 vs 632 MiB at 2 x 512): the glibc heap. Our loader
   pins glibc's mmap threshold to 32 MiB after loading, so every training tensor below 32 MiB came from the heap
   and freed blocks stayed resident (with a 1 MiB threshold the same run peaked at 588 MiB, but 40 % slower).
   So the fix was to allocate less, not to tune the allocator.
2. **LoRA update as one autograd function** (`lora/lowrank.py`): keeps x in the compute dtype (one tensor for q, k
   and v, which read the same input), a one-byte keep mask, and the rank-r product; drop(x) is recomputed in
   backward. (The mask came from `bernoulli_`, nn.Dropout's own draws, until issue #19 moved it to NumPy's SFC64:
   "LoRA dropout masks" above.)
   Saved bytes per adapted input element: 6 → 1, plus 2 for x itself, shared by q, k and v.
3. **RMSNorm as one autograd function** (`models/rmsnorm.py`): same forward ops (bit-identical output), backward from
   x and rstd; saves the float32 copy of every norm input (4 → 2 bytes per element under bf16).
4. **SwiGLU as one autograd function** (`models/swiglu.py`): keeps gate and up, recomputes silu(gate); one
   intermediate-width tensor less per block, gradients bit-identical to the two-op version.
5. **Rotary tables cached per (length, dtype, device)** (`models/decoder.py`): computed once, [1,1,T,D] instead of
   [B,1,T,D] every step; equal to recomputation.
6. **QLoRA speed**: the 4-bit path itself was unchanged by 2-5 (8 below changed where it dequantizes into); it got
   faster with the LoRA changes (no float32 casts of the inputs). Caching dequantized weights between forward and backward was rejected: it would hold a bf16 copy of
   every block weight, which is what QLoRA exists to avoid.

7. **The loss** (`train/loss.py`, commits ecc8aaa and 8ba74d3). It kept up to 2,048 target rows of float32 logits per
   chunk and recomputed each chunk in backward, so the logits, their log-softmax and their gradient coexisted (575 MiB
   at 2 x 512 with a 49,152 vocabulary, 443 MiB at 1 x 256 with 151,936), a second vocabulary-sized matmul ran in
   backward, and the target rows were gathered even when every row is a target. Now each chunk holds at most 64 MiB of
   float32 logits; its d(loss)/d(logits) = softmax − onehot is computed in the forward pass, in the logits' memory,
   and turned into the gradients of the hidden states (and of the head when it trains) at once; backward only scales
   them; the gather is skipped when every position is a target. Float32 losses and gradients equal plain
   cross-entropy (tests/test_loss.py). Effect at the SmolLM2-135M shape, ours alone, before → after the loss changes:
   LoRA 390 → 465 tokens/s and 1,670 → 1,380 MiB; QLoRA 364 → 488 tokens/s and 1,573 → 1,285 MiB (the table above).

8. **4-bit matmuls dequantize into a reused buffer** (`quant/backend.py`, CPU). Logging the resident set after every
   op of a QLoRA step at the 0.5B shape (a TorchDispatchMode) showed it climbing through forward and never coming
   down in backward: each 4-bit linear's dense weight (up to 8.3 MiB) was a fresh allocation, made twice per layer per
   step and freed at once, and between the activations autograd keeps these blocks fragmented glibc's heap. Now each
   thread has one buffer per dtype that bitsandbytes' native CPU kernel writes into (same bits: tests/test_nf4.py).
   Probe step peak 1,213-1,300 → about 1,020 MiB; QLoRA's breakdown peak 1,332 → 1,095 MiB.
9. **The loss freed each chunk too late**: Python kept the previous chunk's float32 logits and bf16 gradient alive
   while the next chunk's were made, so two chunks coexisted (192 instead of 96 MiB at a 152k vocabulary).
10. **`--quantize-embeddings`** (`quant/embedding.py`, `train/loss.py`): the embedding and (tied or not) head in NF4.
   Lookups dequantize only the rows asked for; the head's logits and the loss go 8,192 vocabulary rows at a time (the
   loss with a running logsumexp, then a second pass for softmax − onehot), so the dense table never exists. Equal to
   the dense model holding the NF4 round trip of the table (logits 1e-5, adapter gradients 1e-4 relative:
   tests/test_quantized_embeddings.py). Cost at 0.5B, 1 x 256: one more head matmul per step: 209 → 198 tokens/s (vs_hf_qwen05b).
11. **Loading in another dtype** (`models/safetensors_io.read_tensor`): a float32 checkpoint read into bf16 held both whole
   copies of each tensor (544 + 272 MiB for the 0.5B embedding); it now converts through a 16 MiB staging buffer.
   QLoRA's load peak at 0.5B: 855 → 581 MiB (vs_hf_qwen05b).

Measured effect of 2-4 on our LoRA at 2 x 512 on the quick shape (ours worker alone, one run after the other): peak
805 → 612 MiB after changes 2-3, 608 MiB after 4; live tensor peak 322 MiB against HF's 442 MiB. The JSON-based
before/after table above shows the effect on both shapes.

### Found, not changed

* **glibc mmap threshold after loading** (`models/checkpoint.freed_memory_returned` sets 32 MiB): at the quick shape,
  after changes 2-3, an 8 MiB threshold during training measured 612 → 528 MiB peak at about the same speed, and
  1 MiB 479 MiB at 29 % fewer tokens/s (page faults); at the 135M shape 8 MiB made no difference (its large tensors
  are above 32 MiB anyway), so it was left as it is. With the reused dequantization buffer a 1 or 4 MiB threshold
  no longer lowered QLoRA's peak at 0.5B (1,021-1,031 MiB in the probe), and 4 or 8 MiB moved our LoRA's peak at the
  quick shape, 2 x 512, only from 481-490 to 467-479 MiB.
* **Activation checkpointing** stays off by default (`train/config.py`); the `_ckpt` tables above compare both
  trainers with it on (same settings), and the scaling plot shows its cost and saving.
* **`--quantize-embeddings` stays off by default**: bitsandbytes + PEFT keep the table in bf16, so by default an
  adapter is trained against the base a PEFT user would load; with the flag the adapter records it
  (`lora_training.json`), and generation and `lora.merge` rebuild the same 4-bit table.
* **SwiGLU's saved gate and up** are most of the saved activations (two intermediate-width bf16 tensors per token per
  layer: about 60 % at the 0.5B shape, counted from the shapes); recomputing them from the block input would cost two more 4-bit matmuls per layer, which is
  activation checkpointing for the MLP alone, so it was not done.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("--run", action="store_true", help="run the CPU benchmarks first (about 25 minutes on 2 cores)")
    p.add_argument("--only", help=f"with --run: a comma-separated subset of {', '.join(RUNS)}")
    args = p.parse_args(argv)
    if args.run:
        names = args.only.split(",") if args.only else list(RUNS)
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            p.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
        run(names)
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
