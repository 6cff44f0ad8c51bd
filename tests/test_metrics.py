"""Reward-modelling metrics against scipy.stats and brute-force references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from self_rewarding_lm_pytorch import metrics
from self_rewarding_lm_pytorch.metrics import (
    exact_match,
    kendall_tau,
    pairwise_accuracy,
    parse_rate,
    reward_metrics,
    spearman,
    verdict_accuracy,
)


def _random_scores(seed: int, n: int, ties: bool) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    if ties:
        gold = rng.integers(0, 6, n).astype(float)
        pred = np.clip(gold + rng.integers(-2, 3, n), 0, 5).astype(float)
    else:
        gold = rng.normal(size=n)
        pred = gold + rng.normal(size=n)
    return pred.tolist(), gold.tolist()


def _brute_pairwise(pred, gold, groups=None) -> float:
    """Definition, written out: pairs with different gold; agree 1, tie/None 0.5, else 0."""
    total = score = 0.0
    for i, j in itertools.combinations(range(len(gold)), 2):
        if gold[i] == gold[j] or (groups is not None and groups[i] != groups[j]):
            continue
        total += 1
        if pred[i] is None or pred[j] is None or pred[i] == pred[j]:
            score += 0.5
        elif (pred[i] > pred[j]) == (gold[i] > gold[j]):
            score += 1
    return score / total if total else math.nan


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_and_kendall_match_scipy(seed: int, ties: bool) -> None:
    pred, gold = _random_scores(seed, 200, ties)
    assert spearman(pred, gold) == pytest.approx(stats.spearmanr(pred, gold).statistic, abs=1e-12)
    tau = stats.kendalltau(pred, gold, variant="b").statistic
    assert kendall_tau(pred, gold) == pytest.approx(tau, abs=1e-12)


def test_correlations_use_parsed_items_only() -> None:
    pred, gold = _random_scores(3, 120, ties=True)
    pred = [None if i % 7 == 0 else p for i, p in enumerate(pred)]
    pred[5] = float("nan")  # NaN counts as unparsable too
    keep = [i for i, p in enumerate(pred) if p is not None and not math.isnan(p)]
    p_kept, g_kept = [pred[i] for i in keep], [gold[i] for i in keep]
    assert spearman(pred, gold) == pytest.approx(stats.spearmanr(p_kept, g_kept).statistic)
    assert kendall_tau(pred, gold) == pytest.approx(stats.kendalltau(p_kept, g_kept).statistic)
    assert parse_rate(pred) == pytest.approx(len(keep) / len(pred))


def test_kendall_blocks_match_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    pred, gold = _random_scores(4, 301, ties=True)
    monkeypatch.setattr(metrics, "_PAIR_BLOCK", 1000)  # forces many row blocks
    assert kendall_tau(pred, gold) == pytest.approx(stats.kendalltau(pred, gold).statistic)
    assert pairwise_accuracy(pred, gold) == pytest.approx(_brute_pairwise(pred, gold))


@pytest.mark.parametrize("seed", [0, 1])
def test_pairwise_accuracy_without_ties_is_half_one_plus_tau(seed: int) -> None:
    pred, gold = _random_scores(seed, 300, ties=False)
    tau = stats.kendalltau(pred, gold).statistic
    assert pairwise_accuracy(pred, gold) == pytest.approx((1 + tau) / 2, abs=1e-12)


def test_pairwise_accuracy_ties_none_and_groups_match_definition() -> None:
    pred, gold = _random_scores(5, 80, ties=True)
    pred = [None if i % 9 == 0 else p for i, p in enumerate(pred)]
    groups = [i // 4 for i in range(80)]
    assert pairwise_accuracy(pred, gold) == pytest.approx(_brute_pairwise(pred, gold))
    assert pairwise_accuracy(pred, gold, groups=groups) == pytest.approx(
        _brute_pairwise(pred, gold, groups)
    )


def test_pairwise_accuracy_hand_examples() -> None:
    gold = [0, 1, 2]
    assert pairwise_accuracy([0.1, 0.5, 0.9], gold) == 1.0
    assert pairwise_accuracy([3, 2, 1], gold) == 0.0
    assert pairwise_accuracy([1, 1, 1], gold) == 0.5  # a constant judge is at chance
    # pairs (0,1) agree, (0,2) agree, (1,2) tie -> (1 + 1 + 0.5) / 3
    assert pairwise_accuracy([0, 2, 2], gold) == pytest.approx(2.5 / 3)
    assert pairwise_accuracy([None, 1, 2], gold) == pytest.approx(2 / 3)
    assert math.isnan(pairwise_accuracy([1, 2, 3], [4, 4, 4]))
    # responses to different prompts are never compared when groups are given
    assert pairwise_accuracy([0, 1, 1, 0], [0, 1, 0, 1], groups=["a", "a", "b", "b"]) == 0.5


def test_exact_match_rounds_half_up_and_counts_none_wrong() -> None:
    assert exact_match([2.5, 2.49, 4.0, None], [3, 2, 4, 1]) == 1.0 * 3 / 4
    assert exact_match([1.5, 0.4], [1, 1]) == 0.0
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 6, 500)
    pred = gold + rng.normal(scale=0.6, size=500)
    assert exact_match(pred.tolist(), gold.tolist()) == pytest.approx(
        float(np.mean(np.floor(pred + 0.5) == gold))
    )


def test_parse_rate_and_constant_inputs() -> None:
    assert parse_rate([None, 1, float("nan"), 2.0]) == 0.5
    assert math.isnan(spearman([1, 1, 1], [0, 1, 2]))
    assert math.isnan(kendall_tau([None, 1], [0, 1]))


def test_reward_metrics_collects_everything() -> None:
    pred, gold = _random_scores(6, 60, ties=True)
    out = reward_metrics(pred, gold)
    assert out["pairwise_accuracy"] == pytest.approx(_brute_pairwise(pred, gold))
    assert out["kendall_tau"] == pytest.approx(stats.kendalltau(pred, gold).statistic)
    assert out["spearman"] == pytest.approx(stats.spearmanr(pred, gold).statistic)
    assert out["parse_rate"] == 1.0 and out["n"] == 60


def test_bad_inputs_raise_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="pass one score each"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="gold\\[1\\]"):
        exact_match([1, 2], [1, None])
    with pytest.raises(TypeError, match="expected a number or None"):
        pairwise_accuracy(["3", 2], [1, 2])
    with pytest.raises(TypeError, match="not one string"):
        verdict_accuracy("yy", "yn")
    with pytest.raises(ValueError, match="at least one"):
        kendall_tau([], [])
    with pytest.raises(ValueError, match="infinite"):
        spearman([float("inf"), 1], [1, 2])
    with pytest.raises(ValueError, match="groups"):
        pairwise_accuracy([1, 2], [1, 2], groups=[0])


def test_verdict_accuracy_per_criterion() -> None:
    gold = ["yyn", "ynn", "yy"]
    names = [["len", "start", "upper"], ["len", "start", "has"], ["len", "has"]]
    pred = ["yyy", "ynn", None]
    out = verdict_accuracy(pred, gold, names)
    per = out["per_criterion"]
    assert per["len"]["accuracy"] == pytest.approx(2 / 3) and per["len"]["n"] == 3
    assert math.isnan(per["len"]["fail_recall"]) and per["len"]["n_fail"] == 0
    assert per["start"]["accuracy"] == 1.0 and per["start"]["fail_recall"] == 1.0
    assert per["upper"]["accuracy"] == 0.0 and per["upper"]["fail_recall"] == 0.0  # blind spot
    assert per["has"]["accuracy"] == 0.5 and per["has"]["n"] == 2
    assert per["has"]["fail_recall"] == 1.0 and per["has"]["n_fail"] == 1
    assert out["accuracy"] == pytest.approx(5 / 8)
    assert out["item_accuracy"] == pytest.approx(1 / 3)
    assert out["parse_rate"] == pytest.approx(2 / 3)
    # a wrong-length prediction is wrong everywhere; default names are positions
    assert verdict_accuracy(["yy"], ["yyy"])["per_criterion"]["0"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="names\\[0\\]"):
        verdict_accuracy(["y"], ["yy"], [["len"]])


def test_verdict_accuracy_matches_elementwise_count_on_random_data() -> None:
    rng = np.random.default_rng(7)
    gold = ["".join(rng.choice(["y", "n"], size=int(k))) for k in rng.integers(2, 5, 300)]
    pred = ["".join(c if rng.random() < 0.8 else "yn"[c == "y"] for c in g) for g in gold]
    out = verdict_accuracy(pred, gold)
    flat = [(p == g) for ps, gs in zip(pred, gold) for p, g in zip(ps, gs)]
    assert out["accuracy"] == pytest.approx(np.mean(flat))
    first = np.mean([p[0] == g[0] for p, g in zip(pred, gold)])
    assert out["per_criterion"]["0"]["accuracy"] == pytest.approx(first)
