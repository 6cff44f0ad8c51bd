"""Judge templates and score parsing: :class:`RewardConfig`, :class:`ScoreRange`, the defaults.

Templates are Jinja2 rendered in an ``ImmutableSandboxedEnvironment`` with
``StrictUndefined``: a template that reaches for ``__class__`` or similar raises
:class:`TemplateSecurityError` (a ``jinja2.sandbox.SecurityError``).  The score is read
with a tolerant regex built from ``reward_regex_template`` (or a user parser).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_REWARD_CONFIG",
    "DEFAULT_REWARD_REGEX_TEMPLATE",
    "NUMBER_PATTERN",
    "RewardConfig",
    "ScoreRange",
    "TemplateSecurityError",
    "render_template",
]

#: the pattern the ``{{ reward }}`` placeholder of a regex template turns into
NUMBER_PATTERN = r"[-+]?\d+(?:\.\d+)?"

_SENTINEL = "\x00REWARD\x00"

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class TemplateSecurityError(SecurityError):
    """A reward template tried an operation the sandbox forbids (e.g. ``__class__``)."""


# ---------------------------------------------------------------------------- templates


def _compile(template: str, name: str, allowed: set[str], required: set[str], example: str) -> Any:
    """Compile ``template`` in the sandbox, checking the variables it uses."""
    if not isinstance(template, str):
        raise TypeError(f"{name} must be a string, got {type(template).__name__}")
    try:
        variables = meta.find_undeclared_variables(_ENV.parse(template))
    except TemplateSyntaxError as e:
        raise ValueError(f"{name} is not a valid Jinja2 template: {e} (line {e.lineno})") from e
    missing = sorted(required - variables)
    if missing:
        shown = " and ".join("{{ " + m + " }}" for m in missing)
        raise ValueError(
            f"{name} is missing the variable {shown}; add it where the text should go, "
            f"e.g. {example!r}"
        )
    unknown = sorted(variables - allowed)
    if unknown:
        raise ValueError(
            f"{name} uses unknown variable(s) {unknown}; only {sorted(allowed)} are provided "
            "(write literal braces as {{ '{{' }} if you need them)"
        )
    return _ENV.from_string(template)


_PROMPT_EXAMPLE = "User: {{ prompt }}\nResponse: {{ response }}"
_REWARD_EXAMPLE = "Score: {{ reward }}"


def _render(compiled: Any, name: str, **variables: str) -> str:
    try:
        return compiled.render(**variables)
    except SecurityError as e:
        raise TemplateSecurityError(
            f"{name} tried an operation the template sandbox forbids ({e}); templates may "
            "only insert and format their variables, not access Python internals"
        ) from e
    except UndefinedError as e:
        raise ValueError(f"{name} failed to render: {e}") from e


def render_template(template: str, **variables: str) -> str:
    """Render a Jinja2 ``template`` in the sandbox (StrictUndefined) with ``variables``."""
    compiled = _compile(template, "template", set(variables), set(), "")
    return _render(compiled, "template", **variables)


def _compile_prompt_template(template: str) -> Any:
    return _compile(
        template, "prompt_template", {"prompt", "response"}, {"prompt", "response"}, _PROMPT_EXAMPLE
    )


#: what may sit between the pieces of a score's literal text: whitespace and markdown
#: emphasis (``**Score:** 4``, ``__Score__: 4``, ``Score: **4**``)
_GAP = r"[\s*_]*"


def _flexible_pattern(text: str) -> str:
    """A regex for the literal ``text`` of a score template: its words and punctuation in
    order, each may be separated by whitespace or markdown emphasis (whether the template
    has a space there or not); case is ignored through the compiled pattern's flags."""
    pieces = re.findall(r"[^\W_]+|[^\w\s]|_", text)
    pattern = _GAP.join(re.escape(p) for p in pieces)
    if pieces and pieces[0][0].isalnum():
        pattern = r"(?<![^\W_])" + pattern  # "Score" is not the tail of "Subscore"
    return pattern


def _find_score(pattern: re.Pattern | None, match: str, text: str) -> re.Match | None:
    found = None
    for m in pattern.finditer(text) if pattern is not None else ():
        found = m
        if match == "first":
            break
    return found


class _RegexReward:
    """``parse_reward`` built from ``reward_regex_template``: the chosen match's number."""

    def __init__(self, config: RewardConfig) -> None:
        self.pattern, self.match = config._reward_regex, config.match

    def __call__(self, text: str) -> float | None:
        found = _find_score(self.pattern, self.match, text)
        return None if found is None else float(found.group(1))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RegexReward) and (self.pattern, self.match) == (
            other.pattern,
            other.match,
        )

    def __repr__(self) -> str:
        return f"<score regex {self.pattern.pattern!r}, {self.match} match>"


