"""Self-Rewarding Language Models (Yuan et al., 2024) with SPIN and DPO, in PyTorch."""

from .data import create_mock_dataset
from .generation import GenerationConfig, GenerationOutput, generate, generate_text
from .judge import DEFAULT_REWARD_CONFIG, CallableJudge, LLMJudge, RewardConfig, RewardModelJudge
from .losses import (
    PreferenceLossOutput,
    dpo_loss,
    nll_loss,
    sequence_logprobs,
    spin_loss,
    token_logprobs,
)
from .models import (
    CallableTokenizer,
    CausalLM,
    HFTokenizer,
    unwrap_model,
    wrap_model,
    wrap_tokenizer,
)
from .pipeline import (
    JudgeParseError,
    NotEnoughPairsError,
    PreferenceStage,
    PromptGenerationStage,
    SelfRewardingTrainer,
    SFTStage,
    SPINStage,
)
from .trainers import DPOTrainer, SFTTrainer, SPINTrainer, load_checkpoint, save_checkpoint

__all__ = [
    "DEFAULT_REWARD_CONFIG",
    "CallableJudge",
    "CallableTokenizer",
    "CausalLM",
    "DPOTrainer",
    "GenerationConfig",
    "GenerationOutput",
    "HFTokenizer",
    "JudgeParseError",
    "LLMJudge",
    "NotEnoughPairsError",
    "PreferenceLossOutput",
    "PreferenceStage",
    "PromptGenerationStage",
    "RewardConfig",
    "RewardModelJudge",
    "SFTStage",
    "SFTTrainer",
    "SPINStage",
    "SPINTrainer",
    "SelfRewardingTrainer",
    "create_mock_dataset",
    "dpo_loss",
    "generate",
    "generate_text",
    "load_checkpoint",
    "nll_loss",
    "save_checkpoint",
    "sequence_logprobs",
    "spin_loss",
    "token_logprobs",
    "unwrap_model",
    "wrap_model",
    "wrap_tokenizer",
]
