"""The demo's miniature instruction-following task, its exact oracle and its data generators.

Prompts are IFEval-style verifiable instructions (Zhou et al., 2023) on short letter
strings, written as a compact string that ends with ``>``::

    len6 start:b novow upper>        ->  BXTRKL

Every prompt asks for a length (``len<n>``) plus 1-3 of the other criteria:

========  ======================================================================
name      satisfied when (``s`` is the response, letters compared case-blind)
========  ======================================================================
len<n>    ``len(s) == n``
start:c   the first character is ``c``
end:c     the last character is ``c``
has:c     ``c`` occurs somewhere in ``s``
novow     no vowel (``aeiou``) occurs in ``s``
upper     ``s.isupper()`` (every cased character is upper case, and there is one)
========  ======================================================================

The oracle scores a response ``round(5 * satisfied / total)`` with halves rounded up,
so a score lies in 0..5 and 5 means fully correct.  The judge of the demo writes one
verdict per criterion, in prompt order (``y`` satisfied, ``n`` not), then ``Score: N``::

    rate len6 start:b novow upper>BXTRKl|yyyn Score: 4

The per-criterion checks are what make judging easier than generating for a tiny model
(feasibility note, round 1, lesson 1): it is the paper's additive rubric (Yuan et al.,
2024, Fig. 2) in miniature.

Data generators (all deterministic given ``seed``; each uses its own
``random.Random`` stream derived from the seed and its purpose):

* :func:`ift_data`: prompt -> response with the round-2 *systematic, fixable* noise:
  when ``upper`` is asked a fraction of responses is lower case, when ``end:c`` is asked
  a fraction stutters the end letter (length off by one), plus random one-criterion
  errors.  The wrong behaviour is the mode, but the right one is in the data too.
* :func:`eft_data`: judge prompt -> per-criterion verdicts and ``Score: N`` from the
  oracle, with responses whose failures cover every criterion evenly.
* :func:`fresh_prompts`, :func:`eval_prompts`, :func:`judge_eval_set`: prompts for each
  self-reward iteration and held-out sets.  Prompts are split by a stable hash into a
  training part and a held-out part, so no held-out prompt ever appears in training data.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "CRITERIA",
    "EXTRA_CRITERIA",
    "JUDGE_PROMPT_TEMPLATE",
    "JUDGE_REWARD_REGEX_TEMPLATE",
    "MAX_SCORE",
    "PROMPT_END",
    "EFTExample",
    "EFTMix",
    "IFTExample",
    "IFTNoise",
    "JudgeEvalExample",
    "ParsedJudgement",
    "Spec",
    "TaskConfig",
    "break_criteria",
    "check",
    "eft_data",
    "eval_prompts",
    "format_judgement",
    "fresh_prompts",
    "fully_correct",
    "ift_data",
    "instruction_metrics",
    "judgement_text",
    "judge_eval_set",
    "max_prompt_length",
    "max_sequence_length",
    "parse_judgement",
    "parse_prompt",
    "prompt_split",
    "render_judge_prompt",
    "reward_config_kwargs",
    "sample_spec",
    "score",
    "score_from_counts",
    "score_from_verdicts",
    "solve",
    "verdicts",
]

CRITERIA: tuple[str, ...] = ("len", "start", "end", "has", "novow", "upper")
"""Every criterion name, in the canonical prompt order."""
EXTRA_CRITERIA: tuple[str, ...] = CRITERIA[1:]
"""The criteria a prompt picks from besides ``len``."""
MAX_SCORE = 5
PROMPT_END = ">"
VOWELS = "aeiou"
LETTERS = string.ascii_lowercase
CONSONANTS = "".join(c for c in LETTERS if c not in VOWELS)
_LETTER_CRITERIA = ("start", "end", "has")

JUDGE_PROMPT_TEMPLATE = "rate {{ prompt }}{{ response }}|"
"""Jinja2 judge prompt for ``RewardConfig(prompt_template=...)``: ``prompt`` is the task
prompt (it ends with ``>``), ``response`` the candidate.  Render it with autoescape off
(``>`` must stay ``>``); :func:`render_judge_prompt` gives the same string directly."""
JUDGE_REWARD_REGEX_TEMPLATE = "Score: {{ reward }}"
"""For ``RewardConfig(reward_regex_template=...)``: the judgement ends with ``Score: N``."""

_JUDGEMENT_RE = re.compile(r"^\s*((?:[A-Z]?[yn])+) Score: ([0-5])\b")
_SCORE_RE = re.compile(r"Score: ([0-5])\b")


# ====================================================================== the prompt


@dataclass(frozen=True)
class Spec:
    """A parsed prompt: the required length plus optional criteria.

    ``order`` lists the criteria in prompt order (``len`` included); it defaults to the
    canonical order :data:`CRITERIA`.  Verdict strings follow ``criteria``.
    """

    length: int
    start: str | None = None
    end: str | None = None
    has: str | None = None
    novow: bool = False
    upper: bool = False
    order: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 1:
            raise ValueError(f"length must be an integer >= 1, got {self.length!r}")
        for name in _LETTER_CRITERIA:
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, str) or len(value) != 1 or value not in LETTERS
            ):
                raise ValueError(f"{name} must be one lowercase letter a-z or None, got {value!r}")
        present = tuple(c for c in CRITERIA if self._asks(c))
        if self.order:
            if sorted(self.order) != sorted(present):
                raise ValueError(
                    f"order {self.order!r} must list exactly the asked criteria {present!r}"
                )
        else:
            object.__setattr__(self, "order", present)

    def _asks(self, name: str) -> bool:
        if name == "len":
            return True
        value = getattr(self, name)
        return value is not None and value is not False

    @property
    def criteria(self) -> tuple[str, ...]:
        """The asked criteria in prompt order, ``len`` included."""
        return self.order

    def to_prompt(self) -> str:
        """The compact prompt string, e.g. ``len6 start:b novow upper>``."""
        parts = []
        for name in self.order:
            if name == "len":
                parts.append(f"len{self.length}")
            elif name in _LETTER_CRITERIA:
                parts.append(f"{name}:{getattr(self, name)}")
            else:
                parts.append(name)
        return " ".join(parts) + PROMPT_END


_TOKEN_RE = re.compile(r"^(?:len(\d+)|(start|end|has):([a-z])|(novow|upper))$")


def parse_prompt(prompt: str | Spec) -> Spec:
    """Parse a prompt string like ``len6 start:b novow upper>`` into a :class:`Spec`.

    The trailing ``>`` is optional; criteria may come in any order, each at most once,
    and ``len<n>`` is required.
    """
    if isinstance(prompt, Spec):
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str or Spec, got {type(prompt).__name__}")
    text = prompt.strip()
    if text.endswith(PROMPT_END):
        text = text[: -len(PROMPT_END)]
    fields: dict[str, object] = {}
    order: list[str] = []
    for token in text.split():
        m = _TOKEN_RE.match(token)
        if m is None:
            raise ValueError(
                f"cannot parse {token!r} in prompt {prompt!r}; expected len<n>, start:<c>, "
                "end:<c>, has:<c> (c a lowercase letter), novow or upper"
            )
        if m.group(1) is not None:
            name, value = "len", int(m.group(1))
        elif m.group(2) is not None:
            name, value = m.group(2), m.group(3)
        else:
            name, value = m.group(4), True
        if name in order:
            raise ValueError(f"criterion {name!r} appears twice in prompt {prompt!r}")
        order.append(name)
        fields["length" if name == "len" else name] = value
    if "len" not in order:
        raise ValueError(f"prompt {prompt!r} has no len<n> criterion; every prompt needs one")
    return Spec(**fields, order=tuple(order))  # type: ignore[arg-type]


# ====================================================================== the oracle


def _check_one(spec: Spec, name: str, response: str) -> bool:
    low = response.lower()
    if name == "len":
        return len(response) == spec.length
    if name == "start":
        return low[:1] == spec.start
    if name == "end":
        return low[-1:] == spec.end
    if name == "has":
        return spec.has is not None and spec.has in low
    if name == "novow":
        return not any(c in VOWELS for c in low)
    if name == "upper":
        return response.isupper()
    raise ValueError(f"unknown criterion {name!r}; expected one of {CRITERIA}")


def _require_str(response: object) -> str:
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    return response


def check(prompt: str | Spec, response: str) -> dict[str, bool]:
    """Per-criterion results ``{name: satisfied}`` in prompt order."""
    spec = parse_prompt(prompt)
    response = _require_str(response)
    return {name: _check_one(spec, name, response) for name in spec.criteria}


def verdicts(prompt: str | Spec, response: str) -> str:
    """The oracle's verdict string, one ``y``/``n`` per criterion in prompt order."""
    return "".join("y" if ok else "n" for ok in check(prompt, response).values())


