"""Realistic failures: :func:`break_criteria` edits a response so that chosen criteria
fail and every other criterion keeps its verdict (a stuttered or dropped letter, a wrong
first or last letter, a missing letter, a vowel, lower case)."""

from __future__ import annotations

import random
from collections.abc import Iterable

from .oracle import CONSONANTS, CRITERIA, LETTERS, VOWELS, Spec, _require_str, check, parse_prompt

__all__ = ["break_criteria"]


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
