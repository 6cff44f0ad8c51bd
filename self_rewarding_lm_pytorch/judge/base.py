"""What every judge returns (:class:`JudgeResult`) and offers (:class:`Judge`), the input
checks they share, and :class:`CallableJudge` for plain functions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["CallableJudge", "Judge", "JudgeResult"]


@dataclass
class JudgeResult:
    """One candidate's judgement.

    ``score`` is the mean of the parsable ``sample_scores`` (mean mode), the expected
    score (expected mode) or the external judge's score; ``None`` when nothing parsed.
    ``sample_scores[i]`` is the score of judge output ``i`` and ``failures[i]`` why it gave
    none: every judge reports one entry per output in both (``sample_scores[i]`` is
    ``None`` exactly when ``failures[i]`` is set); these are what the pipeline's
    ``min_parse_rate`` counts. ``samples[i]`` is the output's text for judges that write
    one (LLM judges; empty for callables and reward models). A result built with only
    ``score`` counts as one output (a ``"no score"`` failure when ``score`` is ``None``).
    ``truncated`` is true when the response was shortened to fit the judge's context;
    ``score_mass`` is the probability the model put on the score tokens (expected mode).
    """

    score: float | None
    samples: list[str] = field(default_factory=list)
    sample_scores: list[float | None] = field(default_factory=list)
    failures: list[str | None] = field(default_factory=list)
    score_distribution: dict[int, float] | None = None
    truncated: bool = False
    score_mass: float | None = None

    def __post_init__(self) -> None:
        if not self.sample_scores and not self.failures:
            self.sample_scores = [self.score]
        if not self.failures:
            self.failures = [None if s is not None else "no score" for s in self.sample_scores]
        n = len(self.sample_scores)
        if len(self.failures) != n or len(self.samples) not in (0, n):
            raise ValueError(
                f"JudgeResult needs one entry per judge output in sample_scores and failures "
                f"(and in samples, when given); got {n}, {len(self.failures)} and "
                f"{len(self.samples)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (distribution keys become strings, as JSON requires)."""
        d = asdict(self)
        if self.score_distribution is not None:
            d["score_distribution"] = {str(k): v for k, v in self.score_distribution.items()}
        return d


@runtime_checkable
class Judge(Protocol):
    """Anything that scores (prompt, response) pairs."""

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        generator: torch.Generator | int | None = None,
    ) -> list[JudgeResult]: ...


def _check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be lists of strings, not a single string")
    if len(prompts) != len(responses):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per "
            "response (repeat a prompt for each of its candidates)"
        )
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise TypeError(
                f"candidate {i}: prompt and response must be strings, got "
                f"{type(p).__name__} and {type(r).__name__}"
            )


class JudgeBase:
    """The entry point the library's judges share: the pairs are checked, then ``_score``."""

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        generator: torch.Generator | int | None = None,
    ) -> list[JudgeResult]:
        """Judge every ``(prompts[i], responses[i])``; one :class:`JudgeResult` each."""
        _check_pairs(prompts, responses)
        if not prompts:
            return []
        return self._score(list(prompts), list(responses), generator)

    def _score(
        self, prompts: list[str], responses: list[str], generator: torch.Generator | int | None
    ) -> list[JudgeResult]:
        raise NotImplementedError


class CallableJudge(JudgeBase):
    """Wrap ``fn(prompt, response) -> float | None`` (an oracle, an API, a rule) as a Judge.

    ``None`` or a non-finite number means "no score". Exceptions from ``fn`` propagate.
    """

    def __init__(self, fn: Callable[[str, str], float | None]) -> None:
        if not callable(fn):
            raise TypeError("CallableJudge needs a callable fn(prompt, response) -> float | None")
        self.fn = fn

    def _score(
        self, prompts: list[str], responses: list[str], generator: torch.Generator | int | None
    ) -> list[JudgeResult]:
        results = []
        for p, r in zip(prompts, responses):
            raw = self.fn(p, r)
            score, reason = None, None
            if raw is None:
                reason = "the judge returned None"
            else:
                try:
                    score = float(raw)
                except (TypeError, ValueError):
                    reason = f"the judge returned a non-number {raw!r}"
                else:
                    if not math.isfinite(score):
                        score, reason = None, f"the judge returned a non-finite score {raw!r}"
            results.append(JudgeResult(score=score, sample_scores=[score], failures=[reason]))
        return results
