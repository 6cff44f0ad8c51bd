"""The demo's arms as data: one :class:`Arm` entry per arm in :data:`ARM_TABLE` says how its
preference iterations are built (the stage's kind, judge and settings, and the Python
judges it needs) and gives the one-line description the report prints.  Adding an arm
(``meta``, ``anchored``, ``frozen-judge``...) is one entry here; ``srlm demo --arms``, the
run and the report take every arm from this table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..judge import JudgeConfig
from . import task
from .config import DemoConfig, IterationConfig, RandomJudge

__all__ = ["ARMS", "ARM_TABLE", "Arm", "ArmIteration", "check_arms"]


@dataclass(frozen=True)
class ArmIteration:
    """What an arm adds to iteration ``t``'s ``PreferenceStage``: ``stage`` (its keyword
    arguments: ``kind``, ``judge``, ``judge_settings``, ``pair_margin``...; they override
    the demo's common ones) and ``judges`` (Python judges by name, for ``judge=<name>``)."""

    stage: dict[str, Any]
    judges: dict[str, Callable[[str, str], float]] = field(default_factory=dict)


ArmBuilder = Callable[[DemoConfig, int, int, IterationConfig], ArmIteration]
"""``(config, seed, iteration t (1-based), that iteration's settings) -> ArmIteration``."""


@dataclass(frozen=True)
class Arm:
    """One arm of the demo: its ``name`` (``--arms``), a one-line ``description`` for the
    report, and ``iteration``, the :data:`ArmBuilder` of each of its iterations."""

    name: str
    description: str
    iteration: ArmBuilder


def _self_judge_settings(cfg: DemoConfig) -> JudgeConfig:
    return JudgeConfig(
        num_samples=cfg.judge_samples,
        mode=cfg.judge_mode,  # type: ignore[arg-type]
        temperature=cfg.judge_temperature,
        top_p=cfg.judge_top_p,
        max_new_tokens=cfg.judge_max_new_tokens,
    )


def _self(cfg: DemoConfig, seed: int, t: int, it: IterationConfig) -> ArmIteration:
    return ArmIteration(
        stage={
            "kind": "self_reward_dpo",
            "judge": "self",
            "judge_settings": _self_judge_settings(cfg),
            "pair_margin": it.pair_margin,
        }
    )


def _external(name: str, judge: Callable[[str, str], float]) -> ArmIteration:
    return ArmIteration(
        stage={"kind": "external_reward_dpo", "judge": name, "pair_margin": 0.0},
        judges={name: judge},
    )


def _oracle(cfg: DemoConfig, seed: int, t: int, it: IterationConfig) -> ArmIteration:
    return _external(f"oracle_{t}", task.score)


def _random(cfg: DemoConfig, seed: int, t: int, it: IterationConfig) -> ArmIteration:
    return _external(f"random_{t}", RandomJudge(seed, salt=f"iteration-{t}"))


ARM_TABLE: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("self", "self-rewarding: the model judges its own candidates", _self),
        Arm("oracle", "upper bound: the task's exact oracle judges the candidates", _oracle),
        Arm("random", "lower bound: a seeded random judge scores the candidates", _random),
    )
}
"""Every arm by name, in the default run order."""

ARMS: tuple[str, ...] = tuple(ARM_TABLE)
"""The arm names (the default ``--arms``)."""


def check_arms(arms: list[str]) -> list[str]:
    """``arms`` without repeats, in order; ``ValueError`` naming the unknown ones and the
    choices if any is not in :data:`ARM_TABLE` (or none is given)."""
    arms = list(dict.fromkeys(arms))
    unknown = [a for a in arms if a not in ARM_TABLE]
    if unknown or not arms:
        problem = f"unknown arm(s) {unknown}" if unknown else "no arm given"
        raise ValueError(f"{problem}; give a comma-separated subset of {','.join(ARM_TABLE)}")
    return arms
