"""Evaluation metrics as pure functions of numbers and strings (no model, no torch).

perplexity(loss); accuracy / macro_f1 over label strings (classification); corpus_bleu and
exact_match over generated strings (generation). Strings are compared after whitespace
normalisation (strip, collapse runs of whitespace), case-sensitively: a label "Positive" generated
as " Positive\\n" counts, "positive" does not.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence


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


@dataclass(frozen=True)
class BleuResult:
    """Corpus BLEU and its parts. `score` in [0, 1] (multiply by 100 for the sacrebleu scale)."""

    score: float
    precisions: tuple[float, ...]  # modified n-gram precision p_1..p_N, corpus-level
    brevity_penalty: float
    hyp_len: int  # c: candidate tokens
    ref_len: int  # r: effective reference tokens (closest length per sentence)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4
) -> BleuResult:
    """Papineni et al. corpus BLEU: uniform weights 1/max_n, brevity penalty, no smoothing.

    Whitespace tokenisation. Each reference entry is a string or a list of alternative strings.
    n-gram matches are clipped by the max count in any reference and summed over the corpus before
    dividing (corpus-level, not an average of sentence scores). r sums, per sentence, the
    reference length closest to the hypothesis length (ties -> shorter, as NLTK and sacrebleu).
    BP = exp(1 - r/c) if c < r else 1. Any p_n = 0 makes the score 0 (unsmoothed).
    """
    _check_pairs(hypotheses, references)
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        h = hyp.split()
        rs = [r.split() for r in ([refs] if isinstance(refs, str) else refs)]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(h, n)
            max_ref = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)  # | keeps the max count per n-gram
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    precisions = tuple(m / t if t else 0.0 for m, t in zip(matches, totals))
    bp = 1.0 if hyp_len > ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    score = 0.0 if min(precisions) == 0 else bp * math.exp(sum(math.log(p) for p in precisions) / max_n)
    return BleuResult(score, precisions, bp, hyp_len, ref_len)
