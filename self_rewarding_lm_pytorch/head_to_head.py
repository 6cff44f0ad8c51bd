"""Head-to-head evaluation: judge two models' responses to the same prompts and summarise
the per-item preferences (the win rate of the paper's AlpacaEval 2.0 comparisons).

Each item ``i`` gets a preference ``p_i`` = P(A better) in [0, 1]: from a pointwise judge,
1, 0 or 1/2 as A's score is above, below or equal to B's; from a
:class:`~self_rewarding_lm_pytorch.judge.PairwiseJudge`, its both-order preference (a tie
counts 1/2). Items without one (a score or verdict that did not parse) are left out of the
statistics and counted as ``unjudged``. Over the ``n`` judged items:

* win rate ``w = mean(p_i)`` (ties count 1/2, AlpacaEval's convention); standard error
  ``se = sd(p_i) / sqrt(n)`` (sample sd, ``n - 1``); 95% interval ``w -/+ 1.96 se``,
  clipped to [0, 1];
* with ``bootstrap=B``: ``B`` seeded paired resamples of the items (A's and B's response to
  a prompt stay together), giving the resampled win rates' sd and 2.5/97.5 percentiles,
  and the same for the length-controlled win rate;
* length-controlled win rate (Dubois et al. 2024): fit
  ``logit P(A preferred) = theta + phi * tanh(d_i / sd(d))``, ``d_i`` = len(A) - len(B) in
  characters, by logistic regression weighted by the fractional preferences (maximise
  ``sum p_i log s_i + (1 - p_i) log(1 - s_i) - ridge * phi^2 / 2``, Newton's method in
  float64); the LC win rate is ``sigmoid(theta)``, the preference with the length term at 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import torch

__all__ = [
    "HeadToHead",
    "alpaca_eval_rows",
    "head_to_head",
    "length_controlled_fit",
    "preference_from_scores",
    "summarize",
]

#: the two-sided 95% normal quantile (1.95996...)
Z95 = NormalDist().inv_cdf(0.975)
#: the default L2 penalty on the length coefficient ``phi``: keeps the fit finite when
#: length separates the preferences perfectly and is negligible otherwise
LC_RIDGE = 1e-3
_MAX_ITER, _MAX_HALVINGS, _TOL = 100, 30, 1e-12


def preference_from_scores(score_a: float | None, score_b: float | None) -> float | None:
    """P(A better) from two pointwise scores: 1, 0 or 0.5 (equal); None if one is missing."""
    if score_a is None or score_b is None:
        return None
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


def _winner(p: float | None) -> str | None:
    return None if p is None else "a" if p > 0.5 else "b" if p < 0.5 else "tie"


def _objective(
    beta: torch.Tensor, X: torch.Tensor, p: torch.Tensor, w: torch.Tensor, ridge: float
) -> torch.Tensor:
    eta = beta @ X.T
    logsig = torch.nn.functional.logsigmoid
    ll = w * (p * logsig(eta) + (1 - p) * logsig(-eta))
    return ll.sum(1) - 0.5 * ridge * beta[:, 1] ** 2


def _fit(p: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(theta, phi)`` per row of the weights ``w`` (B x n): Newton steps with step halving
    on the penalised weighted log-likelihood, each row until its step is below ``_TOL``
    (at most ``_MAX_ITER`` steps)."""
    X = torch.stack([torch.ones_like(x), x], 1)
    pen = torch.tensor([0.0, ridge], dtype=torch.float64)
    jitter = 1e-12 * torch.eye(2, dtype=torch.float64)
    beta = torch.zeros(w.shape[0], 2, dtype=torch.float64)
    obj = _objective(beta, X, p, w, ridge)
    active = torch.arange(w.shape[0])
    for _ in range(_MAX_ITER):
        b, wa, oa = beta[active], w[active], obj[active]
        s = torch.sigmoid(b @ X.T)
        grad = (wa * (p - s)) @ X - pen * b
        hess = torch.einsum("bn,ni,nj->bij", wa * s * (1 - s), X, X) + torch.diag(pen) + jitter
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        slack = 1e-12 * (1 + oa.abs())  # a rounding-level decrease is no decrease
        for _ in range(_MAX_HALVINGS):
            new_obj = _objective(b + step, X, p, wa, ridge)
            worse = new_obj < oa - slack
            if not worse.any():
                break
            step = torch.where(worse.unsqueeze(1), step / 2, step)
        step = torch.where(worse.unsqueeze(1), torch.zeros_like(step), step)
        beta[active] = b + step
        obj[active] = torch.where(worse, oa, new_obj)
        active = active[step.abs().amax(1) >= _TOL]
        if not len(active):
            break
    return beta


def _length_feature(len_a: Sequence[float], len_b: Sequence[float]) -> torch.Tensor:
    """``tanh(d / sd(d))`` with ``d = len_a - len_b`` (all zeros when ``sd(d)`` is 0)."""
    d = torch.tensor(len_a, dtype=torch.float64) - torch.tensor(len_b, dtype=torch.float64)
    sd = float(d.std()) if len(d) > 1 else 0.0
    return torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)


