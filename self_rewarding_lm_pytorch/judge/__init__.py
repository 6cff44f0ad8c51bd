"""Judges: the reward config and its templates, the LLM judge, external judges.

Modules: :mod:`.templates` (sandboxed Jinja2, :class:`RewardConfig`, score parsing, the
default prompt), :mod:`.base` (:class:`JudgeResult`, the :class:`Judge` protocol,
:class:`CallableJudge`), :mod:`.config` (:class:`JudgeConfig`), :mod:`.llm`
(:class:`LLMJudge`), :mod:`.pairwise` (:class:`PairwiseJudge`, two responses compared in
both orders), :mod:`.meta`
(:class:`MetaJudge`, Meta-Rewarding's judge of judgements, :func:`bradley_terry`), :mod:`.reward_model` (:class:`RewardModelJudge`).
"""

from .base import CallableJudge, Judge, JudgeResult
from .config import JudgeConfig
from .llm import LLMJudge
from .meta import (
    DEFAULT_META_JUDGE_PROMPT,
    DEFAULT_META_TEMPLATE,
    MetaJudge,
    MetaJudgeTemplate,
    bradley_terry,
)
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
    "DEFAULT_META_JUDGE_PROMPT",
    "DEFAULT_META_TEMPLATE",
    "DEFAULT_REWARD_CONFIG",
    "DEFAULT_REWARD_REGEX_TEMPLATE",
    "NUMBER_PATTERN",
    "CallableJudge",
    "Judge",
    "JudgeConfig",
    "JudgeResult",
    "LLMJudge",
    "MetaJudge",
    "MetaJudgeTemplate",
    "PairwiseJudge",
    "PairwiseResult",
    "PairwiseTemplate",
    "RewardConfig",
    "RewardModelJudge",
    "ScoreRange",
    "TemplateSecurityError",
    "bradley_terry",
    "render_template",
]
