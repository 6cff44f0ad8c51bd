"""LLM-as-a-judge scoring and external judges (Yuan et al. 2024, section 2.3 and Figure 2).

The self-rewarding loop scores each candidate response ``y`` to a prompt ``x`` with the
model itself: the judge prompt (Figure 2, an additive 5-point rubric) is rendered from a
template, the model writes a short justification that ends in ``Score: N``, and the
number is parsed out.  Two scoring modes:

* ``mode="mean"`` (the paper): ``k`` sampled judgements per candidate, score = mean of
  the parsable ones, ``r(x, y) = (1/|K|) sum_{j in K} s_j``.
* ``mode="expected"``: one greedy judgement; at the position where its score number
  starts, the model's next-token distribution restricted to the score values ``V``
  gives ``r(x, y) = sum_v p(v) v / sum_v p(v)`` (a continuous score with far fewer ties).

Templates are Jinja2 rendered in an ``ImmutableSandboxedEnvironment`` with
``StrictUndefined``: a template that reaches for ``__class__`` or similar raises
:class:`TemplateSecurityError` (a ``jinja2.sandbox.SecurityError``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from torch import Tensor, nn

from ..generation import GenerationConfig, generate
from ..models import (
    CausalLM,
    Tokenizer,
    encode_response,
    unwrap_model,
    wrap_model,
    wrap_tokenizer,
)

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_REWARD_CONFIG",
    "DEFAULT_REWARD_REGEX_TEMPLATE",
    "NUMBER_PATTERN",
    "CallableJudge",
    "Judge",
    "JudgeResult",
    "LLMJudge",
    "RewardConfig",
    "RewardModelJudge",
    "ScoreRange",
    "TemplateSecurityError",
    "render_template",
]

#: the pattern the ``{{ reward }}`` placeholder of a regex template turns into
NUMBER_PATTERN = r"[-+]?\d+(?:\.\d+)?"

_SENTINEL = "\x00REWARD\x00"

#: keyword options of ``generate`` beyond the config (engine-dependent: read, not assumed)
_GENERATE_PARAMS = {
    name
    for name, p in inspect.signature(generate).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
    and name not in ("generator", "decode", "return_logprobs")
}

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


# ---------------------------------------------------------------------------- results


@dataclass
class JudgeResult:
    """One candidate's judgement.

    ``score`` is the mean of the parsable ``sample_scores`` (mean mode), the expected
    score (expected mode) or the external judge's score; ``None`` when nothing parsed.
    ``sample_scores[i]`` is the score of judge output ``i`` and ``failures[i]`` why it gave
    none: every judge reports one entry per output in both (``sample_scores[i]`` is
    ``None`` exactly when ``failures[i]`` is set); these are what the pipeline's
    ``min_parse_rate`` counts. ``samples[i]`` is the output's text for judges that write
    one (LLM judges; empty for callables and reward models). A result built with only
    ``score`` counts as one output (a ``"no score"`` failure when ``score`` is ``None``).
    ``truncated`` is true when the response was shortened to fit the judge's context;
    ``score_mass`` is the probability the model put on the score tokens (expected mode).
    """

    score: float | None
    samples: list[str] = field(default_factory=list)
    sample_scores: list[float | None] = field(default_factory=list)
    failures: list[str | None] = field(default_factory=list)
    score_distribution: dict[int, float] | None = None
    truncated: bool = False
    score_mass: float | None = None

    def __post_init__(self) -> None:
        if not self.sample_scores and not self.failures:
            self.sample_scores = [self.score]
        if not self.failures:
            self.failures = [None if s is not None else "no score" for s in self.sample_scores]
        n = len(self.sample_scores)
        if len(self.failures) != n or len(self.samples) not in (0, n):
            raise ValueError(
                f"JudgeResult needs one entry per judge output in sample_scores and failures "
                f"(and in samples, when given); got {n}, {len(self.failures)} and "
                f"{len(self.samples)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (distribution keys become strings, as JSON requires)."""
        d = asdict(self)
        if self.score_distribution is not None:
            d["score_distribution"] = {str(k): v for k, v in self.score_distribution.items()}
        return d


@runtime_checkable
class Judge(Protocol):
    """Anything that scores (prompt, response) pairs."""

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        generator: torch.Generator | int | None = None,
    ) -> list[JudgeResult]: ...