def length_controlled_fit(
    preferences: Sequence[float],
    lengths_a: Sequence[float],
    lengths_b: Sequence[float],
    *,
    ridge: float = LC_RIDGE,
) -> dict[str, float]:
    """Fit ``logit P(A preferred) = theta + phi * tanh(d / sd(d))`` (``d`` the length
    differences A - B) to the fractional ``preferences``; returns ``theta``, ``phi`` and
    ``lc_win_rate = sigmoid(theta)``."""
    if not len(preferences) == len(lengths_a) == len(lengths_b) or not preferences:
        raise ValueError(
            f"length_controlled_fit needs one preference and two lengths per item, got "
            f"{len(preferences)}, {len(lengths_a)} and {len(lengths_b)}"
        )
    p = torch.tensor(preferences, dtype=torch.float64)
    theta, phi = _fit(
        p, _length_feature(lengths_a, lengths_b), torch.ones(1, len(p), dtype=torch.float64), ridge
    )[0]
    return {"theta": float(theta), "phi": float(phi), "lc_win_rate": float(torch.sigmoid(theta))}


def _bootstrap(p: torch.Tensor, x: torch.Tensor, n_boot: int, seed: int, ridge: float):
    """Resampled win rates and LC win rates: item counts of ``n_boot`` seeded resamples
    (drawn in blocks of at most ~4M counts) weigh the items."""
    n = len(p)
    gen = torch.Generator().manual_seed(seed)
    block = max(1, (1 << 22) // n)
    rates, lcs = [], []
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        idx = torch.randint(n, (b, n), generator=gen)
        counts = torch.zeros(b, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(b, n, dtype=torch.float64)
        )
        rates.append(counts @ p / n)
        lcs.append(torch.sigmoid(_fit(p, x, counts, ridge)[:, 0]))
    return torch.cat(rates), torch.cat(lcs)


def _interval(values: torch.Tensor) -> list[float]:
    q = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


@dataclass
class HeadToHead:
    """The statistics of a head-to-head comparison of A with B (rates are fractions in
    [0, 1]; the module docstring gives the formulas). ``items`` holds one row per item
    (prompt, both responses, preference, winner, the judge's verdicts or scores)."""

    name_a: str = "A"
    name_b: str = "B"
    judge: str = "pointwise"
    items_total: int = 0
    judged: int = 0
    unjudged: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    win_rate: float | None = None
    tie_rate: float | None = None
    standard_error: float | None = None
    ci95: list[float] | None = None
    lc_win_rate: float | None = None
    lc_theta: float | None = None
    lc_phi: float | None = None
    lc_ridge: float = LC_RIDGE
    bootstrap: int = 0
    bootstrap_seed: int = 0
    bootstrap_standard_error: float | None = None
    bootstrap_ci95: list[float] | None = None
    lc_bootstrap_ci95: list[float] | None = None
    position_consistency: float | None = None
    position_checked: int = 0
    mean_chars_a: float | None = None
    mean_chars_b: float | None = None
    mean_tokens_a: float | None = None
    mean_tokens_b: float | None = None
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self, *, items: bool = False) -> dict[str, Any]:
        """The statistics as a JSON-ready dict (with the per-item rows if ``items``)."""
        d = asdict(self)
        if not items:
            del d["items"]
        return d


def summarize(
    preferences: Sequence[float | None],
    lengths_a: Sequence[float],
    lengths_b: Sequence[float],
    *,
    consistent: Sequence[bool | None] | None = None,
    tokens_a: Sequence[float] | None = None,
    tokens_b: Sequence[float] | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    ridge: float = LC_RIDGE,
    **names: Any,
) -> HeadToHead:
    """The statistics of per-item ``preferences`` (P(A better); None: not judged) with the
    responses' character lengths (and token counts); ``consistent`` per item for a pairwise
    judge (its two orders agree). ``names`` are further :class:`HeadToHead` fields."""
    if not len(preferences) == len(lengths_a) == len(lengths_b):
        raise ValueError(
            f"summarize needs one preference and two lengths per item, got "
            f"{len(preferences)}, {len(lengths_a)} and {len(lengths_b)}"
        )
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an int >= 0 (resamples; 0: off), got {bootstrap!r}")
    keep = [i for i, q in enumerate(preferences) if q is not None]
    p = [float(preferences[i]) for i in keep]
    n = len(p)
    out = HeadToHead(
        items_total=len(preferences),
        judged=n,
        unjudged=len(preferences) - n,
        wins=sum(q > 0.5 for q in p),
        losses=sum(q < 0.5 for q in p),
        ties=sum(q == 0.5 for q in p),
        lc_ridge=ridge,
        bootstrap=bootstrap,
        bootstrap_seed=bootstrap_seed,
        mean_chars_a=_mean(lengths_a),
        mean_chars_b=_mean(lengths_b),
        mean_tokens_a=_mean(tokens_a) if tokens_a is not None else None,
        mean_tokens_b=_mean(tokens_b) if tokens_b is not None else None,
        **names,
    )
    if consistent is not None:
        checked = [c for c in consistent if c is not None]
        out.position_checked = len(checked)
        out.position_consistency = _mean([float(c) for c in checked])
    if n == 0:
        return out
    out.win_rate = _mean(p)
    out.tie_rate = out.ties / n
    if n > 1:
        sd = math.sqrt(math.fsum((q - out.win_rate) ** 2 for q in p) / (n - 1))
        out.standard_error = sd / math.sqrt(n)
        half = Z95 * out.standard_error
        out.ci95 = [max(0.0, out.win_rate - half), min(1.0, out.win_rate + half)]
    la, lb = [lengths_a[i] for i in keep], [lengths_b[i] for i in keep]
    fit = length_controlled_fit(p, la, lb, ridge=ridge)
    out.lc_win_rate, out.lc_theta, out.lc_phi = fit["lc_win_rate"], fit["theta"], fit["phi"]
    if bootstrap:
        t = torch.tensor(p, dtype=torch.float64)
        rates, lcs = _bootstrap(t, _length_feature(la, lb), bootstrap, bootstrap_seed, ridge)
        out.bootstrap_standard_error = float(rates.std()) if bootstrap > 1 else None
        out.bootstrap_ci95, out.lc_bootstrap_ci95 = _interval(rates), _interval(lcs)
    return out


