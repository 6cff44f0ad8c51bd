"""Preference-pair selection from scored candidate responses.

Self-Rewarding LMs (Yuan et al. 2024, section 2.3) build one pair per prompt from the
highest- and lowest-scored of the N candidates, ``(y_w, y_l) = (argmax_i r_i, argmin_i
r_i)``, and skip prompts whose candidates all tie.  Other strategies: every pair whose
score gap exceeds a margin, and Meta-Rewarding's length control (Wu et al. 2024,
section 3.1): among near-best responses choose the shortest, among near-worst the longest.

Every strategy guarantees ``score[chosen] > score[rejected]`` (strictly) for each pair.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "PAIR_STRATEGIES",
    "Pair",
    "PairStrategy",
    "anchored_pair",
    "register_pair_strategy",
    "select_pairs",
]


class Pair(NamedTuple):
    """Indices into the candidate list: ``chosen`` is preferred over ``rejected``."""

    chosen: int
    rejected: int


#: ``fn(responses, scores, *, margin, length_tolerance, rng) -> list[(chosen, rejected)]``;
#: called with the parsable candidates only (every score a finite float).
PairStrategy = Callable[..., list[tuple[int, int]]]


def _best_worst(
    responses: Sequence[str],
    scores: Sequence[float],
    *,
    margin: float = 0.0,
    length_tolerance: float = 0.0,
    rng: Any = None,
) -> list[tuple[int, int]]:
    """The paper's rule: max vs min (first occurrence on ties); none when the gap <= margin."""
    if len(scores) < 2:
        return []
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] - scores[worst] <= margin:
        return []
    return [(best, worst)]


def _all_pairs(
    responses: Sequence[str],
    scores: Sequence[float],
    *,
    margin: float = 0.0,
    length_tolerance: float = 0.0,
    rng: Any = None,
) -> list[tuple[int, int]]:
    """Every ordered pair with ``score[chosen] - score[rejected] > margin``."""
    n = len(scores)
    return [(i, j) for i in range(n) for j in range(n) if scores[i] - scores[j] > margin]


def _length_aware(
    responses: Sequence[str],
    scores: Sequence[float],
    *,
    margin: float = 0.0,
    length_tolerance: float = 0.0,
    rng: Any = None,
) -> list[tuple[int, int]]:
    """Meta-Rewarding length control (Wu et al. 2024): shortest near-best vs longest near-worst.

    Chosen: the shortest response (in characters; earliest index on ties) whose score is
    within ``length_tolerance`` of the best; rejected: the longest response within
    ``length_tolerance`` of the worst whose score is more than ``margin`` below the
    chosen one. When the tolerance is so wide that the shortest near-best response has no
    such partner, the next shortest is tried; the best and worst always qualify.
    """
    if len(scores) < 2:
        return []
    hi, lo = max(scores), min(scores)
    if hi - lo <= margin:
        return []
    top = sorted(
        (i for i in range(len(scores)) if scores[i] >= hi - length_tolerance),
        key=lambda i: (len(responses[i]), i),
    )
    bottom = [i for i in range(len(scores)) if scores[i] <= lo + length_tolerance]
    for c in top:  # bounded: at most len(scores) tries
        partners = [j for j in bottom if scores[c] - scores[j] > margin]
        if partners:
            r = max(partners, key=lambda j: (len(responses[j]), -j))
            return [(c, r)]
    return []  # pragma: no cover - the best and the worst always form a pair


PAIR_STRATEGIES: dict[str, PairStrategy] = {
    "best_worst": _best_worst,
    "all_pairs": _all_pairs,
    "length_aware": _length_aware,
}


def register_pair_strategy(name: str, fn: PairStrategy) -> None:
    """Make ``fn`` available as ``select_pairs(..., strategy=name)``."""
    if not isinstance(name, str) or not name:
        raise ValueError("a pair strategy needs a non-empty string name")
    if not callable(fn):
        raise TypeError(f"pair strategy {name!r} must be callable")
    PAIR_STRATEGIES[name] = fn


def _is_score(s: Any) -> bool:
    return s is not None and not isinstance(s, bool) and math.isfinite(s)