def _check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be lists of strings, not a single string")
    if len(prompts) != len(responses):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per "
            "response (repeat a prompt for each of its candidates)"
        )
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise TypeError(
                f"candidate {i}: prompt and response must be strings, got "
                f"{type(p).__name__} and {type(r).__name__}"
            )


def _make_generator(generator: torch.Generator | int | None, device: torch.device):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device=device).manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while judging; every submodule's own mode restored afterwards."""
    modules = list(unwrap_model(model).modules())
    states = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        yield
    finally:
        for m, s in zip(modules, states):
            m.training = s


def _chunks(costs: Sequence[int], batch_size: int | None, token_budget: int | None) -> list[range]:
    """Consecutive index ranges with at most ``batch_size`` items and ``token_budget`` cost."""
    out: list[range] = []
    start, total = 0, 0
    for i, c in enumerate(costs):
        full = batch_size is not None and i - start >= batch_size
        over = token_budget is not None and i > start and total + c > token_budget
        if full or over:
            out.append(range(start, i))
            start, total = i, 0
        total += c
    if start < len(costs):
        out.append(range(start, len(costs)))
    return out


def _plain_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/special tokens or a sentencepiece prefix-space piece."""
    ids = encode_response(tokenizer, text)
    if text and not text[0].isspace():
        while len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "":
            ids = ids[1:]
    return ids


# ---------------------------------------------------------------------------- LLM judge


class LLMJudge:
    """Score responses with a language model prompted as a judge (paper section 2.3).

    Args:
        model: any causal LM (see :func:`~self_rewarding_lm_pytorch.models.wrap_model`).
        tokenizer: a :class:`~self_rewarding_lm_pytorch.models.Tokenizer` (or anything
            :func:`wrap_tokenizer` accepts). Judge prompts go through
            ``tokenizer.format_prompt`` (the chat template) before encoding.
        reward_config: the judge prompt and the score parser.
        num_samples: judgements sampled per candidate in ``"mean"`` mode (paper: 3).
        mode: ``"mean"`` (paper) or ``"expected"`` (see the module docstring).
        temperature, top_p, max_new_tokens: sampling settings of the judgements
            (``"expected"`` mode decodes greedily).
        batch_size: at most this many candidates per ``generate`` call / forward pass
            (``None``: all at once).
        token_budget: at most this many tokens (prompt + new tokens, times samples) per
            ``generate`` call.
        on_too_long: what to do when a judge prompt plus ``max_new_tokens`` exceeds the
            model's context: ``"error"`` (a ValueError naming the candidate and the
            lengths), ``"truncate_response"`` (cut the response's tail until it fits;
            the result has ``truncated=True``) or ``"truncate_left"`` (keep the last
            tokens of the judge prompt: only sensible for toy models with tiny contexts).
        generation_kwargs: extra :class:`GenerationConfig` fields (``top_k``,
            ``stop_strings``, ...) or keyword options of ``generate``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        reward_config: RewardConfig = DEFAULT_REWARD_CONFIG,
        *,
        num_samples: int = 3,
        mode: Literal["mean", "expected"] = "mean",
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 256,
        batch_size: int | None = None,
        token_budget: int | None = None,
        on_too_long: Literal["error", "truncate_response", "truncate_left"] = "error",
        generation_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(reward_config, RewardConfig):
            raise TypeError(
                f"reward_config must be a RewardConfig, got {type(reward_config).__name__}"
            )
        if mode not in ("mean", "expected"):
            raise ValueError(f"mode must be 'mean' or 'expected', got {mode!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        for name, value in (("batch_size", batch_size), ("token_budget", token_budget)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if on_too_long not in ("error", "truncate_response", "truncate_left"):
            raise ValueError(
                "on_too_long must be 'error', 'truncate_response' or 'truncate_left', "
                f"got {on_too_long!r}"
            )
        self.lm: CausalLM = wrap_model(model)
        self.tokenizer: Tokenizer = wrap_tokenizer(tokenizer)
        self.config = reward_config
        self.num_samples = num_samples
        self.mode = mode
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.on_too_long = on_too_long
        self.generation_kwargs = dict(generation_kwargs or {})
        fields = {f.name for f in dataclasses.fields(GenerationConfig)}
        self._config_kwargs = {k: v for k, v in self.generation_kwargs.items() if k in fields}
        self._generate_kwargs = {k: v for k, v in self.generation_kwargs.items() if k not in fields}
        unknown = sorted(set(self._generate_kwargs) - set(_GENERATE_PARAMS))
        if unknown:
            raise ValueError(
                f"generation_kwargs {unknown} are neither GenerationConfig fields nor "
                f"generate() options; valid: {sorted(fields | set(_GENERATE_PARAMS))}"
            )
        if mode == "expected":
            self._check_expected_mode()

    # ------------------------------------------------------------------ checks
    def _check_expected_mode(self) -> None:
        if self.config.score_values is None:
            raise ValueError(
                "mode='expected' needs reward_config.score_values (the integer scores to "
                "weigh, e.g. (0, 1, 2, 3, 4, 5)); set it or use mode='mean'"
            )
        if self.config._reward_regex is None:
            raise ValueError(
                "mode='expected' needs reward_config.reward_regex_template to locate the score "
                "in the judgement (a parse_reward callable cannot say where it is); use mode='mean'"
            )
        for v in self.config.score_values:
            ids = _plain_token_ids(self.tokenizer, str(v))
            if len(ids) != 1:
                raise ValueError(
                    f"score value {v} encodes to {len(ids)} tokens {ids} in the judge's "
                    "tokenizer; expected-score mode needs every score value to be a single "
                    "token: use mode='mean' or single-token score_values"
                )

    def check_prompts(self, prompts: Sequence[str], *, where: str = "") -> None:
        """Refuse, before any candidate is sampled, a prompt whose judge prompt cannot fit the
        context whatever the response: the template rendered with the prompt and an empty
        response, plus ``max_new_tokens`` (``on_too_long='truncate_left'`` always fits)."""
        if self.lm.max_seq_len is None or self.on_too_long == "truncate_left":
            return
        from ..generation import response_budget

        tok = self.tokenizer
        for i, p in enumerate(prompts):
            n = len(tok.encode(tok.format_prompt(self.config.render(p, ""))))
            response_budget(
                n,
                self.max_new_tokens,
                self.lm.max_seq_len,
                where=f"{where}prompt {i}: the judge prompt (template and prompt, before any "
                "response)",
                context_name="the judge model's context",
                fix="shorten the judge template or the prompt, lower the judge's "
                "max_new_tokens, judge with a model of longer context, or truncate from the "
                "left (judge_on_too_long='truncate_left')",
            )

    def _encode_judge_prompts(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> tuple[list[list[int]], list[bool]]:
        tok = self.tokenizer
        max_len = self.lm.max_seq_len
        limit = None if max_len is None else max_len - self.max_new_tokens
        if limit is not None and limit < 1:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for the judge prompt in "
                f"the model's context of {max_len} tokens; lower max_new_tokens"
            )
        all_ids, truncated = [], []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = tok.encode(tok.format_prompt(self.config.render(p, r)))
            cut = False
            if limit is not None and len(ids) > limit:
                if self.on_too_long == "error":
                    from ..generation import response_budget

                    response_budget(  # raises: the one context rule, and its message
                        len(ids),
                        self.max_new_tokens,
                        max_len,
                        where=f"candidate {i}: the judge prompt",
                        context_name="the model's context",
                        fix="shorten the response, lower max_new_tokens, or pass "
                        "on_too_long='truncate_response'",
                    )
                if self.on_too_long == "truncate_left":
                    ids = ids[-limit:]
                else:
                    ids = self._truncate_response(i, p, r, ids, limit)
                cut = True
            all_ids.append(ids)
            truncated.append(cut)
        return all_ids, truncated

    def _truncate_response(self, i: int, prompt: str, response: str, ids: list[int], limit: int):
        tok = self.tokenizer
        resp_ids = _plain_token_ids(tok, response)
        for _ in range(16):  # bounded: each round removes at least one response token
            excess = len(ids) - limit
            if excess <= 0:
                return ids
            if not resp_ids:
                break
            resp_ids = resp_ids[: max(0, len(resp_ids) - excess)]
            ids = tok.encode(tok.format_prompt(self.config.render(prompt, tok.decode(resp_ids))))
        if len(ids) <= limit:
            return ids
        raise ValueError(
            f"candidate {i}: even with the response truncated the judge prompt is {len(ids)} "
            f"tokens, more than the {limit} that fit the model's context of "
            f"{self.lm.max_seq_len} with max_new_tokens={self.max_new_tokens}; shorten the "
            "prompt or the judge template, or lower max_new_tokens"
        )

    def _gen_config(self, **overrides: Any) -> GenerationConfig:
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            eos_token_id=self.tokenizer.eos_id,
        )
        kwargs.update(self._config_kwargs)
        kwargs.update(overrides)
        return GenerationConfig(**kwargs)

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        generator: torch.Generator | int | None = None,
    ) -> list[JudgeResult]:
        """Judge every ``(prompts[i], responses[i])``; one :class:`JudgeResult` each."""
        _check_pairs(prompts, responses)
        if not prompts:
            return []
        generator = _make_generator(generator, self.lm.device)
        ids, truncated = self._encode_judge_prompts(prompts, responses)
        with _eval_mode(self.lm), torch.no_grad():
            if self.mode == "mean":
                results = self._score_mean(ids, generator)
            else:
                results = self._score_expected(ids, generator)
        for res, cut in zip(results, truncated):
            res.truncated = cut
        return results

    def _generate(
        self, ids: list[list[int]], config: GenerationConfig, generator
    ) -> list[list[int]]:
        k = config.num_return_sequences
        extra = dict(self._generate_kwargs)
        budget = self.token_budget
        if budget is not None and "token_budget" in _GENERATE_PARAMS:
            extra["token_budget"], budget = budget, None  # the engine micro-batches itself
        costs = [(len(x) + self.max_new_tokens) * k for x in ids]
        seqs: list[list[int]] = []
        for chunk in _chunks(costs, self.batch_size, budget):
            out = generate(
                self.lm,
                [ids[i] for i in chunk],
                config,
                generator=generator,
                decode=self.tokenizer.decode,
                **extra,
            )
            if len(out.sequences) != len(chunk) * k:
                raise RuntimeError(
                    f"generate returned {len(out.sequences)} sequences for {len(chunk)} prompts "
                    f"x {k} samples"
                )
            seqs.extend(out.sequences)
        return seqs

    def _score_mean(self, ids: list[list[int]], generator) -> list[JudgeResult]:
        k = self.num_samples
        seqs = self._generate(ids, self._gen_config(num_return_sequences=k), generator)
        results = []
        for i in range(len(ids)):
            samples = [self.tokenizer.decode(s) for s in seqs[i * k : (i + 1) * k]]
            parsed = [self.config.parse_with_reason(t) for t in samples]
            scores = [s for s, _ in parsed]
            ok = [s for s in scores if s is not None]
            results.append(
                JudgeResult(
                    score=sum(ok) / len(ok) if ok else None,
                    samples=samples,
                    sample_scores=scores,
                    failures=[reason for _, reason in parsed],
                )
            )
        return results

    def _score_expected(self, ids: list[list[int]], generator) -> list[JudgeResult]:
        seqs = self._generate(
            ids, self._gen_config(temperature=0.0, num_return_sequences=1), generator
        )
        results: list[JudgeResult] = []
        pending: list[tuple[int, list[int], dict[int, int]]] = []  # (result idx, input, value->id)
        candidate_cache: dict[str, dict[int, int] | None] = {}
        for i, gen in enumerate(seqs):
            text = self.tokenizer.decode(gen)
            res = JudgeResult(score=None, samples=[text], sample_scores=[None], failures=[None])
            results.append(res)
            greedy, reason = self.config.parse_with_reason(text)
            res.sample_scores[0] = greedy
            if greedy is None:
                res.failures[0] = reason
                continue
            m = self.config.find_reward(text)
            aligned = self._align(gen, text, m.start(1)) if m is not None else None
            if aligned is None:
                res.sample_scores[0] = None
                res.failures[0] = "could not align the score with the judgement's tokens"
                continue
            n, gap = aligned
            if gap not in candidate_cache:
                candidate_cache[gap] = self._score_token_ids(gap)
            cand = candidate_cache[gap]
            if cand is None or gen[n] not in cand.values():
                res.sample_scores[0] = None
                res.failures[0] = (
                    "the score token does not match the single-token score_values; "
                    "use mode='mean' for this tokenizer"
                )
                continue
            pending.append((i, ids[i] + gen[:n], cand))
        self._fill_expected(results, pending)
        return results

    def _align(self, gen: list[int], text: str, start: int) -> tuple[int, str] | None:
        """Largest ``n`` whose decoded prefix ends at or before character ``start``."""
        decode = self.tokenizer.decode
        lo, hi = 0, len(gen)
        while lo < hi:  # bounded binary search: largest n with len(decode(gen[:n])) <= start
            mid = (lo + hi + 1) // 2
            if len(decode(gen[:mid])) <= start:
                lo = mid
            else:
                hi = mid - 1
        prefix = decode(gen[:lo])
        if lo >= len(gen) or not text.startswith(prefix):
            return None
        return lo, text[len(prefix) : start]

    def _score_token_ids(self, gap: str) -> dict[int, int] | None:
        out: dict[int, int] = {}
        for v in self.config.score_values or ():
            ids = _plain_token_ids(self.tokenizer, gap + str(v))
            if len(ids) != 1:
                return None
            out[v] = ids[0]
        return out

    def _fill_expected(
        self, results: list[JudgeResult], pending: list[tuple[int, list[int], dict[int, int]]]
    ) -> None:
        device = self.lm.device
        costs = [len(x) for _, x, _ in pending]
        for chunk in _chunks(costs, self.batch_size, self.token_budget):
            rows = [pending[j] for j in chunk]
            width = max(len(x) for _, x, _ in rows)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            for b, (_, x, _) in enumerate(rows):
                input_ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[b, : len(x)] = 1
            logits = self.lm(input_ids, attention_mask=mask)
            last = logits[torch.arange(len(rows), device=device), mask.sum(1) - 1].float()
            logprobs = torch.log_softmax(last, dim=-1)
            for b, (i, _, cand) in enumerate(rows):
                values = list(cand)
                lp = logprobs[b, [cand[v] for v in values]]
                mass = float(lp.exp().sum())
                probs = torch.softmax(lp, dim=-1)  # p(v) / sum_v p(v)
                dist = {v: float(p) for v, p in zip(values, probs)}
                res = results[i]
                res.score = float(sum(p * v for v, p in dist.items()))
                res.score_distribution = dist
                res.score_mass = mass


