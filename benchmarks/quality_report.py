"""benchmarks/QUALITY.md and its plot, generated from the quality benchmark's JSON (benchmarks.quality).

Every number in the report comes from the JSON; a cell the protocol should have filled and did not is
an error naming it (MissingCell), never a blank or a dash in the table.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

METRICS = {"generation": ("exact_match", "bleu", "chrf"), "classification": ("accuracy", "macro_f1")}
MAIN = {"generation": "bleu", "classification": "accuracy"}  # the metric the claims below quote
NAMES = {"loss": "loss", "perplexity": "ppl", "exact_match": "exact match", "bleu": "BLEU", "chrf": "chrF",
         "accuracy": "accuracy", "macro_f1": "macro-F1"}


class MissingCell(KeyError):
    """A value the report needs is absent from the results."""

    def __str__(self) -> str:
        return f"quality results: missing {self.args[0]}"


def recovered(base: float, method: float, full: float, higher_is_better: bool, noise: float | None = None) -> float | None:
    """Quality recovered: (method - base) / (full - base), the share of full fine-tuning's gain (on loss:
    its drop) that the method achieves; 1 = as good as full, 0 = no better than the untouched base,
    negative = worse than the base. None when full fine-tuning gained nothing on this metric, or less
    than twice `noise` (the metric's standard deviation over seeds): a share of no gain, of a loss or of
    noise means nothing (a gain of 0.3 chrF among spreads of 1 would turn 1 chrF point into "300%")."""
    gain = full - base
    if any(math.isnan(x) for x in (base, method, full)) or (gain <= 0 if higher_is_better else gain >= 0):
        return None
    if noise is not None and abs(gain) <= 2 * noise:
        return None
    return (method - base) / gain


def mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation over seeds (None for a single seed)."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def need(mapping: dict, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping or mapping[key] is None:
        raise MissingCell(f"{where}.{key}")
    return mapping[key]


def _fmt(x: float, spread: float | None, digits: int) -> str:
    text = f"{x:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def row_stats(task: dict, row: str, where: str) -> dict[str, Any]:
    """Means, spreads and run costs of one method row, every field checked present."""
    cell = need(task["rows"], row, where)
    seeds = need(cell, "seeds", f"{where}.{row}")
    if not seeds:
        raise MissingCell(f"{where}.{row}.seeds[0]")
    names = ("loss", "perplexity", *METRICS[task["kind"]])
    out: dict[str, Any] = {"lr": need(cell, "chosen_lr", f"{where}.{row}"), "n": len(seeds)}
    for name in names:
        out[name] = mean_spread([need(need(s, "test", f"{where}.{row}.seed{s.get('seed')}"), name,
                                      f"{where}.{row}.seed{s.get('seed')}.test") for s in seeds])
    for cost in ("trainable", "peak_memory_mib", "train_time_s", "tokens_per_s", "saved_bytes"):
        out[cost] = statistics.fmean(need(s, cost, f"{where}.{row}.seed{s.get('seed')}") for s in seeds)
    return out


def task_table(name: str, task: dict, rows: list[str], base_params: int) -> tuple[list[str], dict[str, dict]]:
    """The markdown table of one task, and every row's stats (for the summary and the plot)."""
    where = f"tasks.{name}"
    base = need(need(task, "base", where), "test", f"{where}.base")
    metrics = METRICS[task["kind"]]
    stats = {row: row_stats(task, row, where) for row in rows}
    full = stats.get("full")
    # the noise level of each metric: its largest standard deviation over seeds in any row of this table
    noise = {m: max((s[m][1] for s in stats.values() if s[m][1] is not None), default=None) for m in ("loss", *metrics)}
    head = ["Method", "lr", "Trainable", "Peak MiB", "Train s", "tokens/s", "Saved MB", "Test loss", "ppl",
            *(NAMES[m] for m in metrics), "Recovered (loss)", *(f"Recovered ({NAMES[m]})" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    base_cells = ["base (untouched)", "-", "0", "-", "-", "-", "-", f"{need(base, 'loss', where + '.base.test'):.3f}",
                  f"{need(base, 'perplexity', where + '.base.test'):.1f}",
                  *(_metric(need(base, m, where + '.base.test'), None, m) for m in metrics),
                  "0%", *("0%" for _ in metrics)]
    lines.append("| " + " | ".join(base_cells) + " |")
    for row in rows:
        s = stats[row]
        rec = [_pct(recovered(base["loss"], s["loss"][0], full["loss"][0], False, noise["loss"])) if full else "n/a"]
        rec += [_pct(recovered(base[m], s[m][0], full[m][0], True, noise[m])) if full else "n/a" for m in metrics]
        s["recovered"] = dict(zip(("loss", *metrics), rec))
        cells = [row, f"{s['lr']:g}", f"{s['trainable']:,.0f} ({100 * s['trainable'] / base_params:.2f}%)",
                 f"{s['peak_memory_mib']:,.0f}", f"{s['train_time_s']:.0f}", f"{s['tokens_per_s']:,.0f}",
                 _megabytes(s["saved_bytes"]), _fmt(*s["loss"], 3), _fmt(*s["perplexity"], 1),
                 *(_metric(*s[m], m) for m in metrics), *rec]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, stats


def _megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f}" if n >= 1e6 else f"{n / 1e6:.3f}"


def _metric(x: float, spread: float | None, name: str) -> str:
    if name in ("bleu", "chrf"):
        return _fmt(x, spread, 1)
    return _fmt(x, spread, 3)


def sweep_table(task: dict, rows: list[str], where: str) -> list[str]:
    lines = ["| Method | learning rate: validation loss (seed 0) | chosen |", "|---|---|---:|"]
    for row in rows:
        cell = need(task["rows"], row, where)
        runs = need(cell, "sweep", f"{where}.{row}")
        if len(runs) < 3:
            raise MissingCell(f"{where}.{row}.sweep (has {len(runs)} of at least 3 learning rates)")
        text = ", ".join(f"{need(r, 'lr', where)}: {need(r, 'val_loss', f'{where}.{row}.sweep'):.3f}" for r in runs)
        lines.append(f"| {row} | {text} | {cell['chosen_lr']:g} |")
    return lines


def render(results: dict) -> str:
    """QUALITY.md's text; MissingCell when the results lack anything the tables show."""
    rows = need(results, "rows", "results")
    budget = need(results, "budget", "results")
    params = need(results, "base_params", "results")
    out = ["# Quality: the seed's methods table, measured", "",
           f"Generated by `{need(results, 'command', 'results')}` on {results.get('date', '?')} "
           f"({results.get('machine', '?')}; {_versions(results.get('versions', {}))}); "
           f"{results.get('total_s', 0) / 60:.0f} minutes in all. Do not edit: rerun it.", "",
           f"Base: {results.get('model')} ({params:,} parameters). Every run: {budget['steps']} steps of "
           f"{budget['batch_size']} examples of at most {budget['seq_len']} tokens (the same token budget and, for a "
           f"given seed, the same data order for every method), bf16 autocast, warm-up 10% then cosine decay. "
           f"Learning rates: x{', x'.join(f'{f:g}' for f in results.get('lr_factors', ()))} the method's default, "
           f"chosen by validation loss (seed 0); test numbers are the mean ± standard deviation over seeds "
           f"{', '.join(map(str, budget['seeds']))} at the chosen rate. Recovered = (method - base) / (full - base) "
           "on the mean: 100% is full fine-tuning's gain, 0% the untouched base's score; n/a where full fine-tuning "
           "gained nothing, or less than twice the metric's largest standard deviation over seeds in the table.", ""]
    tasks = need(results, "tasks", "results")
    all_stats = {}
    for name, task in tasks.items():
        sizes = need(task, "sizes", f"tasks.{name}")
        out += [f"## Task `{name}` ({task['kind']})", "",
                f"{sizes['train']} training, {sizes['val']} validation and {sizes['test']} test records; "
                + _task_words(name, task), ""]
        table, stats = task_table(name, task, rows, params)
        all_stats[name] = stats
        out += table + ["", "Learning-rate sweep:", ""] + sweep_table(task, rows, f"tasks.{name}") + [""]
    out += ["## The seed's claims against these numbers", ""] + claims(tasks, all_stats) + [""]
    out += ["## Columns", "",
            "Trainable: parameters the optimizer updates (share of the base's). Peak MiB: the training "
            "process's peak resident memory on a CPU (interpreter and torch included, about 400 MiB of it "
            "common to all) or peak allocated CUDA memory. Train s and tokens/s: the training loop alone "
            "(all input tokens, virtual tokens not counted). Saved MB: what the run writes as its product "
            "(adapter or whole model). Test loss / ppl: mean cross-entropy of the answer tokens on the test "
            "split.", ""]
    return "\n".join(out) + "\n"


def claims(tasks: dict, stats: dict[str, dict[str, dict]]) -> list[str]:
    """One generated line per claim and task, numbers only (the words around them are fixed)."""
    lines = []
    for name, task in tasks.items():
        rows, main = stats[name], MAIN[task["kind"]]
        base = task["base"]["test"]
        if "full" in rows and "lora" in rows:
            full, lora = rows["full"], rows["lora"]
            lines.append(
                f"- `{name}`, \"LoRA achieves 95% of full fine-tuning quality with 10% of the cost\": LoRA recovered "
                f"{lora['recovered']['loss']} of full fine-tuning's test-loss gain and {_share(lora, main)}, with {_pct(lora['peak_memory_mib'] / full['peak_memory_mib'])} of its peak memory, "
                f"{_pct(lora['train_time_s'] / full['train_time_s'])} of its training time and "
                f"{_pct(lora['saved_bytes'] / full['saved_bytes'])} of its saved size.")
        if "qlora" in rows and "lora" in rows:
            q, lo = rows["qlora"], rows["lora"]
            spreads = [x for x in (q["loss"][1], lo["loss"][1]) if x is not None]
            noise = f"; seed standard deviations up to {max(spreads):.3f}" if spreads else "; one seed"
            lines.append(
                f"- `{name}`, \"4-bit QLoRA matches 16-bit LoRA\": test loss {q['loss'][0]:.3f} against {lo['loss'][0]:.3f} "
                f"(difference {q['loss'][0] - lo['loss'][0]:+.3f}{noise}), {NAMES[main]} "
                f"{_metric(q[main][0], None, main)} against {_metric(lo[main][0], None, main)}, at "
                f"{_pct(q['peak_memory_mib'] / lo['peak_memory_mib'])} of LoRA's peak memory.")
        soft = [r for r in ("prefix", "prompt") if r in rows]
        if soft:
            lines.append(f"- `{name}`, soft prompts (the seed: quality \"Good\" for prefix, \"Moderate\" for prompt "
                         "tuning): " + "; ".join(f"{r} recovered {rows[r]['recovered']['loss']} of the loss gain and "
                                                 f"{_share(rows[r], main)}" for r in soft) + ".")
        worse = [r for r, s in rows.items() if s["loss"][0] >= base["loss"]]
        lines.append(f"- `{name}`: " + ("every method beats the untouched base on test loss."
                                        if not worse else "no better than the untouched base on test loss "
                                        f"({base['loss']:.3f}): " + ", ".join(f"{r} ({rows[r]['loss'][0]:.3f})" for r in worse)
                                        + "."))
    return lines


def _share(stats: dict, metric: str) -> str:
    share = stats["recovered"][metric]
    if share == "n/a":
        return (f"no share of a {NAMES[metric]} gain (full fine-tuning did not raise {NAMES[metric]} over the base "
                "by more than twice its spread over seeds)")
    return f"{share} of the {NAMES[metric]} gain"


def _task_words(name: str, task: dict) -> str:
    if task["kind"] == "classification":
        labels = task.get("labels") or []
        return (f"the answer is one of {len(labels)} module names ({', '.join(labels)}), predicted as the label "
                "the model finds most likely; accuracy and macro-F1 over the test split.")
    return ("the answer is one line of free text, generated greedily; exact match, and BLEU and chrF as "
            "sacreBLEU computes them (0-100).")


def _versions(v: dict) -> str:
    return ", ".join(f"{k} {x}" for k, x in v.items())


def plot(results: dict, path: Path) -> bool:
    """Quality recovered per method and task, as bars; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = results["tasks"]
    rows = [r for r in results["rows"] if r != "full"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 3.6), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        _, stats = task_table(name, task, results["rows"], results["base_params"])
        keys = ("loss", *METRICS[task["kind"]])
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            values = [_as_number(stats[r]["recovered"][key]) for r in rows]
            ax.bar([j + i * width for j in range(len(rows))], values, width, label=NAMES[key])
        ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))], rows)
        ax.set_ylabel("quality recovered vs full (%)")
        ax.set_title(f"{name} ({task['kind']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _as_number(text: str) -> float:
    return float("nan") if text == "n/a" else float(text.rstrip("%"))


def write_report(results: dict, markdown: Path, png: Path) -> None:
    """Render first, so that a results file with a missing cell writes nothing at all."""
    text = render(results)
    markdown.write_text(text)
    plot(results, png)
