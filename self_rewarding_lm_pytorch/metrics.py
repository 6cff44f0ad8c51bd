"""Reward-modelling metrics: how well a judge's scores agree with gold scores.

These are the measures of the paper's Table 3 (Yuan et al., 2024, section 3.2): pairwise
accuracy, exact match, Spearman and Kendall correlation, plus the judge's parse rate and
(for judges that write one verdict per criterion) per-criterion verdict accuracy.

Unparsable predictions are written ``None`` (``NaN`` counts the same) and are never
dropped silently:

* :func:`parse_rate` is the fraction that parsed;
* :func:`exact_match` counts an unparsable prediction as wrong;
* :func:`pairwise_accuracy` counts a pair with an unparsable side as a tie (0.5, chance);
* :func:`spearman` and :func:`kendall_tau` need numbers, so they use the parsed items
  only: report them next to the parse rate.

Gold scores must all be numbers.  Metrics that have nothing to measure (no pair with
different gold scores, a constant input to a correlation) return ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "exact_match",
    "kendall_tau",
    "pairwise_accuracy",
    "parse_rate",
    "reward_metrics",
    "spearman",
    "verdict_accuracy",
]

_PAIR_BLOCK = 1 << 22  # elements per block of the pairwise comparisons (bounded memory)


def _pred_array(pred: Sequence[float | None], name: str = "pred") -> np.ndarray:
    if isinstance(pred, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers or None, got a string")
    out = np.empty(len(pred), dtype=np.float64)
    for i, p in enumerate(pred):
        if p is None:
            out[i] = np.nan
            continue
        try:
            if isinstance(p, (str, bytes, bool, np.bool_)):
                raise TypeError
            out[i] = float(p)
        except (TypeError, ValueError):
            raise TypeError(
                f"{name}[{i}] is {type(p).__name__} {p!r}; expected a number or None (unparsable)"
            ) from None
        if math.isinf(out[i]):
            raise ValueError(f"{name}[{i}] is infinite; scores must be finite numbers or None")
    return out


def _pair(pred: Sequence[float | None], gold: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p, g = _pred_array(pred), _pred_array(gold, "gold")
    if len(p) != len(g):
        raise ValueError(f"pred has {len(p)} items but gold has {len(g)}; pass one score each")
    if len(p) == 0:
        raise ValueError("no scores given; metrics need at least one item")
    if np.isnan(g).any():
        i = int(np.flatnonzero(np.isnan(g))[0])
        raise ValueError(f"gold[{i}] is None/NaN; every gold score must be a number")
    return p, g


def parse_rate(pred: Sequence[float | None]) -> float:
    """Fraction of predictions that are numbers (not ``None``/``NaN``)."""
    p = _pred_array(pred)
    if len(p) == 0:
        raise ValueError("no predictions given; parse_rate needs at least one")
    return float(np.mean(~np.isnan(p)))


def exact_match(pred: Sequence[float | None], gold: Sequence[float]) -> float:
    """Fraction of items whose prediction, rounded to the nearest integer (halves up),
    equals the gold score; unparsable predictions count as wrong."""
    p, g = _pair(pred, gold)
    ok = ~np.isnan(p)
    hits = np.zeros(len(p), dtype=bool)
    hits[ok] = np.floor(p[ok] + 0.5) == g[ok]
    return float(hits.mean())


def _row_blocks(n: int):
    step = max(1, _PAIR_BLOCK // max(n, 1))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def pairwise_accuracy(
    pred: Sequence[float | None],
    gold: Sequence[float],
    *,
    groups: Sequence[object] | None = None,
) -> float:
    """Fraction of pairs with different gold scores that the prediction orders the same way.

    Over all pairs ``i < j`` with ``gold[i] != gold[j]`` (and, given ``groups``, the same
    group, e.g. responses to one prompt): a pair scores 1 when ``pred`` orders it like
    ``gold``, 0 when it orders it the other way, and 0.5 when ``pred`` ties it or either
    prediction is unparsable (a judge that cannot separate two responses is at chance).
    Returns ``nan`` when no pair has different gold scores.  Without ties this is
    ``(1 + tau) / 2`` for Kendall's tau.
    """
    p, g = _pair(pred, gold)
    n = len(p)
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} items but gold has {n}; pass one each")
        ids: dict[object, int] = {}
        gid = np.asarray([ids.setdefault(x, len(ids)) for x in groups])
    missing = np.isnan(p)
    p = np.where(missing, 0.0, p)
    agree = ties = total = 0.0
    for lo, hi in _row_blocks(n):
        dg = np.sign(g[lo:hi, None] - g[None, :])
        dp = np.sign(p[lo:hi, None] - p[None, :])
        dp[missing[lo:hi, None] | missing[None, :]] = 0.0
        valid = dg != 0
        if groups is not None:
            valid &= gid[lo:hi, None] == gid[None, :]
        total += valid.sum()
        agree += (valid & (dp == dg)).sum()
        ties += (valid & (dp == 0)).sum()
    if total == 0:
        return math.nan
    # every unordered pair was counted twice (i, j) and (j, i): the ratio is unchanged
    return float((agree + 0.5 * ties) / total)


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``)."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    first = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(first) - 1
    bounds = np.flatnonzero(np.r_[first, True])
    average = (bounds[:-1] + bounds[1:] - 1) / 2.0 + 1.0
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def _parsed(pred: Sequence[float | None], gold: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p, g = _pair(pred, gold)
    ok = ~np.isnan(p)
    return p[ok], g[ok]


def spearman(pred: Sequence[float | None], gold: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks) over the parsed
    items; ``nan`` for fewer than two of them or a constant side."""
    p, g = _parsed(pred, gold)
    if len(p) < 2:
        return math.nan
    rp, rg = _rankdata(p), _rankdata(g)
    rp -= rp.mean()
    rg -= rg.mean()
    denom = math.sqrt(float(rp @ rp) * float(rg @ rg))
    return float(rp @ rg / denom) if denom > 0 else math.nan


