"""Training loops on accelerate: SFT, DPO and SPIN (see ``base.py`` for the shared loop)."""

from .base import BaseTrainer, load_checkpoint, save_checkpoint
from .dpo import DPOTrainer, PreferenceTrainer
from .sft import SFTTrainer
from .spin import SPINTrainer

__all__ = [
    "BaseTrainer",
    "DPOTrainer",
    "PreferenceTrainer",
    "SFTTrainer",
    "SPINTrainer",
    "load_checkpoint",
    "save_checkpoint",
]
