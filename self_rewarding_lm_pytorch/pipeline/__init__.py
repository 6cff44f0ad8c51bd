"""The self-rewarding training pipeline: ordered stages, a run directory, resume.

Stages (each a config dataclass, :mod:`.stages`) run in the order listed:

* :class:`SFTStage` — supervised fine-tuning on IFT (+ EFT) data; gives M1.
* :class:`SPINStage` — self-play fine-tuning cycles (Chen et al., 2024).
* :class:`PromptGenerationStage` — new prompts by few-shot prompting (Yuan et al., 2024, §2.2).
* :class:`EFTBuildStage` — the paper's EFT data (§3.1): the policy's judgements of
  human-ranked responses that agree with the humans, balanced; read by a later SFT stage.
* :class:`PreferenceStage` — one DPO iteration on pairs built from N sampled candidates
  judged by the model itself (``judge="self"``, the paper's §2.3) or by an external judge
  (OAIF style); gives M(t+1).
* :class:`HeadToHeadStage` — the policy's greedy responses to held-out prompts, judged
  against a baseline's (M1's outputs by default): the win rate per iteration.

The pipeline owns ordering, the run directory, checkpoints and resume
(:class:`SelfRewardingTrainer`, :mod:`.runner`); trainers own the training loops and
``losses/`` the math. Every generated record is appended to JSONL as it is made
(:mod:`.preference`), and ``state.json`` (written atomically, :mod:`.rundir`) says which
stages finished, so running the same command again resumes where it stopped without
losing or duplicating a record.

Modules: :mod:`.stages` (stage configs and plan rules), :mod:`.runner` (the entry point),
:mod:`.seed_api` (the seed's keywords as stages), :mod:`.steps` (one stage's work),
:mod:`.preference` (generate -> judge -> pair), :mod:`.eft` (the EFT build),
:mod:`.meta` (Meta-Rewarding's judge pairs), :mod:`.rundir` (state and fingerprints),
:mod:`.report` (statistics and reports).
"""

from ..data import preference_example, tokenize_sft_item
from .plan import check_plan
from .preference import MIN_TIED_PROMPTS, JudgeParseError, NotEnoughPairsError
from .report import candidate_stats, render_report_md
from .runner import SelfRewardingTrainer
from .stages import (
    STAGE_TRAINERS,
    STAGE_TYPES,
    EFTBuildStage,
    HeadToHeadStage,
    MetaJudgeConfig,
    MetaRewardStage,
    PreferenceStage,
    PromptGenerationStage,
    SFTStage,
    SPINStage,
    Stage,
    check_trainer_kwargs,
)

__all__ = [
    "MIN_TIED_PROMPTS",
    "STAGE_TRAINERS",
    "STAGE_TYPES",
    "EFTBuildStage",
    "HeadToHeadStage",
    "JudgeParseError",
    "MetaJudgeConfig",
    "MetaRewardStage",
    "NotEnoughPairsError",
    "PreferenceStage",
    "PromptGenerationStage",
    "SFTStage",
    "SPINStage",
    "SelfRewardingTrainer",
    "Stage",
    "candidate_stats",
    "check_plan",
    "check_trainer_kwargs",
    "preference_example",
    "render_report_md",
    "tokenize_sft_item",
]
