"""Evaluation metrics as pure functions of numbers and strings (no model, no torch).

perplexity(loss); accuracy / macro_f1 over label strings (classification); exact_match, and BLEU
and chrF as sacreBLEU computes them, over generated strings (generation). Strings are compared after whitespace
normalisation (strip, collapse runs of whitespace), case-sensitively: a label "Positive" generated
as " Positive\\n" counts, "positive" does not.
"""
from __future__ import annotations

import math
from typing import Sequence

import sacrebleu


def normalize(text: str) -> str:
    """Strip and collapse whitespace: ' a \\n b ' -> 'a b'."""
    return " ".join(text.split())


def perplexity(loss: float) -> float:
    """exp(mean per-token cross-entropy in nats); inf instead of OverflowError for huge losses."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _check_pairs(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of predictions equal to their gold label (after normalize)."""
    _check_pairs(predictions, golds)
    return sum(normalize(p) == normalize(g) for p, g in zip(predictions, golds)) / len(golds)


def macro_f1(predictions: Sequence[str], golds: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN), over `labels`.

    `labels` defaults to every label seen in golds or predictions (scikit-learn's default), so a
    prediction outside the label set counts as a class with F1 0. Pass the label set to score only
    those classes (off-set predictions then still cost their gold class recall). A class with no
    TP, FP or FN scores 0, like scikit-learn's zero_division=0.
    """
    _check_pairs(predictions, golds)
    preds = [normalize(p) for p in predictions]
    gold = [normalize(g) for g in golds]
    classes = sorted(set(gold) | set(preds)) if labels is None else [normalize(x) for x in labels]
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, gold))
        fp = sum(p == c and g != c for p, g in zip(preds, gold))
        fn = sum(p != c and g == c for p, g in zip(preds, gold))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation."""
    return accuracy(predictions, references)


def _streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """sacreBLEU's layout: one stream per alternative, each as long as the corpus. A hypothesis with
    fewer alternatives than another pads its stream with None (sacreBLEU then skips it)."""
    alternatives = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max(len(a) for a in alternatives)
    return [[a[i] if i < len(a) else None for a in alternatives] for i in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU-4 as sacreBLEU computes it with its defaults (13a tokenisation, exponential smoothing),
    on its 0-100 scale: the number papers report. Each reference is a string or a list of alternatives."""
    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), _streams(references)).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (character 6-grams, beta 2) as sacreBLEU computes it, 0-100. Softer than BLEU: a
    near miss in wording still scores, which tells more when few answers are exact."""
    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), _streams(references)).score)