def _token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    from .models import encode_response, wrap_tokenizer

    tok = wrap_tokenizer(tokenizer)
    return [len(encode_response(tok, t)) for t in texts]


def _check_sides(sides: dict[str, Any]) -> None:
    """Three lists of one entry per item (prompts and both models' responses)."""
    bad = [k for k, v in sides.items() if isinstance(v, str) or not isinstance(v, Sequence)]
    if bad:
        raise TypeError(f"head_to_head: {', '.join(bad)} must be lists of strings")
    sizes = {k: len(v) for k, v in sides.items()}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{n} {k}" for k, n in sizes.items())
        raise ValueError(f"head_to_head: got {shown}; give one response of each model per prompt")


def head_to_head(
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    judge: Any,
    *,
    tokenizer: Any = None,
    generator: torch.Generator | int | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    name_a: str = "A",
    name_b: str = "B",
) -> HeadToHead:
    """Judge ``responses_a[i]`` against ``responses_b[i]`` for ``prompts[i]`` and summarise.

    ``judge`` is a pointwise judge (``score(prompts, responses)``: every response is scored
    once, A's and B's in one call, the higher score wins) or a pairwise judge
    (``compare(prompts, responses_a, responses_b)``, both orders). ``tokenizer`` adds mean
    token counts; ``generator`` seeds the judge; ``bootstrap`` resamples (seeded by
    ``bootstrap_seed``) add bootstrap intervals.
    """
    _check_sides({"prompts": prompts, "responses_a": responses_a, "responses_b": responses_b})
    prompts, a, b = list(prompts), list(responses_a), list(responses_b)
    items: list[dict[str, Any]] = []
    consistent: list[bool | None] | None = None
    if hasattr(judge, "compare"):
        kind = "pairwise"
        results = judge.compare(prompts, a, b, generator=generator) if prompts else []
        consistent = [r.consistent for r in results]
        for q, ra, rb, r in zip(prompts, a, b, results):
            items.append({"prompt": q, "response_a": ra, "response_b": rb, **r.to_dict()})
    elif hasattr(judge, "score"):
        kind = "pointwise"
        scored = judge.score(prompts + prompts, a + b, generator=generator) if prompts else []
        for i, (q, ra, rb) in enumerate(zip(prompts, a, b)):
            ja, jb = scored[i], scored[len(prompts) + i]
            pref = preference_from_scores(ja.score, jb.score)
            row = {"prompt": q, "response_a": ra, "response_b": rb, "preference": pref}
            row.update(winner=_winner(pref), score_a=ja.score, score_b=jb.score)
            items.append({**row, "judgement_a": ja.to_dict(), "judgement_b": jb.to_dict()})
    else:
        raise TypeError(
            f"head_to_head: judge must have score(prompts, responses) (a pointwise judge) or "
            f"compare(prompts, responses_a, responses_b) (a PairwiseJudge), got "
            f"{type(judge).__name__}"
        )
    out = summarize(
        [r["preference"] for r in items],
        [len(x) for x in a],
        [len(x) for x in b],
        consistent=consistent,
        tokens_a=_token_counts(tokenizer, a) if tokenizer is not None else None,
        tokens_b=_token_counts(tokenizer, b) if tokenizer is not None else None,
        bootstrap=bootstrap,
        bootstrap_seed=bootstrap_seed,
        name_a=name_a,
        name_b=name_b,
        judge=kind,
    )
    out.items = items
    return out


def alpaca_eval_rows(
    prompts: Sequence[str], responses: Sequence[str], generator: str
) -> list[dict[str, str]]:
    """Outputs in alpaca_eval's format: ``[{"instruction", "output", "generator"}]``."""
    return [
        {"instruction": q, "output": r, "generator": generator} for q, r in zip(prompts, responses)
    ]