# ---------------------------------------------------------------------------- external judges


class CallableJudge:
    """Wrap ``fn(prompt, response) -> float | None`` (an oracle, an API, a rule) as a Judge.

    ``None`` or a non-finite number means "no score". Exceptions from ``fn`` propagate.
    """

    def __init__(self, fn: Callable[[str, str], float | None]) -> None:
        if not callable(fn):
            raise TypeError("CallableJudge needs a callable fn(prompt, response) -> float | None")
        self.fn = fn

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        generator: torch.Generator | int | None = None,
    ) -> list[JudgeResult]:
        _check_pairs(prompts, responses)
        results = []
        for p, r in zip(prompts, responses):
            raw = self.fn(p, r)
            score, reason = None, None
            if raw is None:
                reason = "the judge returned None"
            else:
                try:
                    score = float(raw)
                except (TypeError, ValueError):
                    reason = f"the judge returned a non-number {raw!r}"
                else:
                    if not math.isfinite(score):
                        score, reason = None, f"the judge returned a non-finite score {raw!r}"
            results.append(JudgeResult(score=score, sample_scores=[score], failures=[reason]))
        return results


class RewardModelJudge:
    """Score with a reward model: token ids ``(B, T)`` -> scores.

    ``head="scalar"``: the model returns ``(B,)``, ``(B, 1)`` (one score per sequence)
    or ``(B, T)`` / ``(B, T, 1)`` (a score per position; the last token's is used).
    ``head="classes"``: the model returns class logits ``(B, C)`` or ``(B, T, C)``; the
    score is the expected class value ``sum_c softmax(logits)_c * class_values[c]``
    (``class_values`` defaults to ``0..C-1``). Outputs with ``.logits`` or tuples are
    unwrapped. Sequences are batched only with others of the same length, so no padding
    ever reaches the model and any module (pooling, bidirectional) is scored exactly.

    The text fed to the model is ``template`` (sandboxed Jinja2 with ``{{ prompt }}`` and
    ``{{ response }}``) encoded with ``tokenizer.encode``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        template: str = "{{ prompt }}\n{{ response }}",
        head: Literal["scalar", "classes"] = "scalar",
        class_values: Sequence[float] | None = None,
        batch_size: int = 16,
        max_seq_len: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if head not in ("scalar", "classes"):
            raise ValueError(f"head must be 'scalar' or 'classes', got {head!r}")
        if class_values is not None and head != "classes":
            raise ValueError("class_values only applies to head='classes'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.tokenizer = wrap_tokenizer(tokenizer)
        self.template = template
        self._compiled = _compile(
            template, "template", {"prompt", "response"}, {"response"}, _PROMPT_EXAMPLE
        )
        # fail at construction, not mid-run, for templates that break the sandbox
        _render(self._compiled, "template", prompt="x", response="y")
        self.head = head
        self.class_values = None if class_values is None else [float(v) for v in class_values]
        self.batch_size = batch_size
        self.max_seq_len = (
            max_seq_len if max_seq_len is not None else getattr(model, "max_seq_len", None)
        )

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _call(self, input_ids: Tensor) -> Tensor:
        m = unwrap_model(self.model)
        if any(c.__name__ == "PreTrainedModel" for c in type(m).__mro__):
            out = self.model(input_ids=input_ids)
        else:
            out = self.model(input_ids)
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the reward model returned {type(out).__name__}; expected a tensor of scores "
                "(B,), (B, 1), (B, T, 1) or class logits (B, C) / (B, T, C)"
            )
        return out.float()

    def _reduce(self, out: Tensor, batch: int, seq: int) -> tuple[Tensor, Tensor | None]:
        """Per-row scores ``(B,)`` and, for classes, the class probabilities ``(B, C)``."""
        shape = tuple(out.shape)
        if out.shape[0] != batch:
            raise ValueError(f"the reward model returned shape {shape} for a batch of {batch}")
        if self.head == "scalar":
            if out.ndim == 3 and out.shape[1:] == (seq, 1):
                return out[:, -1, 0], None
            if out.ndim == 2 and out.shape[1] == 1:
                return out[:, 0], None
            if out.ndim == 2 and out.shape[1] == seq:
                return out[:, -1], None
            if out.ndim == 1:
                return out, None
            raise ValueError(
                f"head='scalar' expects reward model outputs (B,), (B, 1), (B, T) or (B, T, 1) "
                f"with B={batch}, T={seq}; got {shape} (use head='classes' for class logits)"
            )
        if out.ndim == 3 and out.shape[1] == seq:
            out = out[:, -1]
        if out.ndim != 2:
            raise ValueError(f"head='classes' expects logits (B, C) or (B, T, C); got {shape}")
        n = out.shape[1]
        values = (
            self.class_values if self.class_values is not None else [float(c) for c in range(n)]
        )
        if len(values) != n:
            raise ValueError(
                f"the reward model returned {n} classes but class_values has {len(values)}; "
                "pass one value per class"
            )
        probs = torch.softmax(out, dim=-1)
        return probs @ torch.tensor(values, dtype=probs.dtype, device=probs.device), probs

    @torch.no_grad()
    def score(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        generator: torch.Generator | int | None = None,
    ) -> list[JudgeResult]:
        _check_pairs(prompts, responses)
        encoded = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = self.tokenizer.encode(_render(self._compiled, "template", prompt=p, response=r))
            if not ids:
                raise ValueError(f"candidate {i}: the reward model input encodes to no tokens")
            if self.max_seq_len is not None and len(ids) > self.max_seq_len:
                raise ValueError(
                    f"candidate {i}: reward model input is {len(ids)} tokens, more than its "
                    f"context of {self.max_seq_len}; shorten the response or the template"
                )
            encoded.append(ids)
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_len.setdefault(len(ids), []).append(i)
        results: list[JudgeResult | None] = [None] * len(encoded)
        device = self._device()
        with _eval_mode(self.model):
            for seq, idx in by_len.items():
                for s in range(0, len(idx), self.batch_size):
                    part = idx[s : s + self.batch_size]
                    x = torch.tensor([encoded[i] for i in part], dtype=torch.long, device=device)
                    scores, probs = self._reduce(self._call(x), len(part), seq)
                    for b, i in enumerate(part):
                        value = float(scores[b])
                        ok = math.isfinite(value)
                        dist = None
                        if probs is not None:
                            values = self.class_values or list(range(probs.shape[1]))
                            dist = {v: float(p) for v, p in zip(values, probs[b])}
                        results[i] = JudgeResult(
                            score=value if ok else None,
                            sample_scores=[value if ok else None],
                            failures=[None if ok else f"the reward model returned {value}"],
                            score_distribution=dist,
                        )
        return [r for r in results if r is not None]