class _JinjaTemplate:
    """``template_fn`` built from ``prompt_template``: the sandboxed Jinja2 rendering."""

    def __init__(self, template: str) -> None:
        self.template = template
        self._compiled = _compile_prompt_template(template)

    def __call__(self, *, prompt: str, response: str) -> str:
        return _render(self._compiled, "prompt_template", prompt=prompt, response=response)

    def __getstate__(self) -> dict:
        return {"template": self.template}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["template"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _JinjaTemplate) and self.template == other.template

    def __repr__(self) -> str:
        return f"<Jinja2 template {self.template[:40]!r}...>"


# ---------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ScoreRange:
    """Validator accepting finite scores in ``[low, high]``; used as ``validate_reward``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"ScoreRange needs finite low <= high, got [{self.low}, {self.high}]")

    def __call__(self, score: float) -> bool:
        return math.isfinite(score) and self.low <= score <= self.high

    def describe(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


def _accept_finite(score: float) -> bool:
    return math.isfinite(score)


# ---------------------------------------------------------------------------- RewardConfig


@dataclass
class RewardConfig:
    """How to ask a model for a reward and how to read the reward from its answer.

    Compatible with the seed's ``RewardConfig``: ``prompt_template`` is a Jinja2 template
    with ``{{ prompt }}`` and ``{{ response }}``; ``reward_regex_template`` is a template
    with ``{{ reward }}`` marking where the number appears; or pass ``parse_reward(text) ->
    float | None`` instead.  ``auto_dedent`` dedents and strips both templates (so
    triple-quoted, indented strings work).  ``template_fn(prompt=..., response=...) -> str``
    replaces the Jinja2 rendering when given.  As in the seed, ``template_fn`` and
    ``parse_reward`` are callables once the config is built (and after ``init()``): the
    user's own, or ones made from the templates (rebuilt when ``init()`` runs again).

    The text around ``{{ reward }}`` is matched tolerantly: case is ignored, and any
    whitespace or markdown emphasis (``*``, ``_``) may sit between its words, its
    punctuation and the number.  The default ``Score: {{ reward }}`` reads ``Score: 4``,
    ``score:4``, ``Score : 4``, ``**Score:** 4`` and ``Score: **4**``, but not ``Score 4``
    or ``Subscore: 4``.

    Extensions: ``validate_reward(score) -> bool`` (default: any finite float),
    ``match`` picks the ``"first"`` or ``"last"`` score in the text, and ``score_values``
    lists the integer scores used by expected-score judging.
    """

    prompt_template: str
    reward_regex_template: str | None = None
    parse_reward: Callable[[str], float | None] | None = None
    template_fn: Callable[..., str] | None = None
    auto_dedent: bool = True
    validate_reward: Callable[[float], bool] | None = None
    match: Literal["first", "last"] = "last"
    score_values: Sequence[int] | None = None

    _reward_regex: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # callables made from the templates by an earlier init() are made again below
        if isinstance(self.template_fn, _JinjaTemplate):
            self.template_fn = None
        if isinstance(self.parse_reward, _RegexReward):
            self.parse_reward = None
        if self.match not in ("first", "last"):
            raise ValueError(f"match must be 'first' or 'last', got {self.match!r}")
        if self.auto_dedent:
            if isinstance(self.prompt_template, str):
                self.prompt_template = textwrap.dedent(self.prompt_template).strip()
            if isinstance(self.reward_regex_template, str):
                self.reward_regex_template = textwrap.dedent(self.reward_regex_template).strip()
        if self.template_fn is not None:
            if not callable(self.template_fn):
                raise TypeError("template_fn must be a callable (prompt=..., response=...) -> str")
        else:
            self.template_fn = _JinjaTemplate(self.prompt_template)
            # fail at construction, not mid-run, for templates that break the sandbox
            self.template_fn(prompt="x", response="y")
        if self.parse_reward is None and self.reward_regex_template is None:
            raise ValueError(
                "RewardConfig needs a way to read the score: pass reward_regex_template "
                "(e.g. 'Score: {{ reward }}') or parse_reward=callable(text) -> float | None"
            )
        if self.parse_reward is not None and not callable(self.parse_reward):
            raise TypeError("parse_reward must be a callable(text) -> float | None")
        self._reward_regex = None
        if self.reward_regex_template is not None:
            compiled = _compile(
                self.reward_regex_template,
                "reward_regex_template",
                {"reward"},
                {"reward"},
                _REWARD_EXAMPLE,
            )
            rendered = _render(compiled, "reward_regex_template", reward=_SENTINEL)
            pieces = rendered.split(_SENTINEL)
            if len(pieces) != 2:
                raise ValueError(
                    "reward_regex_template must contain {{ reward }} exactly once as a plain "
                    f"placeholder (found {len(pieces) - 1}); e.g. 'Score: {{{{ reward }}}}'"
                )
            before, after = (p.strip() for p in pieces)
            pattern = _flexible_pattern(before) + (_GAP if before else "")
            pattern += f"({NUMBER_PATTERN})"
            pattern += (_GAP + _flexible_pattern(after)) if after else ""
            self._reward_regex = re.compile(pattern, re.IGNORECASE)
        if self.validate_reward is not None and not callable(self.validate_reward):
            raise TypeError("validate_reward must be a callable(score) -> bool")
        if self.score_values is not None:
            values = list(self.score_values)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise TypeError(
                    f"score_values must be a non-empty sequence of ints, got {values!r}"
                )
            if len(set(values)) != len(values):
                raise ValueError(f"score_values must be distinct, got {values}")
            self.score_values = tuple(values)
        if self.parse_reward is None:
            self.parse_reward = _RegexReward(self)

    def init(self) -> RewardConfig:
        """Seed compatibility: (re)validate and compile the templates; returns ``self``."""
        self.__post_init__()
        return self

    # ------------------------------------------------------------------ rendering
    def render(self, prompt: str, response: str) -> str:
        """The judge prompt for ``(prompt, response)``."""
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError(
                f"prompt and response must be strings, got {type(prompt).__name__} and "
                f"{type(response).__name__}; decode token ids first"
            )
        template_fn = self.template_fn or _JinjaTemplate(self.prompt_template)
        text = template_fn(prompt=prompt, response=response)
        if not isinstance(text, str):
            raise TypeError(f"template_fn must return a string, got {type(text).__name__}")
        return text

    # ------------------------------------------------------------------ parsing
    def find_reward(self, text: str) -> re.Match | None:
        """The regex match of the score chosen by ``match`` (group 1 is the number)."""
        return _find_score(self._reward_regex, self.match, text)

    def parse_with_reason(self, text: str) -> tuple[float | None, str | None]:
        """``(score, None)`` or ``(None, reason)``; never raises for a string ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"parse expects the judgement text (str), got {type(text).__name__}")
        parse_reward = self.parse_reward or _RegexReward(self)
        try:
            raw = parse_reward(text)
        except Exception as e:  # a user parser must not crash a long run
            return None, f"parse_reward raised {type(e).__name__}: {e}"
        if raw is None:
            return None, "no score found"
        try:
            score = float(raw)
        except (TypeError, ValueError, OverflowError):
            return None, f"parse_reward returned a non-number {raw!r}"
        if not math.isfinite(score):
            return None, f"score {score} is not finite"
        validator = self.validate_reward or _accept_finite
        try:
            ok = bool(validator(score))
        except Exception as e:
            return None, f"validate_reward raised {type(e).__name__}: {e}"
        if not ok:
            if isinstance(validator, ScoreRange):
                return None, f"score {score:g} outside the valid range {validator.describe()}"
            return None, f"score {score:g} rejected by validate_reward"
        return score, None

    def parse(self, text: str) -> float | None:
        """The validated score in ``text``, or ``None``; never raises for a string."""
        return self.parse_with_reason(text)[0]


#: Yuan et al. 2024, Figure 2: the additive 5-point LLM-as-a-Judge prompt.
DEFAULT_JUDGE_PROMPT = """
Review the user's question and the corresponding response using the additive 5-point
scoring system described below. Points are accumulated based on the satisfaction of each
criterion:
- Add 1 point if the response is relevant and provides some information related to
the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question,
but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a
useful way, regardless of whether it seems to have been written by an AI Assistant or if it
has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective,
addressing the user's question directly and comprehensively, and is well-organized and
helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question
by an AI Assistant, without extraneous information, reflecting expert knowledge, and
demonstrating a high-quality, engaging, and insightful answer.

User: {{ prompt }}

<response>{{ response }}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as
necessary. To evaluate the response in alignment with this additive scoring model, we'll
systematically attribute points based on the outlined criteria.
"""

DEFAULT_REWARD_REGEX_TEMPLATE = "Score: {{ reward }}"

DEFAULT_REWARD_CONFIG = RewardConfig(
    prompt_template=DEFAULT_JUDGE_PROMPT,
    reward_regex_template=DEFAULT_REWARD_REGEX_TEMPLATE,
    validate_reward=ScoreRange(0, 5),
    score_values=(0, 1, 2, 3, 4, 5),
)
