"""The meta-judge of Meta-Rewarding (Wu et al. 2024, arXiv 2407.19594, §2.2): the model
compares two of its own judgements of one response, and Bradley–Terry strengths rank them.

:class:`MetaJudgeTemplate` is the meta-judge prompt (variables ``prompt``, ``response``,
``judgement_a``, ``judgement_b``) and its verdict parser; :class:`MetaJudge` samples
verdicts in both orders through :class:`~.pairwise.PairwiseJudge` (same settings, chunking,
``mode`` mean|expected and truncation); :func:`bradley_terry` turns a battle matrix into
strengths (the paper's "Elo" scores).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .pairwise import PairwiseJudge, PairwiseResult, PairwiseTemplate
from .templates import _compile, _render

__all__ = [
    "DEFAULT_META_JUDGE_PROMPT",
    "DEFAULT_META_TEMPLATE",
    "MetaJudge",
    "MetaJudgeTemplate",
    "battle_matrix",
    "bradley_terry",
]

#: The meta-judge prompt, in our words after the paper's: the judge's rubric (the
#: self-rewarding paper's 5-point one), the response and two judgements of it; the
#: meta-judge says which judgement applies the rubric better, as "Winner: Judgement A|B".
DEFAULT_META_JUDGE_PROMPT = """
Below are a user's question, a response to it and two judgements of that response. Each
judgement was asked to score the response with this additive 5-point rubric:
- 1 point if the response is relevant and gives some information related to the question,
even if it is incomplete or contains some irrelevant content.
- 1 more point if it addresses a substantial part of the question, without fully resolving
it or giving a direct answer.
- A third point if it answers the basic elements of the question in a useful way.
- A fourth point if it is clearly written from an AI Assistant's perspective, addresses the
question directly and comprehensively, and is well organised and helpful.
- A fifth point if it is impeccably tailored to the question, without extraneous
information, reflecting expert knowledge, and is engaging and insightful.

User: {{ prompt }}

<response>{{ response }}</response>

<judgement_a>{{ judgement_a }}</judgement_a>

<judgement_b>{{ judgement_b }}</judgement_b>

