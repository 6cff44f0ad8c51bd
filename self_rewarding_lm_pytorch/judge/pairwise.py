"""The pairwise LLM judge: which of two responses to the same prompt follows it better.

Each item is judged ``num_samples`` times with response A shown first and ``num_samples``
times with the two swapped, so a judge that favours a position cancels out; the verdicts
of the swapped order are mapped back to the original labels. ``preference`` is P(A better)
over every parsable verdict of both orders (a tie counts 0.5); ``mode="expected"`` weighs
one greedy verdict per order by the judge's label probabilities instead. Judgements are sampled
through any :class:`~self_rewarding_lm_pytorch.generation.GenerationBackend`, with the same
settings (:class:`~.config.JudgeConfig`) and chunking as :class:`~.llm.LLMJudge`.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..generation import GenerationBackend, response_budget
from ..models import CausalLM
from ..utils import make_generator
from .config import JudgeConfig
from .llm import SampledJudge, _plain_token_ids, _single_token_ids
from .templates import _GAP, _compile, _find_score, _flexible_pattern, _render

__all__ = [
    "DEFAULT_PAIRWISE_PROMPT",
    "DEFAULT_PAIRWISE_TEMPLATE",
    "PairwiseJudge",
    "PairwiseResult",
    "PairwiseTemplate",
]

Verdict = Literal["a", "b", "tie"]

DEFAULT_PAIRWISE_PROMPT = """
Compare two responses to the user's instruction below and decide which one follows it
better: more helpful, correct and complete, and to the point. Judge the content only, not
the length of the responses or the order in which they are shown.

User: {{ prompt }}

<response_a>{{ response_a }}</response_a>

<response_b>{{ response_b }}</response_b>

