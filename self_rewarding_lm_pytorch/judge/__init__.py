"""Judges: the reward config and its templates, the LLM judge, external judges.

Modules: :mod:`.templates` (sandboxed Jinja2, :class:`RewardConfig`, score parsing, the
default prompt), :mod:`.base` (:class:`JudgeResult`, the :class:`Judge` protocol,
:class:`CallableJudge`), :mod:`.config` (:class:`JudgeConfig`), :mod:`.llm`
(:class:`LLMJudge`), :mod:`.pairwise` (:class:`PairwiseJudge`, two responses compared in
both orders), :mod:`.reward_model` (:class:`RewardModelJudge`).
"""

from .base import CallableJudge, Judge, JudgeResult
from .config import JudgeConfig
from .llm import LLMJudge
from .pairwise import (
    DEFAULT_PAIRWISE_PROMPT,
    DEFAULT_PAIRWISE_TEMPLATE,
    PairwiseJudge,
    PairwiseResult,
    PairwiseTemplate,
)
from .reward_model import RewardModelJudge
from .templates import (
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_REWARD_CONFIG,
    DEFAULT_REWARD_REGEX_TEMPLATE,
    NUMBER_PATTERN,
    RewardConfig,
    ScoreRange,
    TemplateSecurityError,
    render_template,
)

__all__ = [
    "DEFAULT_PAIRWISE_PROMPT",
    "DEFAULT_PAIRWISE_TEMPLATE",
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_REWARD_CONFIG",
    "DEFAULT_REWARD_REGEX_TEMPLATE",
    "NUMBER_PATTERN",
    "CallableJudge",
    "Judge",
    "JudgeConfig",
    "JudgeResult",
    "LLMJudge",
    "PairwiseJudge",
    "PairwiseResult",
    "PairwiseTemplate",
    "RewardConfig",
    "RewardModelJudge",
    "ScoreRange",
    "TemplateSecurityError",
    "render_template",
]
