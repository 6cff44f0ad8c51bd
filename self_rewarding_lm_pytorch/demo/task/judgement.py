"""The judge's format on the demo task: the judge prompt ``rate <prompt><response>|``, the
judgement ``<verdicts> Score: N`` (optionally restating each letter), reading it back, and
the ``RewardConfig`` templates that make a model judge the task."""

from __future__ import annotations

import re
from typing import NamedTuple

from .oracle import (
    _LETTER_CRITERIA,
    Spec,
    _require_str,
    parse_prompt,
    score_from_verdicts,
    verdicts,
)

__all__ = [
    "JUDGE_PROMPT_TEMPLATE",
    "JUDGE_REWARD_REGEX_TEMPLATE",
    "ParsedJudgement",
    "format_judgement",
    "judgement_text",
    "parse_judgement",
    "render_judge_prompt",
    "reward_config_kwargs",
]

JUDGE_PROMPT_TEMPLATE = "rate {{ prompt }}{{ response }}|"
"""Jinja2 judge prompt for ``RewardConfig(prompt_template=...)``: ``prompt`` is the task
prompt (it ends with ``>``), ``response`` the candidate.  Render it with autoescape off
(``>`` must stay ``>``); :func:`render_judge_prompt` gives the same string directly."""
JUDGE_REWARD_REGEX_TEMPLATE = "Score: {{ reward }}"
"""For ``RewardConfig(reward_regex_template=...)``: the judgement ends with ``Score: N``."""

_JUDGEMENT_RE = re.compile(r"^\s*((?:[A-Z]?[yn])+) Score: ([0-5])\b")
_SCORE_RE = re.compile(r"Score: ([0-5])\b")


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
