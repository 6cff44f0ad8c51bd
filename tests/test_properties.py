"""Property tests (hypothesis) for score parsing, pair selection and ROUGE-L."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from self_rewarding_lm_pytorch.judge import DEFAULT_REWARD_CONFIG, RewardConfig
from self_rewarding_lm_pytorch.pairs import select_pairs
from self_rewarding_lm_pytorch.prompts import (
    BEGIN,
    END,
    lcs_length,
    parse_generated_prompt,
    rouge_l,
)

SEED_CONFIG = RewardConfig(
    prompt_template="Rate: {{ prompt }} {{ response }}",
    reward_regex_template="""
        Rating: {{ reward }}
        """,
)
FIRST_CONFIG = RewardConfig(
    prompt_template="{{ prompt }}{{ response }}",
    reward_regex_template="[{{ reward }}/10]",
    match="first",
)


def _fragile_parser(text: str) -> float | None:
    return 1.0 / (len(text) % 3) if text else None  # ZeroDivisionError on some inputs


PARSER_CONFIG = RewardConfig(
    prompt_template="{{ prompt }}{{ response }}", parse_reward=_fragile_parser
)

score_text = st.text() | st.builds(
    lambda a, n, b: f"{a}Score: {n}{b}", st.text(), st.floats(allow_nan=True), st.text()
)


@given(score_text)
@settings(max_examples=300)
def test_parse_never_raises_and_returns_valid_scores(text):
    for cfg in (DEFAULT_REWARD_CONFIG, SEED_CONFIG, FIRST_CONFIG, PARSER_CONFIG):
        score, reason = cfg.parse_with_reason(text)
        assert (score is None) != (reason is None)
        assert cfg.parse(text) == score
        if score is not None:
            assert math.isfinite(score)
    score = DEFAULT_REWARD_CONFIG.parse(text)
    assert score is None or 0 <= score <= 5


@given(st.text(), st.integers(0, 5), st.sampled_from([" ", "  ", "\n", "\t", ""]))
def test_last_score_in_free_text_is_found(prefix, value, space):
    assert DEFAULT_REWARD_CONFIG.parse(f"{prefix}\nScore:{space}{value}") == value
    assert SEED_CONFIG.parse(f"{prefix}\nRating:{space}{value}") == value


scores_strategy = st.lists(
    st.one_of(st.none(), st.integers(-3, 3).map(float), st.floats(-10, 10), st.just(float("nan"))),
    min_size=0,
    max_size=8,
)


@given(
    scores_strategy,
    st.sampled_from(["best_worst", "all_pairs", "length_aware"]),
    st.floats(0, 3),
    st.floats(0, 5),
    st.data(),
)
@settings(max_examples=300)
def test_select_pairs_invariants(scores, strategy, margin, tolerance, data):
    responses = [data.draw(st.text(max_size=6)) for _ in scores]
    pairs = select_pairs(
        responses, scores, strategy=strategy, margin=margin, length_tolerance=tolerance
    )
    assert len(set(pairs)) == len(pairs)
    for c, r in pairs:
        assert 0 <= c < len(scores) and 0 <= r < len(scores)
        assert scores[c] is not None and scores[r] is not None
        assert scores[c] > scores[r]
        assert scores[c] - scores[r] > margin
    valid = [s for s in scores if s is not None and math.isfinite(s)]
    if strategy == "all_pairs":
        expected = sum(1 for a in valid for b in valid if a - b > margin)
        assert len(pairs) == expected
    else:
        assert len(pairs) == (1 if valid and max(valid) - min(valid) > margin else 0)


@given(scores_strategy)
def test_best_worst_one_pair_iff_two_distinct_parsable_scores(scores):
    pairs = select_pairs([""] * len(scores), scores)
    distinct = {s for s in scores if s is not None and math.isfinite(s)}
    assert len(pairs) == (1 if len(distinct) >= 2 else 0)
    if pairs:
        (c, r) = pairs[0]
        assert scores[c] == max(distinct) and scores[r] == min(distinct)


def _dp_lcs(a, b) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


small_seqs = st.lists(st.integers(0, 5), max_size=40)


@given(small_seqs, small_seqs)
@settings(max_examples=300)
def test_bit_parallel_lcs_equals_dp(a, b):
    assert lcs_length(a, b) == _dp_lcs(a, b) == lcs_length(b, a)


@given(st.text(max_size=60), st.text(max_size=60))
def test_rouge_l_is_a_symmetric_similarity(a, b):
    r = rouge_l(a, b)
    assert 0.0 <= r <= 1.0
    assert r == rouge_l(b, a)


@given(st.text())
def test_parse_generated_prompt_never_raises(text):
    out = parse_generated_prompt(text)
    assert out is None or (out == out.strip() and out and END not in out)


@given(st.text().filter(lambda s: BEGIN not in s and END not in s and s.strip()))
def test_parse_generated_prompt_round_trip(task):
    assert parse_generated_prompt(f"noise {BEGIN}{task}{END} more") == task.strip()