def _tied_pairs(a: np.ndarray) -> float:
    _, counts = np.unique(a, return_counts=True)
    return float((counts * (counts - 1) // 2).sum())


def kendall_tau(pred: Sequence[float | None], gold: Sequence[float]) -> float:
    """Kendall's tau-b over the parsed items: ``(C - D) / sqrt((n0 - n1) (n0 - n2))`` with
    ``C``/``D`` the concordant/discordant pairs, ``n0 = n(n-1)/2`` and ``n1``/``n2`` the
    pairs tied in ``pred``/``gold``; ``nan`` when either side is constant."""
    p, g = _parsed(pred, gold)
    n = len(p)
    if n < 2:
        return math.nan
    s = 0.0
    for lo, hi in _row_blocks(n):
        s += float(
            (np.sign(p[lo:hi, None] - p[None, :]) * np.sign(g[lo:hi, None] - g[None, :])).sum()
        )
    s /= 2.0  # ordered pairs -> unordered pairs
    n0 = n * (n - 1) / 2.0
    denom = math.sqrt((n0 - _tied_pairs(p)) * (n0 - _tied_pairs(g)))
    return s / denom if denom > 0 else math.nan


def verdict_accuracy(
    pred: Sequence[str | None],
    gold: Sequence[str],
    names: Sequence[Sequence[str]] | None = None,
    *,
    fail: str = "n",
) -> dict[str, object]:
    """Accuracy of a judge's per-criterion verdicts (``yyny``-style strings).

    ``names[i][k]`` names the criterion that character ``k`` of ``gold[i]`` judges (by
    default its position, ``"0"``, ``"1"``, ...).  A missing prediction (``None``) or one of
    the wrong length counts as wrong on every criterion of its item.

    Returns ``{"accuracy", "item_accuracy", "parse_rate", "n", "per_criterion"}`` where
    ``accuracy`` is over all verdicts, ``item_accuracy`` the fraction of items with every
    verdict right, and ``per_criterion[name]`` holds ``accuracy``, ``n``, ``fail_recall``
    (of the verdicts whose gold is ``fail``, the fraction the judge flagged; a low value is
    a blind spot a policy can reward-hack) and ``n_fail``.
    """
    if isinstance(pred, str) or isinstance(gold, str):
        raise TypeError("pred and gold must be sequences of verdict strings, not one string")
    if len(pred) != len(gold):
        raise ValueError(f"pred has {len(pred)} items but gold has {len(gold)}; pass one each")
    if not gold:
        raise ValueError("no verdicts given; verdict_accuracy needs at least one item")
    if names is not None and len(names) != len(gold):
        raise ValueError(f"names has {len(names)} items but gold has {len(gold)}; pass one each")
    stats: dict[str, list[int]] = {}  # name -> [n, correct, n_fail, fail_flagged]
    correct = total = items_right = parsed = 0
    for i, g in enumerate(gold):
        if not isinstance(g, str) or not g:
            raise TypeError(f"gold[{i}] must be a non-empty verdict string, got {g!r}")
        item_names = [str(k) for k in range(len(g))] if names is None else list(names[i])
        if len(item_names) != len(g):
            raise ValueError(
                f"names[{i}] has {len(item_names)} criteria but gold[{i}] = {g!r} has {len(g)} verdicts"
            )
        p = pred[i]
        usable = isinstance(p, str) and len(p) == len(g)
        parsed += usable
        all_right = usable
        for k, name in enumerate(item_names):
            ok = usable and p[k] == g[k]
            st = stats.setdefault(name, [0, 0, 0, 0])
            st[0] += 1
            st[1] += ok
            if g[k] == fail:
                st[2] += 1
                st[3] += usable and p[k] == fail
            all_right = all_right and ok
            correct += ok
            total += 1
        items_right += all_right
    per = {
        name: {
            "accuracy": c / n,
            "n": n,
            "fail_recall": (flagged / n_fail) if n_fail else math.nan,
            "n_fail": n_fail,
        }
        for name, (n, c, n_fail, flagged) in stats.items()
    }
    return {
        "accuracy": correct / total,
        "item_accuracy": items_right / len(gold),
        "parse_rate": parsed / len(gold),
        "n": len(gold),
        "per_criterion": per,
    }


def reward_metrics(
    pred: Sequence[float | None],
    gold: Sequence[float],
    *,
    groups: Sequence[object] | None = None,
) -> dict[str, float]:
    """All score metrics at once: ``pairwise_accuracy`` (within ``groups`` when given),
    ``exact_match``, ``spearman``, ``kendall_tau``, ``parse_rate`` and ``n``."""
    return {
        "pairwise_accuracy": pairwise_accuracy(pred, gold, groups=groups),
        "exact_match": exact_match(pred, gold),
        "spearman": spearman(pred, gold),
        "kendall_tau": kendall_tau(pred, gold),
        "parse_rate": parse_rate(pred),
        "n": float(len(gold)),
    }