Decide which judgement is more accurate: which one follows the rubric more closely,
evaluates the response more correctly and applies the criteria more consistently. Ignore
the order in which they are shown and their length. Explain briefly, then end with one
line: "Winner: Judgement A" or "Winner: Judgement B".
"""

_VARIABLES = {"prompt", "response", "judgement_a", "judgement_b"}
_EXAMPLE = "{{ prompt }} {{ response }} A: {{ judgement_a }} B: {{ judgement_b }}"
#: the verdict parser's own prompt template (never rendered for the model)
_PARSER_PROMPT = "{{ prompt }}{{ response_a }}{{ response_b }}"
_INIT_FIELDS = ("prompt_template", "verdict_template", "labels", "match", "auto_dedent")


@dataclass
class MetaJudgeTemplate:
    """The meta-judge prompt and its verdict parser.

    ``prompt_template`` is a sandboxed Jinja2 template using ``{{ prompt }}``,
    ``{{ response }}``, ``{{ judgement_a }}`` and ``{{ judgement_b }}``; ``verdict_template``
    marks with ``{{ verdict }}`` where the verdict appears and ``labels`` are the words for
    "judgement A is better", "B is better" and "tie", read as tolerantly as
    :class:`~.pairwise.PairwiseTemplate` reads them (it parses the verdicts). A compact
    format for a tiny model: ``prompt_template="meta {{ prompt }}{{ response }}|{{
    judgement_a }}|{{ judgement_b }}>"``, ``verdict_template="{{ verdict }}"``,
    ``labels=("A", "B", "=")``.
    """

    prompt_template: str = DEFAULT_META_JUDGE_PROMPT
    verdict_template: str = "Winner: Judgement {{ verdict }}"
    labels: tuple[str, str, str] = ("A", "B", "tie")
    match: Literal["first", "last"] = "last"
    auto_dedent: bool = True

    def __post_init__(self) -> None:
        if self.auto_dedent and isinstance(self.prompt_template, str):
            self.prompt_template = textwrap.dedent(self.prompt_template).strip()
        self._compiled = _compile(
            self.prompt_template, "prompt_template", _VARIABLES, _VARIABLES, _EXAMPLE
        )
        self.render("x", "y", "z", "w")  # fail at construction for templates that break the sandbox
        self._verdicts = PairwiseTemplate(
            prompt_template=_PARSER_PROMPT,
            verdict_template=self.verdict_template,
            labels=self.labels,
            match=self.match,
            auto_dedent=self.auto_dedent,
        )
        self.verdict_template = self._verdicts.verdict_template
        self.labels = self._verdicts.labels

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _INIT_FIELDS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def render(self, prompt: str, response: str, judgement_a: str, judgement_b: str) -> str:
        """The meta-judge prompt showing ``judgement_a`` as A and ``judgement_b`` as B."""
        values = {
            "prompt": prompt,
            "response": response,
            "judgement_a": judgement_a,
            "judgement_b": judgement_b,
        }
        bad = [f"{k} ({type(v).__name__})" for k, v in values.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"{', '.join(bad)} must be strings; decode token ids first")
        return _render(self._compiled, "prompt_template", **values)

    @property
    def verdicts(self) -> PairwiseTemplate:
        """The verdict parser (a :class:`~.pairwise.PairwiseTemplate`)."""
        return self._verdicts

    def parse(self, text: str) -> str | None:
        """The verdict in ``text`` (``"a"``, ``"b"`` or ``"tie"``), or ``None``."""
        return self._verdicts.parse(text)


DEFAULT_META_TEMPLATE = MetaJudgeTemplate()


class MetaJudge(PairwiseJudge):
    """Compare two judgements of the same response with a language model (the meta-judge).

    Every comparison is sampled in both orders (judgement A first, then B first), as
    :class:`~.pairwise.PairwiseJudge` compares two responses; the arguments are its
    arguments, with a :class:`MetaJudgeTemplate` as ``template``. Use
    :meth:`compare_judgements`.
    """

    def __init__(
        self,
        model_or_backend: Any,
        tokenizer: Any,
        template: MetaJudgeTemplate = DEFAULT_META_TEMPLATE,
        *,
        config: Any = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(template, MetaJudgeTemplate):
            raise TypeError(f"template must be a MetaJudgeTemplate, got {type(template).__name__}")
        self.meta_template = template
        super().__init__(model_or_backend, tokenizer, template.verdicts, config=config, **overrides)

    def compare_judgements(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        judgements_a: Sequence[str],
        judgements_b: Sequence[str],
        *,
        generator: torch.Generator | int | None = None,
    ) -> list[PairwiseResult]:
        """Judge ``judgements_a[i]`` against ``judgements_b[i]`` (two judgements of
        ``responses[i]`` to ``prompts[i]``), both orders; ``preference`` is P(A better)."""
        named = {
            "prompts": prompts,
            "responses": responses,
            "judgements_a": judgements_a,
            "judgements_b": judgements_b,
        }
        for name, value in named.items():
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
        if len({len(v) for v in named.values()}) > 1:
            sizes = ", ".join(f"{len(v)} {k}" for k, v in named.items())
            raise ValueError(f"compare_judgements: got {sizes}; pass one of each per item")
        items = list(zip(prompts, responses))
        return PairwiseJudge.compare(self, items, judgements_a, judgements_b, generator=generator)

    def compare(self, *args: Any, **kwargs: Any) -> list[PairwiseResult]:
        """Refused: a meta-judge compares judgements; call :meth:`compare_judgements`."""
        raise TypeError(
            "MetaJudge compares two judgements of a response: call compare_judgements(prompts, "
            "responses, judgements_a, judgements_b)"
        )

    def _encode_orders(self, item: Any, a: str, b: str) -> list[list[int]]:
        prompt, response = item
        tok, render = self.tokenizer, self.meta_template.render
        return [
            tok.encode(tok.format_prompt(render(prompt, response, a, b))),
            tok.encode(tok.format_prompt(render(prompt, response, b, a))),
        ]


def battle_matrix(
    n: int, comparisons: Sequence[tuple[int, int, PairwiseResult | dict]]
) -> np.ndarray:
    """The battle matrix ``B`` of ``n`` judgements: ``B[m, k]`` = wins of judgement ``m``
    over ``k``, from ``(m, k, result)`` comparisons (``m`` shown as A in the first order).

    Each parsed verdict of either order counts once: a win adds 1 to the winner's entry, a
    tie 1/2 to both. In expected mode each order adds its label probabilities instead
    (``p(a) + p(tie)/2`` to ``B[m, k]``, ``p(b) + p(tie)/2`` to ``B[k, m]``). A meta-judge
    that always names the first position therefore gives ``B[m, k] = B[k, m]``: no signal.
    """
    battles = np.zeros((n, n), dtype=np.float64)
    for m, k, result in comparisons:
        r = result if isinstance(result, dict) else result.to_dict()
        for order in ("ab", "ba"):
            dist = r.get(f"distribution_{order}")
            if dist is not None:
                wins = [(m, k, dist["a"] + dist["tie"] / 2), (k, m, dist["b"] + dist["tie"] / 2)]
            else:
                wins = []
                for v in r[f"verdicts_{order}"]:
                    if v == "a":
                        wins.append((m, k, 1.0))
                    elif v == "b":
                        wins.append((k, m, 1.0))
                    elif v == "tie":
                        wins += [(m, k, 0.5), (k, m, 0.5)]
            for i, j, w in wins:
                battles[i, j] += w
    return battles


def bradley_terry(
    battles: Any, *, prior: float = 0.01, max_iter: int = 1000, tol: float = 1e-10
) -> np.ndarray:
    """Bradley–Terry strengths ``θ`` (log scale, mean 0) of a battle matrix ``B``
    (``B[m, k]`` = wins of ``m`` over ``k``): the maximiser of

    ``L(θ) = Σ_{m≠k} (B[m, k] + prior) · log σ(θ_m − θ_k)``,  ``P(m beats k) = σ(θ_m − θ_k)``,

    found by the minorise-maximise iteration (Hunter 2004) on ``p = exp(θ)``:
    ``p_m ← W_m / Σ_{k≠m} N_mk / (p_m + p_k)`` with ``W_m = Σ_k B'[m, k]``, ``N_mk = B'[m, k]
    + B'[k, m]`` and ``B' = B + prior`` off the diagonal, in float64, at most ``max_iter``
    rounds (stops when no ``θ`` moves more than ``tol``). The prior is a virtual game of
    weight ``prior`` each way between every two players: it keeps the maximum finite when a
    player wins every battle (or loses them all) and leaves players with no battles level;
    ``prior → 0`` is the plain maximum-likelihood estimate. The paper calls ``θ`` the
    judgements' Elo scores.
    """
    b = np.asarray(battles, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"battles must be a square matrix, got shape {b.shape}")
    if not np.isfinite(b).all() or (b < 0).any():
        raise ValueError("battles must hold finite win counts >= 0")
    if not (math.isfinite(prior) and prior > 0):
        raise ValueError(f"prior must be a finite number > 0, got {prior!r}")
    n = b.shape[0]
    if n == 0:
        return np.zeros(0)
    b = b + prior * (1.0 - np.eye(n))
    np.fill_diagonal(b, 0.0)
    wins, games = b.sum(axis=1), b + b.T
    theta = np.zeros(n)
    for _ in range(max_iter):
        p = np.exp(theta)
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.log(wins / denom)
        new -= new.mean()
        done = np.abs(new - theta).max() <= tol
        theta = new
        if done:
            break
    return theta
