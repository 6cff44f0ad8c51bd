"""A plan's names and order: each stage's folder name, the datasets it reads, and
:func:`check_plan`, the one check of a list of stages against the datasets, judges and
models the user defined (for the Python API and for a ``srlm run`` file alike)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .head_to_head_stage import baseline_dataset
from .snapshots import check_references
from .stages import (
    GENERATED_EFT,
    EFTBuildStage,
    HeadToHeadStage,
    PreferenceStage,
    PromptGenerationStage,
    SFTStage,
    SPINStage,
    Stage,
    _did_you_mean,
    _stage_slug,
)

__all__ = ["PYTHON_PLAN", "YAML_PLAN", "PlanVocabulary", "check_plan", "datasets_of", "plan_names"]


def plan_names(stages: Sequence[Stage]) -> list[str]:
    """Each stage's folder name in the run directory: ``01-sft``, ``02-self-reward-dpo``, ..."""
    return [f"{i + 1:02d}-{_stage_slug(s)}" for i, s in enumerate(stages)]


def datasets_of(stage: Stage) -> list[str]:
    """The datasets a stage reads (``prompts="generated"`` and ``"generated_eft"`` are not
    ones: earlier stages write them)."""
    if isinstance(stage, SFTStage):
        return [n for n in stage.datasets if n != GENERATED_EFT]
    if isinstance(stage, EFTBuildStage):
        return [stage.inputs]
    if isinstance(stage, SPINStage):
        return [stage.dataset]
    if isinstance(stage, PromptGenerationStage):
        return [stage.seed_dataset]
    if isinstance(stage, HeadToHeadStage):
        return [n for n in (stage.prompts, baseline_dataset(stage)) if n is not None]
    health = stage.judge_health
    health_data = [health.prompts, health.rows] if health is not None else []
    return [n for n in (stage.prompts, stage.replay, *health_data) if n not in (None, "generated")]


@dataclass(frozen=True)
class PlanVocabulary:
    """How the user of a plan defines its names, for the messages of :func:`check_plan`:
    the Python API (``datasets=`` keywords, a stage named ``02-self-reward-dpo``) or a
    ``srlm run`` YAML file (``data:`` sections, a stage named ``stages[1]``)."""

    datasets: str = "datasets="
    judges: str = "judges="
    models: str = "models="
    yaml: bool = False

    @property
    def defined(self) -> str:
        """How a name comes to exist: ``given in`` (a keyword) or ``defined under`` (a section)."""
        return "defined under" if self.yaml else "given in"

    def stage(self, index: int, name: str) -> str:
        """A stage as the user names it: ``stage 02-self-reward-dpo`` or ``stages[1]``."""
        return f"stages[{index}]" if self.yaml else f"stage {name}"

    def key(self, index: int, name: str, key: str) -> str:
        """A key of a stage: ``stage 01-sft, datasets`` or ``stages[0].datasets``."""
        return f"stages[{index}].{key}" if self.yaml else f"stage {name}, {key}"

    def setting(self, key: str, value: Any) -> str:
        """``key='value'`` (Python) or ``key: value`` (YAML)."""
        if not self.yaml:
            return f"{key}={value!r}"
        return f"{key}: {value if isinstance(value, str) else json.dumps(value)}"

    def undefined(self, where: str, what: str, name: str, known: set[str], section: str) -> str:
        """The message for a ``what`` (dataset, judge, model) ``name`` not defined in ``section``."""
        close = _did_you_mean(name, sorted(known))
        hint = f"; {close}" if close else ""
        define = f"define it under {section}" if self.yaml else f"pass {section}{{{name!r}: ...}}"
        return (
            f"{where}: {what} {name!r} is not {self.defined} {section}{hint} "
            f"(known: {', '.join(sorted(known)) or 'none'}); {define} or use a known name"
        )


#: the names of the Python API (``SelfRewardingTrainer(datasets=..., judges=..., models=...)``)
PYTHON_PLAN = PlanVocabulary()
#: the names of a ``srlm run`` YAML file (its ``data:`` and ``judges:`` sections)
YAML_PLAN = PlanVocabulary(datasets="data:", judges="judges:", models="models:", yaml=True)


