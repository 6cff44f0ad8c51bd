"""The prompt distribution: :class:`TaskConfig`, the stable train/held-out split, the
prompt sampler, and the longest prompt and sequence a configuration can produce."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from .judgement import render_judge_prompt
from .oracle import (
    _LETTER_CRITERIA,
    CONSONANTS,
    CRITERIA,
    EXTRA_CRITERIA,
    LETTERS,
    PROMPT_END,
    Spec,
)

__all__ = ["TaskConfig", "max_prompt_length", "max_sequence_length", "prompt_split", "sample_spec"]


@dataclass(frozen=True)
class TaskConfig:
    """The prompt distribution: length range, how many criteria besides ``len``, and the
    fraction of the prompt space held out for evaluation (chosen by a stable hash)."""

    min_len: int = 3
    max_len: int = 8
    min_extra: int = 1
    max_extra: int = 3
    eval_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 3 <= self.min_len <= self.max_len <= 20:
            raise ValueError(
                f"need 3 <= min_len <= max_len <= 20 (length 3 fits start, end and has), got "
                f"min_len={self.min_len}, max_len={self.max_len}"
            )
        if not 0 <= self.min_extra <= self.max_extra <= len(EXTRA_CRITERIA):
            raise ValueError(
                f"need 0 <= min_extra <= max_extra <= {len(EXTRA_CRITERIA)}, got "
                f"{self.min_extra}..{self.max_extra}"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")


# ====================================================================== sampling


def prompt_split(prompt: str, config: TaskConfig = TaskConfig()) -> str:
    """``"eval"`` for the held-out part of the prompt space, ``"train"`` for the rest.

    A stable hash (CRC-32 of the prompt text) decides, so the split is the same on every
    machine and run.
    """
    bucket = zlib.crc32(prompt.encode()) % 10_000
    return "eval" if bucket < round(config.eval_fraction * 10_000) else "train"


def sample_spec(
    rng: random.Random, config: TaskConfig = TaskConfig(), *, require: str | None = None
) -> Spec:
    """Draw a satisfiable prompt: a length, 1-3 (``config``) other criteria in canonical
    order, their letters (consonants under ``novow``; ``has`` differs from the start and
    end letters so it is a real constraint).  ``require`` forces one criterion in."""
    if require is not None and require not in CRITERIA:
        raise ValueError(f"require must be one of {CRITERIA} or None, got {require!r}")
    k = rng.randint(config.min_extra, config.max_extra)
    if require in EXTRA_CRITERIA:
        k = max(k, 1)
        others = [c for c in EXTRA_CRITERIA if c != require]
        names = {require, *rng.sample(others, k - 1)}
    else:
        names = set(rng.sample(EXTRA_CRITERIA, k))
    novow = "novow" in names
    pool = CONSONANTS if novow else LETTERS
    letters: dict[str, str | None] = {"start": None, "end": None, "has": None}
    if "start" in names:
        letters["start"] = rng.choice(pool)
    if "end" in names:
        letters["end"] = rng.choice(pool)
    if "has" in names:
        taken = {letters["start"], letters["end"]}
        letters["has"] = rng.choice([c for c in pool if c not in taken])
    return Spec(
        length=rng.randint(config.min_len, config.max_len),
        novow=novow,
        upper="upper" in names,
        **letters,
    )


def _sample_prompt(
    rng: random.Random, config: TaskConfig, split: str, require: str | None = None
) -> Spec:
    for _ in range(10_000):  # bounded: each try lands in `split` with p >= eval_fraction
        spec = sample_spec(rng, config, require=require)
        if prompt_split(spec.to_prompt(), config) == split:
            return spec
    raise RuntimeError(f"could not draw a {split!r} prompt in 10,000 tries; check eval_fraction")


# ====================================================================== lengths


def max_prompt_length(config: TaskConfig = TaskConfig()) -> int:
    """The longest prompt string (characters) ``config`` can produce."""
    extra = sorted(
        (len(f" {c}:x") if c in _LETTER_CRITERIA else len(f" {c}")) for c in EXTRA_CRITERIA
    )
    return (
        len(f"len{config.max_len}") + sum(extra[len(extra) - config.max_extra :]) + len(PROMPT_END)
    )


def max_sequence_length(config: TaskConfig = TaskConfig(), max_response_len: int = 16) -> int:
    """Characters in the longest judge sequence: judge prompt with a response of
    ``max_response_len`` characters, then the judgement and EOS.  Task sequences are shorter."""
    criteria = 1 + config.max_extra
    letters = min(config.max_extra, len(_LETTER_CRITERIA))  # the ``letters`` judgement form
    judgement = len(f"{'y' * (criteria + letters)} Score: 5")
    return (
        len(render_judge_prompt("", ""))
        + max_prompt_length(config)
        + max_response_len
        + judgement
        + 1
    )
