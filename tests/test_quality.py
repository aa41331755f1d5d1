"""The quality benchmark's protocol and report: its arithmetic, its splits, its choices, its refusals."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from benchmarks import quality
from benchmarks.quality_report import MissingCell, mean_spread, recovered, render
from benchmarks.quality_tasks import TASKS, answer_of, question_of, split_groups


# --- quality recovered ---------------------------------------------------------------------------------
def test_recovered_is_the_share_of_full_fine_tunings_gain():
    assert recovered(base=3.0, method=2.5, full=2.0, higher_is_better=False) == pytest.approx(0.5)  # loss
    assert recovered(base=0.10, method=0.30, full=0.50, higher_is_better=True) == pytest.approx(0.5)  # accuracy
    assert recovered(3.0, 1.8, 2.0, False) == pytest.approx(1.2)  # better than full
    assert recovered(3.0, 3.3, 2.0, False) == pytest.approx(-0.3)  # worse than the base
    assert recovered(0.2, 0.2, 0.2, True) is None  # full did not move it: nothing to share
    # full made it worse: a share of a loss is no share (BLEU 27 -> 26 under full, 25 under a method is not "200%")
    assert recovered(27.0, 25.0, 26.0, True) is None and recovered(2.0, 2.5, 2.2, False) is None
    assert recovered(float("nan"), 1.0, 2.0, False) is None
    # a gain within twice full's spread over seeds is noise: no share of it
    assert recovered(26.3, 27.4, 26.6, True, noise=0.2) is None
    assert recovered(26.3, 27.4, 26.6, True, noise=0.1) == pytest.approx(1.1 / 0.3)


def test_mean_and_spread_over_seeds():
    assert mean_spread([2.0, 4.0]) == (3.0, pytest.approx(2 ** 0.5))
    assert mean_spread([2.0]) == (2.0, None)
    with pytest.raises(ValueError):
        mean_spread([])


# --- the splits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_no_test_question_or_answer_is_seen_in_training_or_validation(name):
    task = TASKS[name]()
    assert len(task.test) >= 100 and len(task.val) >= 60 and len(task.train) > len(task.test)
    seen_questions = {question_of(r) for r in task.train + task.val}
    assert not {question_of(r) for r in task.test} & seen_questions
    if task.kind == "generation":  # a classification answer is a label, seen in training by design
        assert not {answer_of(r) for r in task.test} & {answer_of(r) for r in task.train + task.val}
    else:  # every test label is one the model can learn
        assert {answer_of(r) for r in task.test} <= {answer_of(r) for r in task.train}
    assert not {question_of(r) for r in task.val} & {question_of(r) for r in task.train}


def test_split_keeps_groups_whole_and_is_a_function_of_the_keys_only():
    items = [(f"k{i % 7}", {"i": i}) for i in range(70)]
    train, val, test = split_groups(items, test_size=15, val_size=15)
    assert sorted(r["i"] for r in train + val + test) == list(range(70))
    for part in (train, val, test):
        groups = {r["i"] % 7 for r in part}
        assert sum(1 for r in part) == 10 * len(groups)  # whole groups only
    assert split_groups(list(reversed(items)), 15, 15)[2] != [] and \
        {r["i"] % 7 for r in split_groups(list(reversed(items)), 15, 15)[2]} == {r["i"] % 7 for r in test}


# --- the learning-rate choice ----------------------------------------------------------------------------
def test_pick_lr_reads_validation_loss_only():
    runs = [{"lr": 1e-4, "val_loss": 2.0, "test": {"loss": 1.0}},
            {"lr": 3e-4, "val_loss": 1.5, "test": {"loss": 9.0}},
            {"lr": 1e-3, "val_loss": float("nan"), "test": {"loss": 0.1}}]
    assert quality.pick_lr(runs) == 3e-4
    assert quality.pick_lr([{"lr": 1e-3, "val_loss": 1.0}, {"lr": 1e-4, "val_loss": 1.0}]) == 1e-4
    with pytest.raises(RuntimeError):
        quality.pick_lr([{"lr": 1e-3, "val_loss": float("nan")}])


def test_sweep_is_three_rates_around_each_methods_default():
    for row in quality.ROWS:
        lrs = quality.sweep_lrs(row)
        assert len(lrs) >= 3 and min(lrs) < quality.default_lr(row) < max(lrs) and quality.default_lr(row) in lrs


def test_protocol_scores_test_only_after_the_choice_and_seeds_use_the_chosen_rate(tmp_path, monkeypatch):
    """run_task with training and scoring replaced by recorders: every sweep run comes before any test
    score, the chosen rate is the best validation loss, and only chosen runs are scored on test."""
    events = []

    def fake_train(row, model, data, lr, seed, budget, out, device):
        events.append(("train", row, lr, seed))
        out.mkdir(parents=True)
        return {"lr": lr, "seed": seed, "val_loss": abs(lr - 1e-3) + 1.0, "process_wall_s": 1.0,
                "product": str(out / "adapter")}

    def fake_score_product(base, product, task, seq_len, device):
        events.append(("test", Path(product).parent.name))
        return {"loss": 1.0}

    monkeypatch.setattr(quality, "train_run", fake_train)
    monkeypatch.setattr(quality, "score_product", fake_score_product)
    monkeypatch.setattr(quality, "score", lambda *a, **k: {"loss": 2.0})
    monkeypatch.setattr(quality, "load_checkpoint", lambda *a, **k: type("L", (), {"model": None})())
    monkeypatch.setattr(quality, "load_tokenizer", lambda *a, **k: None)
    budget = quality.Budget(("docstring",), steps=1, batch_size=1, seq_len=8, seeds=(0, 5))
    result = quality.run_task(TASKS["docstring"](), "base", ["lora"], budget, tmp_path, torch.device("cpu"),
                              lambda m: None)
    trains = [e for e in events if e[0] == "train"]
    first_test = events.index(next(e for e in events if e[0] == "test"))
    assert all(events.index(t) < first_test for t in trains if t[3] == 0)  # the sweep ends before any test
    assert [t[2] for t in trains if t[3] == 0] == list(quality.sweep_lrs("lora"))
    assert result["rows"]["lora"]["chosen_lr"] == 1e-3
    assert [t for t in trains if t[3] == 5] == [("train", "lora", 1e-3, 5)]
    assert sorted(e[1] for e in events if e[0] == "test") == ["docstring-lora-lr0.001-s0", "docstring-lora-lr0.001-s5"]


# --- the report ---------------------------------------------------------------------------------------------
def _results() -> dict:
    def seed_run(seed, loss, chrf):
        return {"seed": seed, "lr": 1e-3, "val_loss": loss, "trainable": 1000, "peak_memory_mib": 900.0,
                "train_time_s": 10.0, "tokens_per_s": 500.0, "saved_bytes": 4_000_000,
                "test": {"loss": loss, "perplexity": 2.718 ** loss, "exact_match": 0.1, "bleu": 10.0, "chrf": chrf}}

    rows = {}
    for i, row in enumerate(["full", "lora", "qlora"]):
        runs = [seed_run(0, 2.0 + 0.1 * i, 40.0 - i), seed_run(1, 2.1 + 0.1 * i, 42.0 - i)]
        rows[row] = {"chosen_lr": 1e-3, "seeds": runs,
                     "sweep": [dict(runs[0], lr=lr) for lr in (3e-4, 1e-3, 3e-3)]}
    task = {"kind": "generation", "sizes": {"train": 10, "val": 5, "test": 5}, "labels": None,
            "base": {"test": {"loss": 3.0, "perplexity": 20.1, "exact_match": 0.0, "bleu": 2.0, "chrf": 20.0}},
            "rows": rows}
    return {"command": "python -m benchmarks.quality", "budget": {"name": "cpu", "steps": 4, "batch_size": 2,
            "seq_len": 64, "seeds": [0, 1]}, "base_params": 100_000, "rows": ["full", "lora", "qlora"],
            "lr_factors": [0.3, 1, 3], "model": "m.gguf", "tasks": {"docstring": task}}


def test_report_shows_every_row_and_the_recovered_share():
    text = render(_results())
    lora = next(line for line in text.splitlines() if line.startswith("| lora |"))
    # base 3.0, full mean 2.05, lora mean 2.15: (2.15 - 3.0) / (2.05 - 3.0) = 89%; chrF (40 - 20) / (41 - 20) = 95%
    assert "2.150 ± 0.071" in lora and "| 89% |" in lora and lora.endswith("| 95% |")
    assert "LoRA recovered 89% of full fine-tuning's test-loss gain" in text
    assert "every method beats the untouched base on test loss" in text


@pytest.mark.parametrize("path,name", [
    (("tasks", "docstring", "rows", "qlora", "seeds", 1, "test", "chrf"), "tasks.docstring.qlora.seed1.test.chrf"),
    (("tasks", "docstring", "rows", "lora"), "tasks.docstring.lora"),
    (("tasks", "docstring", "base", "test", "loss"), "tasks.docstring.base.test.loss"),
    (("tasks", "docstring", "rows", "full", "seeds", 0, "peak_memory_mib"), "tasks.docstring.full.seed0.peak_memory_mib"),
])
def test_report_refuses_a_missing_cell_by_name(path, name):
    results = copy.deepcopy(_results())
    node = results
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(MissingCell, match=name.replace(".", r"\.")):
        render(results)


def test_report_refuses_a_short_sweep():
    results = _results()
    results["tasks"]["docstring"]["rows"]["lora"]["sweep"].pop()
    with pytest.raises(MissingCell, match="sweep"):
        render(results)


def test_nothing_is_written_when_a_cell_is_missing(tmp_path):
    from benchmarks.quality_report import write_report

    results = _results()
    del results["tasks"]["docstring"]["rows"]["qlora"]["seeds"][0]["test"]
    with pytest.raises(MissingCell):
        write_report(results, tmp_path / "Q.md", tmp_path / "q.png")
    assert not (tmp_path / "Q.md").exists() and not (tmp_path / "q.png").exists()