def check_plan(
    stages: Sequence[Stage],
    *,
    datasets: set[str],
    judges: set[str],
    models: set[str],
    where: str = "",
    vocabulary: PlanVocabulary = PYTHON_PLAN,
) -> None:
    """Check the names and order of a list of stages, before any data is read.

    Every dataset a stage names (SFT ``datasets``, SPIN ``dataset``, ``seed_dataset``,
    ``prompts``, ``replay``) must be in ``datasets``; an ``external_reward_dpo`` stage's
    judge in ``judges``; a prompt generator other than ``"self"`` in ``models``; a
    ``self_reward_dpo`` stage judges with ``"self"``; ``prompts="generated"`` needs an
    earlier prompt-generation stage, an SFT ``"generated_eft"`` an earlier ``eft_build``
    stage. Raises :class:`ConfigError` naming the stage, the key,
    the problem and the fix, in the words of ``vocabulary`` (the Python API by default,
    :data:`YAML_PLAN` for a ``srlm run`` file); ``where`` prefixes the message.
    """
    v = vocabulary
    pre = f"{where}: " if where else ""

    def need(name: str, i: int, stage_name: str, key: str) -> None:
        if name not in datasets:
            at = v.key(i, stage_name, key)
            raise ConfigError(pre + v.undefined(at, "dataset", name, datasets, v.datasets))

    seen_prompt_generation = seen_eft = False
    for i, (stage, name) in enumerate(zip(stages, plan_names(stages))):
        if isinstance(stage, SFTStage):
            if not stage.datasets:
                raise ConfigError(
                    f"{pre}{v.key(i, name, 'datasets')}: the list is empty; name the SFT data, "
                    f"e.g. {v.setting('datasets', ['sft'])}"
                )
            for ds in stage.datasets:
                if ds == GENERATED_EFT and not seen_eft:
                    raise ConfigError(
                        f"{pre}{v.key(i, name, 'datasets')}: {GENERATED_EFT!r} is the EFT "
                        "data of an eft_build stage, and none comes before this stage; add "
                        f"one ({v.setting('kind', 'eft_build')}) before it or remove the name"
                    )
                if ds != GENERATED_EFT:
                    if ds not in datasets and _did_you_mean(ds, [GENERATED_EFT]):
                        at = v.key(i, name, "datasets")
                        raise ConfigError(
                            pre
                            + v.undefined(at, "dataset", ds, datasets | {GENERATED_EFT}, v.datasets)
                        )
                    need(ds, i, name, "datasets")
        elif isinstance(stage, EFTBuildStage):
            need(stage.inputs, i, name, "inputs")
            seen_eft = True
        elif isinstance(stage, SPINStage):
            need(stage.dataset, i, name, "dataset")
        elif isinstance(stage, PromptGenerationStage):
            need(stage.seed_dataset, i, name, "seed_dataset")
            gen = stage.generator_model
            if gen != "self" and gen not in models:
                at = v.key(i, name, "generator_model")
                raise ConfigError(pre + v.undefined(at, "model", gen, models, v.models))
            seen_prompt_generation = True
        elif isinstance(stage, PreferenceStage):
            if stage.prompts == "generated":
                if not seen_prompt_generation:
                    raise ConfigError(
                        f"{pre}{v.stage(i, name)}: {v.setting('prompts', 'generated')} needs a "
                        "prompt_generation stage before this stage; add one or name a prompt "
                        "dataset"
                    )
            else:
                need(stage.prompts, i, name, "prompts")
            if stage.replay is not None:
                need(stage.replay, i, name, "replay")
            if stage.kind == "self_reward_dpo" and stage.judge != "self":
                raise ConfigError(
                    f"{pre}{v.stage(i, name)}: a self_reward_dpo stage judges with the model "
                    f"itself ({v.setting('judge', 'self')}), not {stage.judge!r}; use "
                    f"{v.setting('kind', 'external_reward_dpo')} for an external judge"
                )
            if stage.kind == "external_reward_dpo" and stage.judge not in judges:
                at = v.key(i, name, "judge")
                if stage.judge == "self":  # the default judge: none was named
                    raise ConfigError(
                        f"{pre}{at}: an external_reward_dpo stage needs an external judge, "
                        f"not 'self'; name one {v.defined} {v.judges} (known: "
                        f"{', '.join(sorted(judges)) or 'none'}) or use "
                        f"{v.setting('kind', 'self_reward_dpo')}"
                    )
                raise ConfigError(pre + v.undefined(at, "judge", stage.judge, judges, v.judges))
            if stage.judge_health is not None:
                for key in ("prompts", "rows"):
                    ds = getattr(stage.judge_health, key)
                    if ds is not None:
                        need(ds, i, name, f"judge_health.{key}")
        elif isinstance(stage, HeadToHeadStage):
            _check_head_to_head(stage, i, name, stages, datasets, judges, pre, v)
    check_references(stages, plan_names(stages), pre, v.key)


def _check_head_to_head(
    stage: HeadToHeadStage,
    i: int,
    name: str,
    stages: Sequence[Stage],
    datasets: set[str],
    judges: set[str],
    pre: str,
    v: PlanVocabulary,
) -> None:
    """A head_to_head stage's prompts, baseline and judge (see :func:`check_plan`)."""
    if stage.prompts not in datasets:
        at = v.key(i, name, "prompts")
        raise ConfigError(pre + v.undefined(at, "dataset", stage.prompts, datasets, v.datasets))
    base = stage.baseline
    earlier = [
        (j, n)
        for j, n in enumerate(plan_names(stages)[:i])
        if isinstance(stages[j], HeadToHeadStage)
    ]
    stage_ok = baseline_dataset(stage) is None and base in {"first", *(n for _, n in earlier)}
    if not stage_ok and (baseline_dataset(stage) is None or base not in datasets):
        shown = ", ".join(f"{v.stage(j, n)} ({n})" for j, n in earlier) or "none"
        close = _did_you_mean(base, ["first", *(n for _, n in earlier), *sorted(datasets)])
        known = ", ".join(sorted(datasets)) or "none"
        raise ConfigError(
            f"{pre}{v.key(i, name, 'baseline')}: {base!r} is neither 'first', an earlier "
            f"head_to_head stage (earlier ones: {shown}) nor a dataset {v.defined} "
            f"{v.datasets} (known: {known}){'; ' + close if close else ''}; "
            f"use {v.setting('baseline', 'first')} (the run's first head_to_head stage), an "
            "earlier one's folder name, or a dataset of reference rows {prompt, response}"
        )
    if stage.judge != "self" and stage.judge not in judges:
        at = v.key(i, name, "judge")
        raise ConfigError(pre + v.undefined(at, "judge", stage.judge, judges, v.judges))
