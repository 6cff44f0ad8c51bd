"""Tests for pairs.py: pair-selection strategies and their invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from self_rewarding_lm_pytorch.judge import CallableJudge
from self_rewarding_lm_pytorch.pairs import (
    PAIR_STRATEGIES,
    Pair,
    register_pair_strategy,
    select_pairs,
)


def test_best_worst_is_max_vs_min_with_first_occurrence_ties():
    responses = ["r0", "r1", "r2", "r3", "r4"]
    assert select_pairs(responses, [2.0, 5.0, 1.0, 5.0, 1.0]) == [(1, 2)]
    pair = select_pairs(responses, [3, 1, 4, 1, 5])[0]
    assert isinstance(pair, Pair) and pair.chosen == 4 and pair.rejected == 1


def test_best_worst_skips_ties_and_unparsable():
    r = ["a", "b", "c", "d"]
    assert select_pairs(r, [3.0, 3.0, 3.0, 3.0]) == []  # all tied
    assert select_pairs(r, [None, 4.0, None, None]) == []  # one parsable
    assert select_pairs(r, [None, None, None, None]) == []
    assert select_pairs(r, [None, 2.0, float("nan"), 1.0]) == [(1, 3)]
    assert select_pairs(r, [0.0, None, 5.0, None]) == [(2, 0)]


def test_margin_applies_to_best_worst_and_all_pairs():
    r = ["a", "b", "c"]
    assert select_pairs(r, [1.0, 1.5, 2.0], margin=1.0) == []
    assert select_pairs(r, [1.0, 1.5, 2.5], margin=1.0) == [(2, 0)]
    assert select_pairs(r, [1.0, 2.0, 3.5], strategy="all_pairs", margin=0.9) == [
        (1, 0),
        (2, 0),
        (2, 1),
    ]
    # the gap must exceed the margin strictly
    assert select_pairs(r, [1.0, 2.0, 3.5], strategy="all_pairs", margin=1.0) == [(2, 0), (2, 1)]
    assert select_pairs(r, [1.0, 2.0, 3.5], strategy="all_pairs", margin=1.5) == [(2, 0)]
    assert select_pairs(r, [2.0, 2.0, 2.0], strategy="all_pairs") == []


def test_length_aware_picks_shortest_near_best_and_longest_near_worst():
    responses = ["long good answer", "good", "bad", "very long bad answer!", "mid"]
    scores = [4.8, 4.5, 1.2, 1.0, 3.0]
    # no tolerance: plain best vs worst
    assert select_pairs(responses, scores, strategy="length_aware") == [(0, 3)]
    # tolerance 0.5: "good" (4.5) is within 0.5 of the best and shorter; worst side
    # has "bad" (1.2) and the longer "very long bad answer!" (1.0)
    assert select_pairs(responses, scores, strategy="length_aware", length_tolerance=0.5) == [
        (1, 3)
    ]
    # equal lengths on the chosen side break ties by index
    assert select_pairs(["aa", "bb", "c"], [5.0, 5.0, 0.0], strategy="length_aware") == [(0, 2)]


def test_length_aware_with_overlapping_tolerance_keeps_strict_order():
    responses = ["x", "yyyyyy", "zz"]
    scores = [1.0, 5.0, 3.0]
    # tolerance 10 puts everything in both sets; the shortest ("x", score 1) has no
    # lower partner, so the next shortest ("zz", 3) is chosen against the longest below it
    pairs = select_pairs(responses, scores, strategy="length_aware", length_tolerance=10)
    assert pairs == [(2, 0)]
    for c, r in pairs:
        assert scores[c] > scores[r]


def test_user_callable_strategy_sees_parsable_candidates_and_is_checked():
    seen = {}

    def every_adjacent(responses, scores, *, margin, length_tolerance, rng):
        seen["responses"], seen["scores"], seen["rng"] = responses, scores, rng
        return [(i, i + 1) for i in range(len(scores) - 1) if scores[i] > scores[i + 1]]

    rng = np.random.default_rng(0)
    out = select_pairs(
        ["a", "b", "c", "d"], [3.0, None, 2.0, 1.0], strategy=every_adjacent, rng=rng
    )
    assert seen["responses"] == ["a", "c", "d"] and seen["scores"] == [3.0, 2.0, 1.0]
    assert seen["rng"] is rng
    assert out == [(0, 2), (2, 3)]  # indices mapped back to the full list

    def wrong_order(responses, scores, **kw):
        return [(1, 0)]

    with pytest.raises(ValueError, match="strictly higher"):
        select_pairs(["a", "b"], [2.0, 1.0], strategy=wrong_order)

    def out_of_range(responses, scores, **kw):
        return [(0, 5)]

    with pytest.raises(ValueError, match="outside the 2 parsable"):
        select_pairs(["a", "b"], [2.0, 1.0], strategy=out_of_range)


def test_registry_and_errors():
    assert {"best_worst", "all_pairs", "length_aware"} <= set(PAIR_STRATEGIES)
    with pytest.raises(ValueError, match="unknown pair strategy 'best'.*best_worst"):
        select_pairs(["a"], [1.0], strategy="best")
    with pytest.raises(ValueError, match="2 responses but 1 scores"):
        select_pairs(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="margin"):
        select_pairs(["a", "b"], [1.0, 2.0], margin=-1)
    with pytest.raises(ValueError, match="length_tolerance"):
        select_pairs(["a", "b"], [1.0, 2.0], length_tolerance=math.inf)
    with pytest.raises(TypeError, match="score 1"):
        select_pairs(["a", "b"], [1.0, "2"])  # type: ignore[list-item]

    def worst_best(responses, scores, **kw):  # the anti-strategy, but legal when reversed
        i, j = int(np.argmax(scores)), int(np.argmin(scores))
        return [(i, j)] if scores[i] > scores[j] else []

    register_pair_strategy("test_max_min", worst_best)
    try:
        assert select_pairs(["a", "b", "c"], [1.0, 3.0, 2.0], strategy="test_max_min") == [(1, 0)]
    finally:
        del PAIR_STRATEGIES["test_max_min"]


def test_pairs_from_a_scripted_judge():
    """End to end: judge scores -> pairs (the judge is scripted; pair selection is under test)."""
    judge = CallableJudge(lambda p, r: None if "?" in r else float(r.count("+")))
    responses = ["+", "+++", "?", "++", "+++"]
    scores = [res.score for res in judge.score(["q"] * 5, responses)]
    assert scores == [1.0, 3.0, None, 2.0, 3.0]
    assert select_pairs(responses, scores) == [(1, 0)]
    assert select_pairs(responses, scores, strategy="all_pairs") == [
        (1, 0), (1, 3), (3, 0), (4, 0), (4, 3)
    ]  # fmt: skip