def select_pairs(
    responses: list[str],
    scores: list[float | None],
    *,
    strategy: str | PairStrategy = "best_worst",
    margin: float = 0.0,
    length_tolerance: float = 0.0,
    rng: Any = None,
) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` index pairs into ``responses`` with chosen scored strictly higher.

    Unparsable scores (``None`` or non-finite) are dropped first. ``strategy`` is a name
    in :data:`PAIR_STRATEGIES` (``"best_worst"``, ``"all_pairs"``, ``"length_aware"``) or
    a callable with the same keyword arguments, which sees only the parsable candidates
    (its indices refer to them; they are mapped back here and checked). ``rng`` is passed
    to the strategy untouched (the built-in ones are deterministic).
    """
    if len(responses) != len(scores):
        raise ValueError(
            f"got {len(responses)} responses but {len(scores)} scores; pass one score per "
            "response (None for unparsable)"
        )
    for i, s in enumerate(scores):
        if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Real)):
            raise TypeError(f"score {i} must be a float or None, got {type(s).__name__}")
    if not isinstance(margin, numbers.Real) or not math.isfinite(margin) or margin < 0:
        raise ValueError(
            f"margin must be a finite number >= 0, got {margin!r}; a negative margin would "
            "pair equally scored responses"
        )
    if (
        not isinstance(length_tolerance, numbers.Real)
        or not math.isfinite(length_tolerance)
        or length_tolerance < 0
    ):
        raise ValueError(f"length_tolerance must be a finite number >= 0, got {length_tolerance!r}")
    if isinstance(strategy, str):
        if strategy not in PAIR_STRATEGIES:
            raise ValueError(
                f"unknown pair strategy {strategy!r}; choose one of {sorted(PAIR_STRATEGIES)} "
                "or pass a callable"
            )
        fn = PAIR_STRATEGIES[strategy]
    elif callable(strategy):
        fn = strategy
    else:
        raise TypeError(f"strategy must be a name or a callable, got {type(strategy).__name__}")

    keep = [i for i, s in enumerate(scores) if _is_score(s)]
    kept_scores = [float(scores[i]) for i in keep]  # type: ignore[arg-type]
    kept_responses = [responses[i] for i in keep]
    raw = fn(kept_responses, kept_scores, margin=margin, length_tolerance=length_tolerance, rng=rng)
    pairs: list[tuple[int, int]] = []
    for p in raw:
        try:
            c, r = p
        except (TypeError, ValueError):
            raise TypeError(f"pair strategy returned {p!r}; expected (chosen, rejected)") from None
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (c, r)) or not (
            0 <= c < len(keep) and 0 <= r < len(keep)
        ):
            raise ValueError(
                f"pair strategy returned indices {p!r}, outside the {len(keep)} parsable candidates"
            )
        if not kept_scores[c] > kept_scores[r]:
            raise ValueError(
                f"pair strategy returned {p!r} with chosen score {kept_scores[c]} not above "
                f"rejected score {kept_scores[r]}; the chosen response must score strictly higher"
            )
        pairs.append(Pair(keep[c], keep[r]))
    return pairs


def anchored_pair(
    responses: Sequence[str],
    scores: Sequence[float | None],
    anchor_responses: Sequence[str],
    anchor_scores: Sequence[float | None],
    *,
    strategy: str = "best_worst",
    margin: float = 0.0,
    length_tolerance: float = 0.0,
) -> Pair | None:
    """Anchored rejection (Temporal Self-Rewarding, Wang et al. 2025, arXiv 2508.06026):
    chosen is the best-scored of the policy's ``responses``, rejected the worst-scored of
    a frozen earlier model's ``anchor_responses`` (``Pair.rejected`` indexes those); None
    unless ``score_chosen > score_rejected + margin``. Unparsable scores are skipped.

    ``strategy="length_aware"`` applies Meta-Rewarding's length control within each side:
    the shortest policy response within ``length_tolerance`` of the best, the longest
    anchor response within ``length_tolerance`` of the worst.
    """
    if strategy not in ("best_worst", "length_aware"):
        raise ValueError(f"anchored pairs take best_worst or length_aware, not {strategy!r}")
    mine = [i for i, s in enumerate(scores) if _is_score(s)]
    theirs = [j for j, s in enumerate(anchor_scores) if _is_score(s)]
    if not mine or not theirs:
        return None
    hi = max(scores[i] for i in mine)  # type: ignore[type-var]
    lo = min(anchor_scores[j] for j in theirs)  # type: ignore[type-var]
    tol = length_tolerance if strategy == "length_aware" else 0.0
    top = [i for i in mine if scores[i] >= hi - tol]  # type: ignore[operator]
    bottom = [j for j in theirs if anchor_scores[j] <= lo + tol]  # type: ignore[operator]
    if strategy == "length_aware":
        top.sort(key=lambda i: (len(responses[i]), i))
    for c in top:
        partners = [j for j in bottom if scores[c] - anchor_scores[j] > margin]  # type: ignore[operator]
        if partners:
            if strategy == "length_aware":
                return Pair(c, max(partners, key=lambda j: (len(anchor_responses[j]), -j)))
            return Pair(c, partners[0])
    return None