def score_from_counts(satisfied: int, total: int) -> int:
    """``round(5 * satisfied / total)`` with halves rounded up, in exact integer arithmetic."""
    if total < 1 or not 0 <= satisfied <= total:
        raise ValueError(f"need 0 <= satisfied <= total and total >= 1, got {satisfied}/{total}")
    return (2 * MAX_SCORE * satisfied + total) // (2 * total)


def score_from_verdicts(verdict_string: str) -> int:
    """The score a verdict string such as ``yyny`` implies."""
    if not verdict_string or set(verdict_string) - {"y", "n"}:
        raise ValueError(f"verdicts must be a non-empty string of y/n, got {verdict_string!r}")
    return score_from_counts(verdict_string.count("y"), len(verdict_string))


def score(prompt: str | Spec, response: str) -> int:
    """The oracle score 0..5 of ``response`` for ``prompt``."""
    return score_from_verdicts(verdicts(prompt, response))


def fully_correct(prompt: str | Spec, response: str) -> bool:
    """Whether ``response`` satisfies every criterion of ``prompt``."""
    return all(check(prompt, response).values())


# ====================================================================== judge format


def render_judge_prompt(prompt: str, response: str) -> str:
    """:data:`JUDGE_PROMPT_TEMPLATE` rendered for ``prompt`` and ``response``."""
    return f"rate {prompt}{_require_str(response)}|"


