"""train.metrics on hand-computed cases; train.early_stopping against transformers' callback.

BLEU and chrF are sacreBLEU's; the tests check what this project adds around them (the corpus-level
call, the 0-100 scale, references laid out per hypothesis) against values worked out by hand.
"""
from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest

from train.early_stopping import EarlyStopping, OverfitDetector
from train.metrics import accuracy, bleu, chrf, exact_match, macro_f1, perplexity


# --- perplexity, accuracy, F1, exact match -------------------------------------------------------------
def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert perplexity(1e6) == math.inf


def test_accuracy_and_exact_match_normalise_whitespace_only():
    assert accuracy([" pos\n", "neg", "Pos"], ["pos", "pos", "pos"]) == pytest.approx(1 / 3)
    assert exact_match(["the  cat\tsat ", "a b"], ["the cat sat", "a  c"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_macro_f1_hand_computed():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "a"]
    # a: TP 1, FP 1 (4th), FN 1 (2nd) -> 2/(2+1+1) = 1/2;  b: TP 1, FP 1, FN 0 -> 2/3;  c: TP 0, FN 1 -> 0
    assert macro_f1(pred, gold) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert macro_f1(gold, gold) == 1.0


def test_macro_f1_out_of_set_predictions():
    gold, pred = ["a", "b"], ["a", "banana"]
    # default (scikit-learn): classes a, b, banana -> (1 + 0 + 0) / 3
    assert macro_f1(pred, gold) == pytest.approx(1 / 3)
    # restricted to the label set: a -> 1, b -> TP 0, FN 1 -> 0; mean 1/2
    assert macro_f1(pred, gold, labels=["a", "b"]) == pytest.approx(1 / 2)


# --- BLEU and chrF (sacreBLEU underneath) --------------------------------------------------------------
def test_bleu_is_corpus_level_on_the_sacrebleu_scale():
    # Pair 1 matches/totals per n = 5/6, 3/5, 1/4, 0/3; pair 2 (identical, 5 tokens) 5/5, 4/4, 3/3, 2/2.
    # Corpus level sums before dividing: p = 10/11, 7/9, 4/7, 2/5, c = r = 11, BP = 1, no zero count
    # (so no smoothing): BLEU = 100 * (16/99) ** 0.25. A mean of sentence scores would differ.
    hyps, refs = ["the cat is on the mat", "a b c d e"], ["the cat sat on the mat", "a b c d e"]
    assert bleu(hyps, refs) == pytest.approx(100 * (16 / 99) ** 0.25, abs=1e-9)
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)


def test_bleu_brevity_penalty():
    # All n-gram precisions are 1; c = 4, r = 8: BP = exp(1 - 8/4) = e^-1.
    assert bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(100 * math.exp(-1))


def test_alternative_references_are_laid_out_per_hypothesis():
    # Each hypothesis keeps its own alternatives, however many: the first matches its second alternative
    # exactly, the second has one reference. Transposed wrongly, the first would be scored against "x y z".
    hyps = ["a b c d e f", "x y z w"]
    refs = [["q r s", "a b c d e f"], "x y z w"]
    assert bleu(hyps, refs) == pytest.approx(100.0)
    assert chrf(hyps, refs) == pytest.approx(100.0)
    assert bleu(hyps, [["q r s"], "x y z w"]) < 50


def test_chrf_gives_credit_for_near_misses():
    # One missing full stop: no longer an exact match, still most character n-grams.
    assert exact_match(["Return the sum"], ["Return the sum."]) == 0.0
    assert 80 < chrf(["Return the sum"], ["Return the sum."]) < 100
    assert chrf(["zzzz"], ["Return the sum."]) < 10
    with pytest.raises(ValueError):
        chrf([], [])