Think briefly (up to 100 words) about how well each response follows the instruction,
then end with one line: "Verdict: A" if response A is better, "Verdict: B" if response B
is better, or "Verdict: tie" if neither is.
"""

_VARIABLES = {"prompt", "response_a", "response_b"}
_PROMPT_EXAMPLE = "User: {{ prompt }}\nA: {{ response_a }}\nB: {{ response_b }}"
_SENTINEL = "\x00VERDICT\x00"
_SWAP: dict[Any, Any] = {"a": "b", "b": "a", "tie": "tie", None: None}
_VALUE = {"a": 1.0, "b": 0.0, "tie": 0.5}
_INIT_FIELDS = ("prompt_template", "verdict_template", "labels", "match", "auto_dedent")


def _label_pattern(label: str) -> str:
    """``label`` literally; a label starting or ending in a letter or digit must not be part
    of a longer word (``A`` does not match in ``Apple``)."""
    pattern = re.escape(label)
    if label[0].isalnum():
        pattern = r"(?<![^\W_])" + pattern
    if label[-1].isalnum():
        pattern += r"(?![^\W_])"
    return pattern


@dataclass
class PairwiseTemplate:
    """The pairwise judge prompt and its verdict parser.

    ``prompt_template`` is a sandboxed Jinja2 template using ``{{ prompt }}``,
    ``{{ response_a }}`` and ``{{ response_b }}``. ``verdict_template`` marks with
    ``{{ verdict }}`` where the verdict appears; ``labels`` are the words for "A is
    better", "B is better" and "tie". The verdict is matched as tolerantly as
    :class:`~.templates.RewardConfig`'s score (case, whitespace and markdown emphasis are
    ignored: ``**Verdict:** a`` reads as A); ``match`` picks the first or last verdict in
    the judgement. ``auto_dedent`` dedents and strips both templates.
    """

    prompt_template: str = DEFAULT_PAIRWISE_PROMPT
    verdict_template: str = "Verdict: {{ verdict }}"
    labels: tuple[str, str, str] = ("A", "B", "tie")
    match: Literal["first", "last"] = "last"
    auto_dedent: bool = True

    _compiled: Any = field(default=None, init=False, repr=False, compare=False)
    _verdict_regex: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)
    _examples: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.match not in ("first", "last"):
            raise ValueError(f"match must be 'first' or 'last', got {self.match!r}")
        for name in ("prompt_template", "verdict_template"):
            value = getattr(self, name)
            if self.auto_dedent and isinstance(value, str):
                setattr(self, name, textwrap.dedent(value).strip())
        self._compiled = _compile(
            self.prompt_template, "prompt_template", _VARIABLES, _VARIABLES, _PROMPT_EXAMPLE
        )
        self.render("x", "y", "z")  # fail at construction for templates that break the sandbox
        labels = tuple(self.labels) if isinstance(self.labels, (list, tuple)) else ()
        if len(labels) != 3 or not all(isinstance(x, str) and x.strip() for x in labels):
            raise ValueError(
                f"labels must be three non-empty strings (A better, B better, tie), got "
                f"{self.labels!r}; e.g. ('A', 'B', 'tie')"
            )
        labels = tuple(x.strip() for x in labels)
        if len({x.lower() for x in labels}) != 3:
            raise ValueError(
                f"labels must differ (ignoring case), got {labels!r}; e.g. ('A', 'B', 'tie')"
            )
        self.labels = labels
        compiled = _compile(
            self.verdict_template,
            "verdict_template",
            {"verdict"},
            {"verdict"},
            "Verdict: {{ verdict }}",
        )
        pieces = _render(compiled, "verdict_template", verdict=_SENTINEL).split(_SENTINEL)
        if len(pieces) != 2:
            raise ValueError(
                "verdict_template must contain {{ verdict }} exactly once as a plain "
                f"placeholder (found {len(pieces) - 1}); e.g. 'Verdict: {{{{ verdict }}}}'"
            )
        self._examples = [repr(_render(compiled, "verdict_template", verdict=x)) for x in labels]
        before, after = (p.strip() for p in pieces)
        pattern = _flexible_pattern(before) + (_GAP if before else "")
        pattern += "(" + "|".join(map(_label_pattern, sorted(labels, key=len, reverse=True))) + ")"
        pattern += (_GAP + _flexible_pattern(after)) if after else ""
        self._verdict_regex = re.compile(pattern, re.IGNORECASE)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _INIT_FIELDS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def render(self, prompt: str, response_a: str, response_b: str) -> str:
        """The judge prompt showing ``response_a`` as A and ``response_b`` as B."""
        values = {"prompt": prompt, "response_a": response_a, "response_b": response_b}
        bad = [f"{k} ({type(v).__name__})" for k, v in values.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"{', '.join(bad)} must be strings; decode token ids first")
        return _render(self._compiled, "prompt_template", **values)

    def find_verdict(self, text: str) -> re.Match | None:
        """The regex match of the verdict chosen by ``match`` (group 1 is the label)."""
        return _find_score(self._verdict_regex, self.match, text)

    def parse_with_reason(self, text: str) -> tuple[Verdict | None, str | None]:
        """``("a" | "b" | "tie", None)`` for the verdict in ``text``, or ``(None, reason)``."""
        if not isinstance(text, str):
            raise TypeError(f"parse expects the judgement text (str), got {type(text).__name__}")
        found = self.find_verdict(text)
        if found is None:
            return None, f"no verdict found (expected one of {', '.join(self._examples)})"
        word = found.group(1).lower()
        return ("a", "b", "tie")[[x.lower() for x in self.labels].index(word)], None

    def parse(self, text: str) -> Verdict | None:
        """The verdict in ``text`` (``"a"``, ``"b"`` or ``"tie"``), or ``None``."""
        return self.parse_with_reason(text)[0]


DEFAULT_PAIRWISE_TEMPLATE = PairwiseTemplate()


def _side(p: float | None) -> Verdict | None:
    if p is None:
        return None
    return "a" if p > 0.5 else "b" if p < 0.5 else "tie"


def _swapped(distribution: dict[str, float]) -> dict[str, float]:
    return {_SWAP[v]: p for v, p in distribution.items()}


def _mean(verdicts: Sequence[Verdict | None]) -> float | None:
    values = [_VALUE[v] for v in verdicts if v is not None]
    return math.fsum(values) / len(values) if values else None


@dataclass
class PairwiseResult:
    """One comparison of ``response_a`` with ``response_b``.

    ``verdicts_ab`` are the verdicts with A shown first, ``verdicts_ba`` those with B
    shown first, both in the original labels (``"a"``, ``"b"``, ``"tie"``; None where a
    judgement did not parse, ``failures_*`` saying why); ``samples_*`` are the judgement
    texts. ``preference`` is P(A better) over the parsable verdicts of both orders (a tie
    counts 0.5), None if none parsed; ``winner`` is ``"a"`` above 0.5, ``"b"`` below,
    ``"tie"`` at 0.5. ``consistent`` says whether the two orders, each on its own, favour
    the same side (None if an order has no parsable verdict). ``truncated``: a response
    was shortened to fit the judge's context.

    In expected mode (one greedy judgement per order) ``distribution_ab`` /
    ``distribution_ba`` are the judge's probabilities of the three labels at the verdict,
    renormalised and keyed by the original labels; each order's preference is
    ``p(a) + p(tie) / 2`` and ``preference`` is the mean over the orders that have one.
    """

    preference: float | None
    winner: Verdict | None
    consistent: bool | None
    verdicts_ab: list[Verdict | None]
    verdicts_ba: list[Verdict | None]
    samples_ab: list[str]
    samples_ba: list[str]
    failures_ab: list[str | None]
    failures_ba: list[str | None]
    truncated: bool = False
    distribution_ab: dict[str, float] | None = None
    distribution_ba: dict[str, float] | None = None

    @classmethod
    def from_verdicts(
        cls,
        verdicts_ab: list[Verdict | None],
        verdicts_ba: list[Verdict | None],
        **rest: Any,
    ) -> PairwiseResult:
        """The aggregate of per-order verdicts and, in expected mode, distributions (all in
        the original labels)."""
        dists = [rest.get("distribution_ab"), rest.get("distribution_ba")]
        if any(d is not None for d in dists):  # expected mode
            per_order = [None if d is None else d["a"] + 0.5 * d["tie"] for d in dists]
            known = [p for p in per_order if p is not None]
            preference = math.fsum(known) / len(known)
        else:
            per_order = [_mean(verdicts_ab), _mean(verdicts_ba)]
            preference = _mean(verdicts_ab + verdicts_ba)
        ab, ba = map(_side, per_order)
        consistent = None if ab is None or ba is None else ab == ba
        return cls(preference, _side(preference), consistent, verdicts_ab, verdicts_ba, **rest)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _check_items(prompts: Any, responses_a: Any, responses_b: Any) -> None:
    named = {"prompts": prompts, "responses_a": responses_a, "responses_b": responses_b}
    for name, value in named.items():
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(
                f"compare: {name} must be a list of strings, got {type(value).__name__}"
            )
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(
            f"compare: got {len(prompts)} prompts, {len(responses_a)} responses_a and "
            f"{len(responses_b)} responses_b; pass one prompt and one response of each side "
            "per item"
        )


class PairwiseJudge(SampledJudge):
    """Compare two responses to each prompt with a language model prompted as a judge.

    Args:
        model_or_backend: a causal LM (sampled with the torch engine) or any
            :class:`~self_rewarding_lm_pytorch.generation.GenerationBackend`.
        tokenizer: a :class:`~self_rewarding_lm_pytorch.models.Tokenizer` (or anything
            :func:`wrap_tokenizer` accepts); judge prompts go through its chat format.
        template: the prompt and the verdict parser, a :class:`PairwiseTemplate`.
        config: a :class:`~.config.JudgeConfig`; ``**overrides`` replace its fields, as for
            :class:`~.llm.LLMJudge`: ``num_samples`` judgements per order, ``temperature``,
            ``top_p``, ``max_new_tokens``, ``batch_size`` / ``token_budget`` per generate
            call (both orders of every item share the calls), ``generation_kwargs``, and
            ``on_too_long``: ``"error"``, ``"truncate_response"`` (cut the tail of the
            longer response until both orders fit; ``truncated=True``) or
            ``"truncate_left"``; ``mode``: ``"mean"`` (count sampled verdicts) or
            ``"expected"`` (one greedy judgement per order, weighed by the label
            probabilities at its verdict: every label must be a single token).
    """

    def __init__(
        self,
        model_or_backend: nn.Module | CausalLM | GenerationBackend,
        tokenizer: Any,
        template: PairwiseTemplate = DEFAULT_PAIRWISE_TEMPLATE,
        *,
        config: JudgeConfig | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(template, PairwiseTemplate):
            raise TypeError(f"template must be a PairwiseTemplate, got {type(template).__name__}")
        self._setup(model_or_backend, tokenizer, config, overrides, owner="PairwiseJudge")
        self.template = template
        if self.settings.mode == "expected":
            for label in template.labels:
                n = len(_plain_token_ids(self.tokenizer, label))
                if n != 1:
                    raise ValueError(
                        f"PairwiseJudge: mode='expected' needs every label to be a single token "
                        f"in the judge's tokenizer, but {label!r} is {n} tokens; use "
                        "mode='mean' or single-token labels (PairwiseTemplate(labels=...))"
                    )

    def compare(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
        *,
        generator: torch.Generator | int | None = None,
    ) -> list[PairwiseResult]:
        """Judge ``responses_a[i]`` against ``responses_b[i]`` for ``prompts[i]``, both orders."""
        _check_items(prompts, responses_a, responses_b)
        if not prompts:
            return []
        generator = make_generator(generator, self._device())
        ids: list[list[int]] = []  # row 2i: A shown first, row 2i + 1: B shown first
        truncated: list[bool] = []
        for i, item in enumerate(zip(prompts, responses_a, responses_b)):
            rows, cut = self._encode_item(i, *item)
            ids.extend(rows)
            truncated.append(cut)
        expected = self.settings.mode == "expected"
        k = 1 if expected else self.settings.num_samples
        config = self._gen_config(
            num_return_sequences=k, **({"temperature": 0.0} if expected else {})
        )
        seqs = self._generate(ids, config, generator)
        texts = [self.tokenizer.decode(s) for s in seqs]
        parsed = [self.template.parse_with_reason(t) for t in texts]
        dists = self._distributions(ids, seqs, texts, parsed) if expected else [None] * len(ids)
        results = []
        for i, cut in enumerate(truncated):
            ab, ba = range(2 * i * k, (2 * i + 1) * k), range((2 * i + 1) * k, (2 * i + 2) * k)
            d_ab, d_ba = dists[2 * i], dists[2 * i + 1]
            results.append(
                PairwiseResult.from_verdicts(
                    [parsed[r][0] for r in ab],
                    [_SWAP[parsed[r][0]] for r in ba],
                    samples_ab=[texts[r] for r in ab],
                    samples_ba=[texts[r] for r in ba],
                    failures_ab=[parsed[r][1] for r in ab],
                    failures_ba=[parsed[r][1] for r in ba],
                    truncated=cut,
                    distribution_ab=d_ab,
                    distribution_ba=None if d_ba is None else _swapped(d_ba),
                )
            )
        return results

    def _distributions(
        self,
        ids: list[list[int]],
        seqs: list[list[int]],
        texts: list[str],
        parsed: list[tuple[Verdict | None, str | None]],
    ) -> list[dict[str, float] | None]:
        """Expected mode: the label probabilities at each greedy judgement's verdict (one
        judgement per row); a verdict that cannot be weighed becomes a failure in ``parsed``."""
        pending: list[tuple[int, list[int], list[int]]] = []  # (row, input, label ids)
        label_ids: dict[str, list[int] | None] = {}
        for r, (gen, text) in enumerate(zip(seqs, texts)):
            found = self.template.find_verdict(text) if parsed[r][0] is not None else None
            if found is None:
                continue
            aligned = self._align(gen, text, found.start(1))
            if aligned is None:
                parsed[r] = (None, "could not align the verdict with the judgement's tokens")
                continue
            n, gap = aligned
            if gap not in label_ids:
                label_ids[gap] = _single_token_ids(self.tokenizer, gap, self.template.labels)
            cand = label_ids[gap]
            if cand is None or gen[n] not in cand:
                parsed[r] = (
                    None,
                    "the verdict token is not one of the single-token labels (as written in "
                    "the template); use mode='mean' for this tokenizer",
                )
                continue
            pending.append((r, ids[r] + gen[:n], cand))
        dists: list[dict[str, float] | None] = [None] * len(seqs)
        logprobs = self._next_token_logprobs([x for _, x, _ in pending], [c for *_, c in pending])
        for (r, _, _), row in zip(pending, logprobs):
            probs = torch.softmax(torch.tensor(row, dtype=torch.float64), dim=-1)
            dists[r] = dict(zip(("a", "b", "tie"), map(float, probs)))
        return dists

    # ------------------------------------------------------------------ context
    def _encode_orders(self, prompt: str, a: str, b: str) -> list[list[int]]:
        tok = self.tokenizer
        return [
            tok.encode(tok.format_prompt(self.template.render(prompt, a, b))),
            tok.encode(tok.format_prompt(self.template.render(prompt, b, a))),
        ]

    def _encode_item(self, i: int, prompt: str, a: str, b: str) -> tuple[list[list[int]], bool]:
        try:
            rows = self._encode_orders(prompt, a, b)
        except TypeError as e:
            raise TypeError(f"compare: item {i}: {e}") from None
        limit = self._prompt_limit()
        longest = max(rows, key=len)
        if limit is None or len(longest) <= limit:
            return rows, False
        mode = self.settings.on_too_long
        if mode == "error":
            response_budget(  # raises: the one context rule, and its message
                len(longest),
                self.settings.max_new_tokens,
                self.max_seq_len,
                where=f"item {i}: the pairwise judge prompt",
                context_name="the judge model's context",
                fix="shorten the responses, lower max_new_tokens, or pass "
                "on_too_long='truncate_response'",
            )
        if mode == "truncate_left":
            return [row[-limit:] for row in rows], True
        return self._truncate_longer(i, prompt, a, b, limit), True

    def _truncate_longer(self, i: int, prompt: str, a: str, b: str, limit: int) -> list[list[int]]:
        """Cut the longer response's tail (both, once they are as long) until both orders fit."""
        tok = self.tokenizer
        texts, toks = [a, b], [_plain_token_ids(tok, a), _plain_token_ids(tok, b)]
        for _ in range(32):  # bounded: each round removes at least one response token
            rows = self._encode_orders(prompt, *texts)
            excess = max(len(r) for r in rows) - limit
            if excess <= 0:
                return rows
            if not any(toks):
                break
            la, lb = len(toks[0]), len(toks[1])
            if la == lb:
                cut, keep = (0, 1), max(0, la - math.ceil(excess / 2))
            else:
                cut, keep = ((0,) if la > lb else (1,)), max(min(la, lb), max(la, lb) - excess)
            for j in cut:
                toks[j] = toks[j][:keep]
                texts[j] = tok.decode(toks[j])
        raise ValueError(
            f"item {i}: even with the responses truncated the pairwise judge prompt is more "
            f"than the {limit} tokens that fit the judge model's context of {self.max_seq_len} "
            f"with max_new_tokens={self.settings.max_new_tokens}; shorten the prompt or the "
            "judge template, or lower max_new_tokens"
        )
