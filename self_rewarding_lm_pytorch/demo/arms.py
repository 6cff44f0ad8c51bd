"""The demo's arms as data: one :class:`Arm` entry per arm in :data:`ARM_TABLE` says how its
preference iterations are built (the stage's kind, judge and settings, and the Python
judges it needs) and gives the one-line description the report prints.  Adding an arm
(``meta``, ``anchored``, ``frozen-judge``...) is one entry here; ``srlm demo --arms``, the
run and the report take every arm from this table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..judge import JudgeConfig, MetaJudgeTemplate
from ..pipeline.health import JudgeHealthConfig
from . import task
from .config import DemoConfig, IterationConfig, RandomJudge

__all__ = [
    "ARMS",
    "ARM_TABLE",
    "DEFAULT_ARMS",
    "HEALTH_PROMPTS",
    "Arm",
    "ArmIteration",
    "check_arms",
]


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


def _meta(cfg: DemoConfig, seed: int, t: int, it: IterationConfig) -> ArmIteration:
    """Meta-Rewarding (Wu et al. 2024): the self arm's actor pairs, plus judge pairs from the
    model meta-judging two of its own judgements of a candidate (both orders, the label
    probabilities of one greedy verdict each), at most ``meta_judge_pair_share`` of the data."""
    stage = _self(cfg, seed, t, it).stage
    stage.update(
        kind="meta_reward_dpo",
        meta_template=MetaJudgeTemplate(**task.meta_template_kwargs()),
        meta_judge_settings=JudgeConfig(num_samples=1, mode="expected", max_new_tokens=1),
        max_judge_pair_share=cfg.meta_judge_pair_share,
    )
    return ArmIteration(stage=stage)


def _anchored(cfg: DemoConfig, seed: int, t: int, it: IterationConfig) -> ArmIteration:
    """Temporal anchoring: rejected responses sampled from M1 (the arm's initial model)."""
    stage = _self(cfg, seed, t, it).stage
    stage["rejected_from"] = "initial"
    return ArmIteration(stage=stage)


def _frozen(cfg: DemoConfig, seed: int, t: int, it: IterationConfig) -> ArmIteration:
    """The self arm with M1 as the judge of every iteration."""
    stage = _self(cfg, seed, t, it).stage
    stage["judge_model"] = "initial"
    return ArmIteration(stage=stage)


def _health(cfg: DemoConfig, seed: int, t: int, it: IterationConfig) -> ArmIteration:
    """The self arm measuring its judge on-policy before each iteration (the oracle on
    :data:`HEALTH_PROMPTS`); a drop of more than ``health_max_drop`` below the best earlier
    accuracy freezes the judge at the last healthy iteration's model."""
    stage = _self(cfg, seed, t, it).stage
    stage["judge_health"] = JudgeHealthConfig(
        prompts=HEALTH_PROMPTS, max_drop=cfg.health_max_drop, action="freeze"
    )
    return ArmIteration(stage=stage)


#: the dataset of prompts the ``health`` arm measures its judge on
HEALTH_PROMPTS = "health_prompts"

ARM_TABLE: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("self", "self-rewarding: the model judges its own candidates", _self),
        Arm("oracle", "upper bound: the task's exact oracle judges the candidates", _oracle),
        Arm("random", "lower bound: a seeded random judge scores the candidates", _random),
        Arm("meta", "Meta-Rewarding: self-rewarding plus judge pairs from meta-judging", _meta),
        Arm("anchored", "self-rewarding with rejected responses sampled from M1", _anchored),
        Arm("frozen", "self-rewarding with M1 judging every iteration", _frozen),
        Arm(
            "health", "self-rewarding, the judge frozen once its on-policy accuracy drops", _health
        ),
    )
}
"""Every arm by name, in the default run order."""

ARMS: tuple[str, ...] = tuple(ARM_TABLE)
"""Every arm's name (the choices of ``--arms``)."""

DEFAULT_ARMS: tuple[str, ...] = ("self", "meta", "oracle", "random")
"""The arms ``srlm demo`` runs unless ``--arms`` says otherwise (the others cost time)."""


def check_arms(arms: list[str]) -> list[str]:
    """``arms`` without repeats, in order; ``ValueError`` naming the unknown ones and the
    choices if any is not in :data:`ARM_TABLE` (or none is given)."""
    arms = list(dict.fromkeys(arms))
    unknown = [a for a in arms if a not in ARM_TABLE]
    if unknown or not arms:
        problem = f"unknown arm(s) {unknown}" if unknown else "no arm given"
        raise ValueError(f"{problem}; give a comma-separated subset of {','.join(ARM_TABLE)}")
    return arms