# --- early stopping ------------------------------------------------------------------------------------
def _hf_counters(values, patience, threshold):
    """Drive transformers' EarlyStoppingCallback the way Trainer does: callback first, then best update.

    Returns its patience counter after each evaluation (its stop flag is sticky, so counters say more)."""
    from transformers.trainer_callback import EarlyStoppingCallback

    cb = EarlyStoppingCallback(patience, threshold)
    args = SimpleNamespace(metric_for_best_model="loss", greater_is_better=False)
    state = SimpleNamespace(best_metric=None)
    control = SimpleNamespace(should_training_stop=False)
    out = []
    for v in values:
        cb.on_evaluate(args, state, control, metrics={"eval_loss": v})  # reads state.best_metric
        out.append(cb.early_stopping_patience_counter)
        if state.best_metric is None or v < state.best_metric:  # Trainer._determine_best_metric
            state.best_metric = v
    return out


def test_early_stopping_fires_on_rigged_curve():
    es = EarlyStopping(patience=2, threshold=0.01)
    curve = [2.0, 1.5, 1.2, 1.195, 1.3, 1.1]
    stops = [es.step(v) for v in curve]
    # 1.195 beats 1.2 by only 0.005 (< threshold): counter 1; 1.3 is worse: counter 2 -> stop.
    assert stops == [False, False, False, False, True, False]
    assert es.best == 1.1 and es.is_best


def test_early_stopping_threshold_compares_with_latest_best():
    es = EarlyStopping(patience=5, threshold=0.01)
    for v in (1.0, 0.994, 0.988):
        es.step(v)
    assert es.counter == 2 and es.best == 0.988  # 0.988 vs 0.994, not vs 1.0


@pytest.mark.parametrize("seed", range(3))
def test_early_stopping_matches_transformers_callback(seed):
    rng = random.Random(seed)
    values = [round(1.0 + rng.uniform(-0.05, 0.04) * i / 5, 3) for i in range(40)]
    for patience, threshold in [(1, 0.0), (3, 0.0), (2, 0.01), (4, 0.005)]:
        es = EarlyStopping(patience, threshold)
        ours = [(es.step(v), es.counter)[1] for v in values]
        assert ours == _hf_counters(values, patience, threshold)
        assert any(c >= patience for c in ours)  # the curve does trigger a stop


def test_early_stopping_greater_is_better_and_resume():
    es = EarlyStopping(patience=2, threshold=0.0, greater_is_better=True)
    es.step(0.5), es.step(0.7), es.step(0.6)
    state = json.loads(json.dumps(es.state_dict()))
    resumed = EarlyStopping(patience=2, greater_is_better=True)
    resumed.load_state_dict(state)
    assert (resumed.best, resumed.counter) == (0.7, 1)
    assert resumed.step(0.65) and es.step(0.65)


def test_overfit_detector_seed_semantics():
    det = OverfitDetector(patience=3, gap=0.5)
    train = [2.0, 1.5, 1.0, 0.7, 0.5, 0.3]
    val = [2.1, 1.8, 1.6, 1.7, 1.8, 1.9]
    reports = [det.check(t, v) for t, v in zip(train, val)]
    assert [r.overfit_warning for r in reports] == [False, False, True, True, True, True]  # gap > 0.5
    assert [r.counter for r in reports] == [0, 0, 0, 1, 2, 3]
    assert [r.should_stop for r in reports] == [False] * 5 + [True]
    assert reports[2].gap == pytest.approx(0.6)


def test_overfit_detector_with_patience_0_warns_but_never_stops():
    det = OverfitDetector(patience=0, gap=0.2)
    reports = [det.check(t, v) for t, v in zip([2.0, 1.0, 0.5, 0.2, 0.1], [2.1, 1.5, 1.6, 1.7, 1.8])]
    assert [r.overfit_warning for r in reports] == [False, True, True, True, True]  # gap > 0.2
    assert [r.counter for r in reports] == [0, 0, 1, 2, 3]
    assert not any(r.should_stop for r in reports)
    with pytest.raises(ValueError, match="patience"):
        OverfitDetector(patience=-1)


def test_overfit_detector_state_round_trip():
    det = OverfitDetector()
    assert det.state_dict()["best_val_loss"] is None  # inf is not JSON
    det.check(1.0, 1.2), det.check(0.9, 1.3)
    fresh = OverfitDetector()
    fresh.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert (fresh.best_val_loss, fresh.counter) == (1.2, 1)
