"""The data generators: IFT data with systematic, fixable noise (:class:`IFTNoise`), EFT
judge data (:class:`EFTMix`), fresh prompts per iteration and the held-out sets.  Each
generator draws from its own ``random.Random`` stream derived from the seed and its purpose."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .failures import break_criteria
from .judgement import judgement_text, render_judge_prompt
from .oracle import CRITERIA, LETTERS, Spec, check, score_from_verdicts, solve, verdicts
from .prompts import TaskConfig, _sample_prompt

__all__ = [
    "EFTExample",
    "EFTMix",
    "IFTExample",
    "IFTNoise",
    "JudgeEvalExample",
    "eft_data",
    "eval_prompts",
    "fresh_prompts",
    "ift_data",
    "judge_eval_set",
]


@dataclass(frozen=True)
class IFTNoise:
    """Round-2 IFT noise: systematic, fixable errors plus random one-criterion errors.

    Args:
        upper_lowercase: when ``upper`` is asked, the fraction of responses in lower case.
        end_stutter: when ``end:c`` is asked, the fraction that repeat the end letter
            (``...kc`` -> ``...kcc``: the end is right, the length is off by one).
        random: the fraction of all responses given one extra error on a random criterion
            that still holds.
    """

    upper_lowercase: float = 0.6
    end_stutter: float = 0.6
    random: float = 0.1

    def __post_init__(self) -> None:
        for name in ("upper_lowercase", "end_stutter", "random"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"IFTNoise.{name} must be a fraction in [0, 1], got {value}")


@dataclass(frozen=True)
class EFTMix:
    """How EFT / judge-evaluation responses are made.

    Args:
        correct: fraction of fully correct responses.
        garbage: fraction of random letter strings (random length and case), scored as
            they come: the crude failures of an untrained or over-optimised policy.
        break_weights: for the rest, the relative weights of breaking 1, 2, 3, ...
            criteria (capped at the number the prompt has).  One broken criterion is the
            *focus*, cycled through :data:`CRITERIA` so every criterion fails equally often.
    """

    correct: float = 0.25
    garbage: float = 0.05
    break_weights: tuple[float, ...] = (0.6, 0.25, 0.1, 0.05)

    def __post_init__(self) -> None:
        if self.correct < 0 or self.garbage < 0 or self.correct + self.garbage > 1:
            raise ValueError(
                f"EFTMix.correct and .garbage must be >= 0 and sum to <= 1, got "
                f"{self.correct} and {self.garbage}"
            )
        if (
            not self.break_weights
            or any(w < 0 for w in self.break_weights)
            or not any(self.break_weights)
        ):
            raise ValueError(
                f"EFTMix.break_weights needs non-negative weights, one positive, got "
                f"{self.break_weights}"
            )


def _derive_seed(seed: int, purpose: str, *extra: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    key = ":".join([str(seed), purpose, *map(str, extra)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


# ====================================================================== data sets


@dataclass(frozen=True)
class IFTExample:
    """An instruction-following example; ``noise`` names the errors put in (empty = none):
    ``lowercase``, ``stutter``, ``break:<criterion>``."""

    prompt: str
    response: str
    noise: tuple[str, ...] = ()


@dataclass(frozen=True)
class EFTExample:
    """An evaluation (judge) example: ``prompt`` is the rendered judge prompt, ``response``
    the gold judgement (``yyny Score: 4``); the task prompt and response are kept too."""

    prompt: str
    response: str
    task_prompt: str
    task_response: str
    verdicts: str
    score: int


@dataclass(frozen=True)
class JudgeEvalExample:
    """A held-out (prompt, response) with the oracle's verdicts and score; ``group``
    numbers the prompt, so pairwise metrics can compare responses to the same prompt."""

    prompt: str
    response: str
    verdicts: str
    score: int
    group: int


def _check_count(n: int, what: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{what} must be a non-negative int, got {n!r}")


def _noisy_response(spec: Spec, rng: random.Random, noise: IFTNoise) -> IFTExample:
    response = solve(spec, rng)
    tags: list[str] = []
    if spec.upper and rng.random() < noise.upper_lowercase:
        response = response.lower()
        tags.append("lowercase")
    if spec.end is not None and rng.random() < noise.end_stutter:
        response = response + response[-1]
        tags.append("stutter")
    if rng.random() < noise.random:
        ok = [c for c, good in check(spec, response).items() if good]
        for name in rng.sample(ok, len(ok)):
            broken = break_criteria(spec, response, [name], rng)
            if broken is not None:
                response = broken
                tags.append(f"break:{name}")
                break
    return IFTExample(spec.to_prompt(), response, tuple(tags))


def ift_data(
    n: int, seed: int, *, config: TaskConfig = TaskConfig(), noise: IFTNoise = IFTNoise()
) -> list[IFTExample]:
    """``n`` training prompts with noisy responses (see :class:`IFTNoise`)."""
    _check_count(n, "n")
    rng = random.Random(_derive_seed(seed, "ift"))
    return [_noisy_response(_sample_prompt(rng, config, "train"), rng, noise) for _ in range(n)]


def _mixed_response(spec: Spec, focus: str, rng: random.Random, mix: EFTMix) -> str | None:
    u = rng.random()
    if u < mix.correct:
        return solve(spec, rng)
    if u < mix.correct + mix.garbage:
        length = rng.randint(1, spec.length + 2)
        word = "".join(rng.choice(LETTERS) for _ in range(length))
        return word.upper() if rng.random() < 0.5 else word
    k = len(spec.criteria)
    weights = list(mix.break_weights[:k])
    if not any(weights):
        weights = [1.0]
    m = rng.choices(range(1, len(weights) + 1), weights=weights)[0]
    others = [c for c in spec.criteria if c != focus]
    names = [focus, *rng.sample(others, m - 1)]
    return break_criteria(spec, solve(spec, rng), names, rng)


def eft_data(
    n: int,
    seed: int,
    *,
    config: TaskConfig = TaskConfig(),
    mix: EFTMix = EFTMix(),
    letters: bool = False,
) -> list[EFTExample]:
    """``n`` judge examples on training prompts: judge prompt -> ``verdicts Score: N``
    (with ``letters``, the judgement restates each letter criterion's letter before its
    verdict: :func:`judgement_text`).

    Example ``i`` has criterion ``CRITERIA[i % 6]`` in its prompt and, unless it is a
    correct or garbage response, broken; so every criterion's failures appear equally often.
    """
    _check_count(n, "n")
    rng = random.Random(_derive_seed(seed, "eft"))
    out: list[EFTExample] = []
    for i in range(n):
        focus = CRITERIA[i % len(CRITERIA)]
        for _ in range(1_000):  # bounded: break_criteria rarely returns None
            spec = _sample_prompt(rng, config, "train", require=focus)
            response = _mixed_response(spec, focus, rng, mix)
            if response is not None:
                break
        else:
            raise RuntimeError(f"could not build a response breaking {focus!r}")
        prompt = spec.to_prompt()
        v = verdicts(spec, response)
        out.append(
            EFTExample(
                prompt=render_judge_prompt(prompt, response),
                response=judgement_text(spec, v, letters=letters),
                task_prompt=prompt,
                task_response=response,
                verdicts=v,
                score=score_from_verdicts(v),
            )
        )
    return out


def fresh_prompts(
    n: int, seed: int, iteration: int, *, config: TaskConfig = TaskConfig()
) -> list[str]:
    """``n`` new training-split prompts for self-reward iteration ``iteration`` (each
    iteration gets its own stream, so iterations see different prompts)."""
    _check_count(n, "n")
    _check_count(iteration, "iteration")
    rng = random.Random(_derive_seed(seed, "fresh", iteration))
    return [_sample_prompt(rng, config, "train").to_prompt() for _ in range(n)]


def _distinct_eval_specs(n: int, rng: random.Random, config: TaskConfig) -> list[Spec]:
    seen: dict[str, Spec] = {}
    for _ in range(100 * n + 100):  # bounded; the held-out space holds thousands of prompts
        if len(seen) == n:
            break
        spec = _sample_prompt(rng, config, "eval")
        seen.setdefault(spec.to_prompt(), spec)
    if len(seen) < n:
        raise ValueError(
            f"could only draw {len(seen)} distinct held-out prompts, {n} asked; ask fewer "
            "or raise TaskConfig.eval_fraction / widen the length range"
        )
    return list(seen.values())


def eval_prompts(n: int, seed: int, *, config: TaskConfig = TaskConfig()) -> list[str]:
    """``n`` distinct held-out prompts (never produced by the training generators)."""
    _check_count(n, "n")
    rng = random.Random(_derive_seed(seed, "eval"))
    return [spec.to_prompt() for spec in _distinct_eval_specs(n, rng, config)]


def judge_eval_set(
    n_prompts: int,
    seed: int,
    *,
    responses_per_prompt: int = 4,
    config: TaskConfig = TaskConfig(),
    mix: EFTMix = EFTMix(),
) -> list[JudgeEvalExample]:
    """Held-out judge test: ``responses_per_prompt`` responses (made as for EFT, failures
    on a random criterion of the prompt) for each of ``n_prompts`` distinct held-out prompts,
    with the oracle's verdicts and score."""
    _check_count(n_prompts, "n_prompts")
    if not isinstance(responses_per_prompt, int) or responses_per_prompt < 1:
        raise ValueError(f"responses_per_prompt must be an int >= 1, got {responses_per_prompt!r}")
    rng = random.Random(_derive_seed(seed, "judge-eval"))
    out: list[JudgeEvalExample] = []
    for group, spec in enumerate(_distinct_eval_specs(n_prompts, rng, config)):
        prompt = spec.to_prompt()
        for _ in range(responses_per_prompt):
            response = None
            for _ in range(1_000):  # bounded
                response = _mixed_response(spec, rng.choice(spec.criteria), rng, mix)
                if response is not None:
                    break
            if response is None:
                raise RuntimeError(f"could not build a response for {prompt!r}")
            v = verdicts(spec, response)
            out.append(JudgeEvalExample(prompt, response, v, score_from_verdicts(v), group))
    return out