def judgement_text(prompt: str | Spec, verdict_string: str, *, letters: bool = False) -> str:
    """``verdicts Score: N`` for a verdict string, e.g. ``yyny Score: 4``.

    With ``letters``, the verdict of each letter criterion (``start``, ``end``, ``has``) is
    preceded by its letter from the prompt in upper case (``yByKnTy Score: 4`` for
    ``len6 start:b end:k has:t>``): the judge restates what it checks before the verdict,
    so the verdict compares the letter it just wrote with the response instead of
    recalling which criterion comes next and its letter.  :func:`parse_judgement` reads
    both forms.
    """
    spec = parse_prompt(prompt)
    if len(verdict_string) != len(spec.criteria) or set(verdict_string) - {"y", "n"}:
        raise ValueError(
            f"need one y/n verdict per criterion of {spec.to_prompt()!r} "
            f"({len(spec.criteria)}), got {verdict_string!r}"
        )
    parts = []
    for name, v in zip(spec.criteria, verdict_string):
        marker = getattr(spec, name) if letters and name in _LETTER_CRITERIA else ""
        parts.append(marker.upper() + v)
    return f"{''.join(parts)} Score: {score_from_verdicts(verdict_string)}"


def format_judgement(prompt: str | Spec, response: str, *, letters: bool = False) -> str:
    """The gold judgement: oracle verdicts then ``Score: N``, e.g. ``yyny Score: 4``
    (see :func:`judgement_text` for ``letters``)."""
    return judgement_text(prompt, verdicts(prompt, response), letters=letters)


class ParsedJudgement(NamedTuple):
    """What a judge wrote: its verdict string and its score (``None`` when unparsable)."""

    verdicts: str | None
    score: int | None


def parse_judgement(text: str, num_criteria: int | None = None) -> ParsedJudgement:
    """Read ``yyny Score: 4`` (or the ``letters`` form ``yByKnTy Score: 4``) back.

    ``verdicts`` is ``None`` when the text does not start with a y/n string (each verdict
    optionally preceded by an upper-case letter) followed by ``Score:`` or (given
    ``num_criteria``) has the wrong number of verdicts; ``score`` is read wherever
    ``Score: N`` occurs (as the reward regex does) and is ``None`` otherwise.
    """
    text = _require_str(text)
    m = _JUDGEMENT_RE.match(text)
    v = "".join(c for c in m.group(1) if c in "yn") if m else None
    if v is not None and num_criteria is not None and len(v) != num_criteria:
        v = None
    s = _SCORE_RE.search(text)
    return ParsedJudgement(v, int(s.group(1)) if s else None)


def reward_config_kwargs() -> dict[str, str]:
    """Keyword arguments for ``RewardConfig`` that make a model judge the demo task."""
    return {
        "prompt_template": JUDGE_PROMPT_TEMPLATE,
        "reward_regex_template": JUDGE_REWARD_REGEX_TEMPLATE,
    }


# ====================================================================== configuration


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


# ====================================================================== sampling


