"""SQuAD metrics against the behaviour of the official v1.1 evaluation script."""

import math

import pytest

from training.eval.metrics import (
    best_over_golds, exact_match, mean, normalize_answer, percentile, squad_scores, token_f1,
)


@pytest.mark.parametrize("text, expected", [
    ("The Denver Broncos!", "denver broncos"),
    ("  an   Apple\ta day ", "apple day"),
    ("theater of the absurd", "theater of absurd"),  # articles only as whole words
    ("U.S. Army", "us army"),  # punctuation removed inside words, not replaced by a space
    ("Saint-Étienne", "saintétienne"),  # hyphen removed, accents kept
    ("1990–91 season", "1990–91 season"),  # en dash is not in string.punctuation: kept
    ("A", ""),
    ("", ""),
])
def test_normalize_answer_matches_official_rules(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_is_after_normalisation():
    assert exact_match("the Broncos.", "Broncos") == 1.0
    assert exact_match("Broncos team", "Broncos") == 0.0
    assert exact_match("the", "a") == 1.0  # both normalise to the empty string


def test_f1_partial_overlap():
    # precision 2/3, recall 1 -> F1 0.8
    assert token_f1("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)


def test_f1_counts_repeated_tokens_once_per_occurrence():
    # prediction "cat cat" vs gold "cat": one common token, precision 1/2, recall 1
    assert token_f1("the cat cat", "cat") == pytest.approx(2 / 3)


def test_f1_is_zero_for_empty_prediction_or_article_only_gold():
    assert token_f1("", "Denver") == 0.0
    assert token_f1("Denver", "") == 0.0
    assert token_f1("the", "a") == 0.0  # no common tokens, even though EM is 1


def test_f1_is_order_insensitive_bag_of_words():
    assert token_f1("Broncos Denver", "Denver Broncos") == 1.0
    assert exact_match("Broncos Denver", "Denver Broncos") == 0.0


def test_scores_take_the_best_gold_answer():
    golds = ["Denver Broncos", "Broncos", "the Denver Broncos football team"]
    scores = squad_scores("Broncos", golds)
    assert scores == {"f1": 1.0, "em": 1.0}
    assert best_over_golds(token_f1, "Denver", golds) == pytest.approx(2 / 3)
    assert squad_scores("anything", []) == {"f1": 0.0, "em": 0.0}


def test_mean_and_percentile():
    assert math.isnan(mean([]))
    assert mean([1, 2, 3]) == 2
    assert percentile([1, 2, 3, 4], 50) == 2.5  # numpy's linear interpolation
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(range(101)), 95) == pytest.approx(95)
