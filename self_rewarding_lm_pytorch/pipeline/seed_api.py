"""The seed's keyword API as stages: ``SelfRewardingTrainer(model, train_sft_dataset=...,
num_spin_cycles=..., self_reward_num_iterations=..., ...)`` without ``stages=``."""

from __future__ import annotations

from collections.abc import Sequence

from ..judge import JudgeConfig
from .stages import PreferenceStage, SFTStage, SPINStage, Stage

__all__ = ["seed_stages"]


def seed_stages(
    *,
    has_eft: bool,
    initial_sft: bool,
    num_spin_cycles: int,
    iterations: int | None,
    num_preference_pairs: int | Sequence[int],
    num_candidates: int,
    judge_max_new_tokens: int,
    sft_kwargs: dict,
    spin_kwargs: dict,
    dpo_kwargs: dict,
) -> list[Stage]:
    """The paper's default order from the seed's keywords: SFT, ``num_spin_cycles`` SPIN
    cycles, then one self-rewarding DPO stage per entry of ``num_preference_pairs`` (two
    when ``iterations`` is None and a single count is given); with an ``eft`` dataset
    (``has_eft``) each DPO stage replays it."""
    stages: list[Stage] = []
    if initial_sft:
        stages.append(SFTStage(datasets=["sft"], trainer=dict(sft_kwargs)))
    if num_spin_cycles:
        stages.append(SPINStage(cycles=num_spin_cycles, trainer=dict(spin_kwargs)))
    pairs = (
        [num_preference_pairs] * (2 if iterations is None else iterations)
        if isinstance(num_preference_pairs, int)
        else list(num_preference_pairs)
    )
    if iterations is not None and len(pairs) != iterations:
        raise ValueError(
            f"num_preference_pairs has {len(pairs)} entries but self_reward_num_iterations "
            f"is {iterations}; give one count per iteration or a single int"
        )
    for n in pairs:
        stages.append(
            PreferenceStage(
                num_preference_pairs=int(n),
                num_candidates=num_candidates,
                judge_settings=JudgeConfig(max_new_tokens=judge_max_new_tokens),
                replay="eft" if has_eft else None,
                trainer=dict(dpo_kwargs),
            )
        )
    return stages
