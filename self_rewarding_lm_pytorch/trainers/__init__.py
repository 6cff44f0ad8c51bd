"""Training loops on accelerate: SFT, DPO and SPIN (see ``base.py`` for the shared loop,
``config.py`` for their typed settings, ``checkpoint.py`` for the checkpoint format)."""

from .base import BaseTrainer
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DPOConfig, SFTConfig, SPINConfig, TrainingConfig, build_config
from .dpo import DPOTrainer, PreferenceTrainer
from .sft import SFTTrainer
from .sharding import full_state_dict, gathered, is_sharded, shard_model
from .spin import SPINTrainer

__all__ = [
    "BaseTrainer",
    "DPOConfig",
    "DPOTrainer",
    "PreferenceTrainer",
    "SFTConfig",
    "SFTTrainer",
    "SPINConfig",
    "SPINTrainer",
    "TrainingConfig",
    "build_config",
    "full_state_dict",
    "gathered",
    "is_sharded",
    "load_checkpoint",
    "save_checkpoint",
    "shard_model",
]