def _derive_seed(seed: int, purpose: str, *extra: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    key = ":".join([str(seed), purpose, *map(str, extra)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


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


def solve(prompt: str | Spec, rng: random.Random) -> str:
    """A random response that satisfies every criterion of ``prompt``."""
    spec = parse_prompt(prompt)
    n = spec.length
    slots: list[str | None] = [None] * n
    if spec.start is not None:
        slots[0] = spec.start
    if spec.end is not None:
        if slots[n - 1] is not None and slots[n - 1] != spec.end:
            raise ValueError(f"prompt {spec.to_prompt()!r} cannot be satisfied (start/end clash)")
        slots[n - 1] = spec.end
    if spec.has is not None and spec.has not in slots:
        free = [i for i, c in enumerate(slots) if c is None]
        if not free:
            raise ValueError(f"prompt {spec.to_prompt()!r} is too short to hold has:{spec.has}")
        slots[rng.choice(free)] = spec.has
    if spec.novow and any(c in VOWELS for c in slots if c is not None):
        raise ValueError(f"prompt {spec.to_prompt()!r} asks for a vowel and for novow")
    pool = CONSONANTS if spec.novow else LETTERS
    out = "".join(c if c is not None else rng.choice(pool) for c in slots)
    return out.upper() if spec.upper else out


# ====================================================================== realistic failures


def _letter_like(spec: Spec, response: str, rng: random.Random, avoid: str = "") -> str:
    pool = [c for c in (CONSONANTS if spec.novow else LETTERS) if c not in avoid]
    c = rng.choice(pool)
    return c.upper() if response.isupper() else c


def _propose(spec: Spec, name: str, s: str, rng: random.Random) -> str:
    """One random edit of ``s`` aimed at making criterion ``name`` fail."""
    n = len(s)
    if name == "len":
        kind = rng.choice(("stutter", "insert", "delete") if n else ("insert",))
        if kind == "stutter":
            return s + s[-1]
        if kind == "delete":
            i = rng.randrange(n)
            return s[:i] + s[i + 1 :]
        i = rng.randint(1, n - 1) if n >= 2 else rng.randint(0, n)
        return s[:i] + _letter_like(spec, s, rng) + s[i:]
    if name in ("start", "end"):
        if not n:
            return s
        target = getattr(spec, name) or ""
        c = _letter_like(spec, s, rng, avoid=target)
        return c + s[1:] if name == "start" else s[:-1] + c
    if name == "has":
        target = spec.has or ""
        return "".join(
            _letter_like(spec, s, rng, avoid=target) if ch.lower() == target else ch for ch in s
        )
    if name == "novow":
        if not n:
            return s
        i = rng.randrange(n)
        v = rng.choice(VOWELS)
        return s[:i] + (v.upper() if s.isupper() else v) + s[i + 1 :]
    if name == "upper":
        upper_idx = [i for i, ch in enumerate(s) if ch.isupper()]
        if not upper_idx or rng.random() < 0.5:
            return s.lower()
        i = rng.choice(upper_idx)
        return s[:i] + s[i].lower() + s[i + 1 :]
    raise ValueError(f"unknown criterion {name!r}; expected one of {CRITERIA}")


def break_criteria(
    prompt: str | Spec,
    response: str,
    names: Iterable[str],
    rng: random.Random,
    *,
    max_tries: int = 64,
) -> str | None:
    """Edit ``response`` so the criteria in ``names`` fail and every other criterion keeps
    the verdict it had, using realistic edits (a stuttered or dropped letter, a wrong first
    or last letter, a missing letter, a vowel, lower case).

    Returns ``None`` when ``max_tries`` random attempts find no such edit (for example
    ``has:b`` cannot fail alone when the response must start with ``b``).
    """
    spec = parse_prompt(prompt)
    response = _require_str(response)
    targets = list(dict.fromkeys(names))
    unknown = [t for t in targets if t not in spec.criteria]
    if unknown:
        raise ValueError(f"cannot break {unknown}: prompt {spec.to_prompt()!r} does not ask them")
    before = check(spec, response)
    want = {c: (False if c in targets else before[c]) for c in spec.criteria}
    for _ in range(max_tries):
        s, done = response, []
        for name in rng.sample(targets, len(targets)):
            for _ in range(max_tries):
                t = _propose(spec, name, s, rng)
                res = check(spec, t)
                if (
                    not res[name]
                    and all(not res[d] for d in done)
                    and all(res[c] == want[c] for c in spec.criteria if c not in targets)
                ):
                    s = t
                    break
            else:
                break
            done.append(name)
        if check(spec, s) == want:
            return s
    return None


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


# ====================================================================== lengths and metrics


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


def instruction_metrics(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, object]:
    """Instruction-following metrics of ``responses`` to ``prompts`` under the oracle.

    Returns ``mean_score`` (0..5), ``pct_fully_correct`` (0..100), ``mean_response_length``
    (characters), ``pct_satisfied`` (per criterion, over the prompts that ask it) and ``n``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one each")
    if not prompts:
        raise ValueError("no prompts given; instruction metrics need at least one")
    total_score = correct = total_len = 0
    asked = dict.fromkeys(CRITERIA, 0)
    satisfied = dict.fromkeys(CRITERIA, 0)
    for prompt, response in zip(prompts, responses):
        results = check(prompt, response)
        v = "".join("y" if ok else "n" for ok in results.values())
        total_score += score_from_verdicts(v)
        correct += all(results.values())
        total_len += len(response)
        for name, ok in results.items():
            asked[name] += 1
            satisfied[name] += ok
    n = len(prompts)
    return {
        "n": n,
        "mean_score": total_score / n,
        "pct_fully_correct": 100.0 * correct / n,
        "mean_response_length": total_len / n,
        "pct_satisfied": {c: 100.0 * satisfied[c] / asked[c] for c in CRITERIA if asked[c]},
    }
