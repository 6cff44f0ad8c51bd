"""The meta-judge skill on the demo task: given a response and two judgements of it, say
which judgement is right (the paper's meta-rewarding step, in miniature).

Format (fits ``DEMO_MAX_SEQ_LEN``; :func:`max_meta_sequence_length` is the worst case)::

    meta len6 start:b has:t>bxtrkl|yByTy Score: 5|yByTn Score: 3>   ->  A

One judgement is the oracle's (:func:`~.judgement.format_judgement`, letters form); the
other has one realistic wrong verdict, with the score recomputed to match: half the time a
missed failure (a failed criterion judged satisfied, preferring the criteria the demo's
judge tends to miss, :data:`MISS_WEIGHTS`), half the time a false failure (a satisfied
criterion judged failed).  Both directions equally often, so "the harsher (or the more
lenient) judgement is right" is no shortcut: the meta-judge has to check the verdicts.  The
judgements come in random order; the label names the right one (``A``: first).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import EFTMix, _check_count, _derive_seed, _distinct_eval_specs, _mixed_response
from .judgement import judgement_text
from .oracle import _LETTER_CRITERIA, Spec, _require_str, verdicts
from .prompts import TaskConfig, _sample_prompt, max_prompt_length

__all__ = [
    "META_LABELS",
    "META_PROMPT_TEMPLATE",
    "MISS_WEIGHTS",
    "MetaExample",
    "max_meta_sequence_length",
    "meta_eft_data",
    "meta_eval_set",
    "meta_template_kwargs",
    "parse_meta_verdict",
    "render_meta_prompt",
]

META_PROMPT_TEMPLATE = "meta {{ prompt }}{{ response }}|{{ judgement_a }}|{{ judgement_b }}>"
"""Jinja2 meta-judge prompt (variables ``prompt``, ``response``, ``judgement_a``,
``judgement_b``); the verdict follows it directly.  Render with autoescape off."""
META_LABELS = ("A", "B", "=")
"""The verdicts: the first judgement is right, the second is, both equally (never a gold
label here: the two judgements of an example always differ)."""
MISS_WEIGHTS: dict[str, float] = {
    "len": 0.07,
    "start": 0.56,
    "end": 0.65,
    "has": 0.63,
    "novow": 0.18,
    "upper": 0.01,
}
"""How often the demo's M1 judge misses a failure of each criterion on its own candidates
(1 - failure recall, seed 0, iteration 1, docs/demo.md): the relative weight of flipping
that criterion's verdict in the wrong judgement."""


def render_meta_prompt(prompt: str, response: str, judgement_a: str, judgement_b: str) -> str:
    """:data:`META_PROMPT_TEMPLATE` rendered."""
    parts = (_require_str(response), _require_str(judgement_a), _require_str(judgement_b))
    return f"meta {prompt}{parts[0]}|{parts[1]}|{parts[2]}>"


def meta_template_kwargs() -> dict[str, object]:
    """The meta-judge's templates and labels on the demo task: ``prompt_template``,
    ``verdict_template`` (the verdict right after the prompt) and ``labels``."""
    return {
        "prompt_template": META_PROMPT_TEMPLATE,
        "verdict_template": "{{ verdict }}",
        "labels": META_LABELS,
    }


def parse_meta_verdict(text: str) -> str | None:
    """The verdict a meta-judge wrote: its first non-blank character if it is one of
    :data:`META_LABELS`, else ``None``."""
    head = _require_str(text).lstrip()[:1]
    return head if head in META_LABELS else None


@dataclass(frozen=True)
class MetaExample:
    """A meta-judge example: ``prompt`` (the rendered meta prompt) -> ``response`` (the
    label of the right judgement); ``right`` / ``wrong`` are the two judgements,
    ``flipped`` the criterion whose verdict the wrong one gets wrong."""

    prompt: str
    response: str
    task_prompt: str
    task_response: str
    right: str
    wrong: str
    flipped: str


def _wrong_judgement(spec: Spec, gold: str, rng: random.Random) -> tuple[str, str]:
    """The letters-form judgement with one verdict of ``gold`` flipped, and that criterion:
    a missed failure (a failed criterion, weighted by :data:`MISS_WEIGHTS`, judged
    satisfied) or a false failure (a satisfied criterion, uniformly, judged failed), each
    with probability 1/2 when the response allows both."""
    failed = [i for i, v in enumerate(gold) if v == "n"]
    satisfied = [i for i, v in enumerate(gold) if v == "y"]
    if failed and (not satisfied or rng.random() < 0.5):
        i = rng.choices(failed, weights=[MISS_WEIGHTS[spec.criteria[i]] for i in failed])[0]
    else:
        i = rng.choice(satisfied)
    flipped = gold[:i] + ("y" if gold[i] == "n" else "n") + gold[i + 1 :]
    return judgement_text(spec, flipped, letters=True), spec.criteria[i]


def _meta_example(spec: Spec, rng: random.Random, mix: EFTMix) -> MetaExample:
    for _ in range(1_000):  # bounded: break_criteria rarely returns None
        response = _mixed_response(spec, rng.choice(spec.criteria), rng, mix)
        if response is not None:
            break
    else:
        raise RuntimeError(f"could not build a response for {spec.to_prompt()!r}")
    gold = verdicts(spec, response)
    right = judgement_text(spec, gold, letters=True)
    wrong, flipped = _wrong_judgement(spec, gold, rng)
    first_right = rng.random() < 0.5
    a, b = (right, wrong) if first_right else (wrong, right)
    prompt = spec.to_prompt()
    return MetaExample(
        prompt=render_meta_prompt(prompt, response, a, b),
        response="A" if first_right else "B",
        task_prompt=prompt,
        task_response=response,
        right=right,
        wrong=wrong,
        flipped=flipped,
    )


def meta_eft_data(
    n: int, seed: int, *, config: TaskConfig = TaskConfig(), mix: EFTMix = EFTMix()
) -> list[MetaExample]:
    """``n`` meta-judge SFT examples on training prompts (responses made as for EFT)."""
    _check_count(n, "n")
    rng = random.Random(_derive_seed(seed, "meta-eft"))
    return [_meta_example(_sample_prompt(rng, config, "train"), rng, mix) for _ in range(n)]


def meta_eval_set(
    n: int, seed: int, *, config: TaskConfig = TaskConfig(), mix: EFTMix = EFTMix()
) -> list[MetaExample]:
    """``n`` held-out meta-judge examples, one per distinct held-out prompt."""
    _check_count(n, "n")
    rng = random.Random(_derive_seed(seed, "meta-eval"))
    return [_meta_example(spec, rng, mix) for spec in _distinct_eval_specs(n, rng, config)]


def max_meta_sequence_length(config: TaskConfig = TaskConfig(), max_response_len: int = 16) -> int:
    """Characters in the longest meta-judge sequence: the meta prompt with a response of
    ``max_response_len`` characters and two letters-form judgements, the label and EOS."""
    criteria = 1 + config.max_extra
    letters = min(config.max_extra, len(_LETTER_CRITERIA))
    judgement = len(f"{'y' * (criteria + letters)} Score: 5")
    empty = render_meta_prompt("", "", "", "")
    return len(empty) + max_prompt_length(config) + max_response_len + 2 * judgement + 1 + 1
