"""The task's prompts and its exact oracle: :class:`Spec`, :func:`parse_prompt`, the
per-criterion checks and scores (``round(5 * satisfied / total)``, halves up), a solver,
and the instruction-following metrics of a set of responses."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "CONSONANTS",
    "CRITERIA",
    "EXTRA_CRITERIA",
    "LETTERS",
    "MAX_SCORE",
    "PROMPT_END",
    "VOWELS",
    "Spec",
    "check",
    "fully_correct",
    "instruction_metrics",
    "parse_prompt",
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


# ====================================================================== a solver


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


# ====================================================================== metrics


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
