"""Judges: the reward config and its templates, the LLM judge, external judges."""

from .config import JudgeConfig
from .core import (
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_REWARD_CONFIG,
    DEFAULT_REWARD_REGEX_TEMPLATE,
    NUMBER_PATTERN,
    CallableJudge,
    Judge,
    JudgeResult,
    LLMJudge,
    RewardConfig,
    RewardModelJudge,
    ScoreRange,
    TemplateSecurityError,
    render_template,
)

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_REWARD_CONFIG",
    "DEFAULT_REWARD_REGEX_TEMPLATE",
    "NUMBER_PATTERN",
    "CallableJudge",
    "Judge",
    "JudgeConfig",
    "JudgeResult",
    "LLMJudge",
    "RewardConfig",
    "RewardModelJudge",
    "ScoreRange",
    "TemplateSecurityError",
    "render_template",
]
