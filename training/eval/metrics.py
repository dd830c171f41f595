"""SQuAD-standard answer metrics, as the official v1.1 evaluation script computes them.

``normalize_answer`` lower-cases, removes punctuation (ASCII ``string.punctuation`` only, as the
official script does), removes the articles a/an/the as whole words, and collapses whitespace.
EM and F1 of a prediction are the maxima over the gold answers. Scores here are fractions in
[0, 1]; reports multiply by 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:  # includes an empty prediction or an empty gold (the official behaviour)
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: Iterable[str]) -> float:
    """The official script's ``metric_max_over_ground_truths``."""
    scores = [metric(prediction, g) for g in golds]
    return max(scores) if scores else 0.0


def squad_scores(prediction: str, golds: Iterable[str]) -> dict[str, float]:
    golds = list(golds)
    return {"f1": best_over_golds(token_f1, prediction, golds),
            "em": best_over_golds(exact_match, prediction, golds)}


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) without needing numpy arrays."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
