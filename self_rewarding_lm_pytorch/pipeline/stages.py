"""The stage configs of the pipeline: the training stages (SFT, SPIN, prompt generation,
preference/DPO, Meta-Rewarding) defined here, the judging ones (:mod:`.judging_stages`),
and the registries of kinds, trainers and sampling stages.

:func:`check_trainer_kwargs` checks a stage's values and trainer arguments; the names a list
of stages uses are checked by :func:`~.plan.check_plan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..config import ConfigError, from_dict
from ..generation.selection import check_generation_override
from ..judge import JudgeConfig
from ..judge.meta import MetaJudgeTemplate
from ..trainers import DPOTrainer, SFTTrainer, SPINTrainer, TrainingConfig, build_config
from .health import JudgeHealthConfig
from .judging_stages import EFTBuildStage, EFTJudgeConfig, HeadToHeadStage
from .stage_rules import (
    START_AFRESH,
    _check,
    _check_types,
    _did_you_mean,
    _non_negative,
    _refuse_renamed,
    _sampling_rules,
)

__all__ = [
    "SAMPLING_STAGES",
    "STAGE_TRAINERS",
    "STAGE_TYPES",
    "START_AFRESH",
    "EFTBuildStage",
    "EFTJudgeConfig",
    "MetaJudgeConfig",
    "MetaRewardStage",
    "HeadToHeadStage",
    "PreferenceStage",
    "PromptGenerationStage",
    "SFTStage",
    "SPINStage",
    "Stage",
    "check_trainer_kwargs",
]


#: an SFT ``datasets`` entry naming the ``eft.jsonl`` of the latest earlier eft_build stage
GENERATED_EFT = "generated_eft"


@dataclass
class SFTStage:
    """Supervised fine-tuning on the named datasets (concatenated), e.g. ``["sft", "eft"]``;
    ``"generated_eft"`` names the EFT data of the latest earlier ``eft_build`` stage.

    ``init="base"`` starts from the weights the run started from (the model as given),
    not from the previous stage's: the paper's M1 is the base model fine-tuned on IFT + EFT.
    """

    kind: Literal["sft"] = "sft"
    datasets: list[str] = field(default_factory=lambda: ["sft"])
    init: Literal["previous", "base"] = field(
        default="previous",
        metadata={"help": "start from the previous stage's weights or the run's base weights"},
    )
    trainer: dict[str, Any] = field(default_factory=dict)  # SFTTrainer keyword arguments

    def __post_init__(self) -> None:
        _plain_trainer(self)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        _check_types(self)


@dataclass
class SPINStage:
    """SPIN on an SFT dataset: real responses vs the model's own samples.

    ``cycles`` is the number of SPIN iterations; by default each generates once and trains
    3 epochs on it, mixed with the previous iteration's generations (the official schedule;
    ``trainer=dict(schedule="per_epoch")`` or ``epochs_per_iteration=k`` change it, see
    :class:`~self_rewarding_lm_pytorch.trainers.SPINTrainer`).
    """

    kind: Literal["spin"] = "spin"
    dataset: str = "sft"
    cycles: int = 1
    trainer: dict[str, Any] = field(default_factory=dict)  # SPINTrainer keyword arguments
    generation: dict[str, Any] = field(  # merged over the run's generation: section
        default_factory=dict,
        metadata={"help": "this stage's backend keys, over the run's (e.g. {backend: vllm})"},
    )

    def __post_init__(self) -> None:
        _plain_trainer(self)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        _check_types(self)
        _check(
            self,
            [(self.cycles >= 1, "cycles", "be at least 1", "set 1 or more, or remove the stage")],
        )
        check_generation_override(self.generation, "generation")


@dataclass
class PromptGenerationStage:
    """New prompts from few-shot prompting (paper §2.2), filtered as in Self-Instruct."""

    kind: Literal["prompt_generation"] = "prompt_generation"
    num_prompts: int = 1000
    seed_dataset: str = "prompts"
    generator_model: str = "self"  # "self" or the name of a model given in `models=`
    num_shots: int = 8
    num_seed_shots: int = 6
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 128
    max_attempts: int | None = None
    generation: dict[str, Any] = field(  # merged over the run's generation: section
        default_factory=dict,
        metadata={"help": "this stage's backend keys, over the run's (e.g. {backend: vllm})"},
    )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        _check_types(self)
        check_generation_override(self.generation, "generation")
        shots = self.num_shots
        _check(
            self,
            [
                (
                    self.num_prompts >= 1,
                    "num_prompts",
                    "be at least 1",
                    "set 1 or more, or remove the stage",
                ),
                (shots >= 1, "num_shots", "be at least 1", "the paper uses 8"),
                *_sampling_rules(self.temperature, self.top_p, "temperature", "top_p"),
                (self.max_new_tokens >= 1, "max_new_tokens", "be at least 1", "use e.g. 128"),
                (
                    0 <= self.num_seed_shots <= shots,
                    "num_seed_shots",
                    f"lie in [0, num_shots={shots}]",
                    "the paper takes 6 of its 8 shots from the seed prompts",
                ),
                (
                    self.max_attempts is None or self.max_attempts >= 1,
                    "max_attempts",
                    "be at least 1 (or null: no bound)",
                    "use e.g. 4 * num_prompts",
                ),
            ],
        )


@_refuse_renamed
@dataclass
class PreferenceStage:
    """One iteration of DPO on pairs built from judged candidates.

    ``judge="self"`` is the paper's self-rewarding iteration (the model being trained is
    the judge); any other name picks an external judge given to the trainer (``judges=``).
    ``prompts="generated"`` uses the output of the latest prompt-generation stage.
    """

    kind: Literal["self_reward_dpo", "external_reward_dpo"] = "self_reward_dpo"
    num_preference_pairs: int = 1000
    prompts: str = "prompts"
    judge: str = "self"
    num_candidates: int = 4  # paper: N = 4
    temperature: float = 0.7  # paper: T = 0.7, top-p 0.9
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 128
    judge_settings: JudgeConfig = field(  # the self judge's sampling (paper: 3, averaged)
        default_factory=JudgeConfig,
        metadata={"help": "how the self judge samples its judgements (num_samples, mode, ...)"},
    )
    pair_strategy: Any = "best_worst"  # name in pairs.PAIR_STRATEGIES, or a callable
    pair_margin: float = 0.0
    length_tolerance: float = 0.0
    chunk_size: int = 16  # prompts generated + judged (and saved) together
    max_prompts: int | None = None  # bound on prompts tried; default: every prompt once
    min_parse_rate: float = 0.2  # stop with an explanation when the judge parses less
    replay: str | None = None  # SFT dataset replayed as auxiliary loss in every DPO step
    trainer: dict[str, Any] = field(default_factory=dict)  # DPOTrainer keyword arguments
    generation: dict[str, Any] = field(  # merged over the run's generation: section
        default_factory=dict,
        metadata={"help": "this stage's backend keys, over the run's (e.g. {backend: vllm})"},
    )
    rejected_from: str = field(
        default="policy",
        metadata={"help": "rejected responses from 'policy', 'initial' or an earlier stage"},
    )
    judge_model: str = field(
        default="policy",
        metadata={"help": "the self judge samples 'policy', 'initial' or an earlier stage"},
    )
    judge_health: JudgeHealthConfig | None = field(
        default=None,
        metadata={"help": "measure the judge before judging; stop or freeze when unhealthy"},
    )

    # keys of earlier versions, now under judge_settings: refused, naming the new key
    _renamed_keys: ClassVar[dict[str, str]] = {
        "judge_samples": "judge_settings.num_samples",
        "judge_mode": "judge_settings.mode",
        "judge_temperature": "judge_settings.temperature",
        "judge_top_p": "judge_settings.top_p",
        "judge_max_new_tokens": "judge_settings.max_new_tokens",
        "judge_on_too_long": "judge_settings.on_too_long",
    }

    def __post_init__(self) -> None:
        _plain_trainer(self)
        if isinstance(self.judge_settings, dict):  # judge_settings={"num_samples": 1}
            self.judge_settings = from_dict(JudgeConfig, self.judge_settings, path="judge_settings")
        if isinstance(self.judge_health, dict):  # judge_health={"rows": "eft_heldout", ...}
            self.judge_health = from_dict(JudgeHealthConfig, self.judge_health, path="judge_health")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        from ..pairs import PAIR_STRATEGIES

        _check_types(self)
        n, t, js = self.num_candidates, self.temperature, self.judge_settings
        at_least_1 = "be at least 1"
        _check(
            self,
            [
                (
                    self.num_preference_pairs >= 1,
                    "num_preference_pairs",
                    at_least_1,
                    "use e.g. 1000",
                ),
                (
                    n >= 2,
                    "num_candidates",
                    "be at least 2 to form a preference pair",
                    "sample 2 or more candidates per prompt (the paper samples 4)",
                ),
                *_sampling_rules(t, self.top_p, "temperature", "top_p"),
                (
                    t > 0,
                    "temperature",
                    f"be above 0 to sample {n} different candidates (0 is greedy: every "
                    "candidate of a prompt is the same response, so every pair would have "
                    "chosen == rejected)",
                    "sample with temperature > 0 (the paper uses 0.7)",
                ),
                (self.top_k >= 0, "top_k", "be >= 0", "0 disables it"),
                (0 <= self.min_p < 1, "min_p", "lie in [0, 1)", "0 disables it"),
                (self.max_new_tokens >= 1, "max_new_tokens", at_least_1, "use e.g. 128"),
                (
                    js.num_samples >= 1,
                    "judge_settings.num_samples",
                    at_least_1,
                    "the paper averages 3",
                ),
                *_sampling_rules(
                    js.temperature, js.top_p, "judge_settings.temperature", "judge_settings.top_p"
                ),
                (
                    js.max_new_tokens >= 1,
                    "judge_settings.max_new_tokens",
                    at_least_1,
                    "use e.g. 256",
                ),
                (
                    _non_negative(self.pair_margin),
                    "pair_margin",
                    "be a finite number >= 0",
                    "0 keeps every gap",
                ),
                (
                    _non_negative(self.length_tolerance),
                    "length_tolerance",
                    "be a finite number >= 0",
                    "0 turns length control off",
                ),
                (self.chunk_size >= 1, "chunk_size", at_least_1, "use e.g. 16"),
                (
                    self.max_prompts is None or self.max_prompts >= 1,
                    "max_prompts",
                    "be at least 1 (or null: every prompt once)",
                    "use e.g. 600",
                ),
                (0 <= self.min_parse_rate <= 1, "min_parse_rate", "lie in [0, 1]", "use e.g. 0.2"),
                (
                    callable(self.pair_strategy)
                    or (
                        isinstance(self.pair_strategy, str)
                        and self.pair_strategy in PAIR_STRATEGIES
                    ),
                    "pair_strategy",
                    f"be one of {', '.join(PAIR_STRATEGIES)} or a callable",
                    _did_you_mean(self.pair_strategy, PAIR_STRATEGIES)
                    or "use e.g. best_worst (the paper's rule)",
                ),
                (
                    self.rejected_from == "policy"
                    or self.pair_strategy in ("best_worst", "length_aware"),
                    "pair_strategy",
                    "be best_worst or length_aware with rejected_from (one pair per prompt: "
                    "the best policy candidate against the worst anchor candidate)",
                    "remove pair_strategy or rejected_from",
                ),
                (
                    self.judge_health is None
                    or self.judge_health.action == "stop"
                    or self.judge == "self",
                    "judge_health.action",
                    "be stop with an external judge (freeze switches the self judge's weights)",
                    "use action: stop, or judge: self",
                ),
            ],
        )
        js.validate("judge_settings")  # its other keys (mode, batch_size, ...)
        check_generation_override(self.generation, "generation")
        if self.judge_health is not None:
            self.judge_health.validate()


@dataclass
class MetaJudgeConfig(JudgeConfig):
    """:class:`JudgeConfig` of the meta-judge: one verdict per order by default (both
    orders of every comparison are always judged)."""

    num_samples: int = field(
        default=1, metadata={"help": "verdicts sampled per order of each comparison"}
    )


@_refuse_renamed
@dataclass
class MetaRewardStage(PreferenceStage):
    """One Meta-Rewarding iteration (Wu et al. 2024): a self-rewarding iteration whose DPO
    data also holds judge pairs. The policy judges each candidate ``judge_settings.
    num_samples`` times (actor pairs as in ``self_reward_dpo``), then as meta-judge compares
    every two judgements of the response whose scores vary most, in both orders; the
    Bradley–Terry strongest vs weakest judgement is a pair whose prompt is the judge prompt.
    """

    kind: Literal["meta_reward_dpo"] = "meta_reward_dpo"
    meta_judge_settings: MetaJudgeConfig | JudgeConfig = field(
        default_factory=MetaJudgeConfig,
        metadata={"help": "how the meta-judge samples its verdicts (num_samples per order, mode)"},
    )
    meta_template: MetaJudgeTemplate | None = field(
        default=None,
        metadata={"help": "the meta-judge prompt and verdict (MetaJudgeTemplate; null: paper's)"},
    )
    judge_pairs_per_prompt: int = field(
        default=1, metadata={"help": "responses meta-judged per prompt (highest score variance)"}
    )
    max_judge_pair_share: float = field(
        default=0.15,
        metadata={"help": "judge pairs' share of the stage's DPO pairs at most (excess dropped)"},
    )
    balance_judge_scores: bool = field(
        default=True,
        metadata={"help": "spread the judge pairs kept evenly over the chosen judgements' scores"},
    )
    max_judgement_chars: int | None = field(
        default=None,
        metadata={"help": "judgements longer than this are not meta-judged (null: no limit)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.meta_judge_settings, dict):
            self.meta_judge_settings = from_dict(
                MetaJudgeConfig, self.meta_judge_settings, path="meta_judge_settings"
            )
        if isinstance(self.meta_template, dict):
            self.meta_template = from_dict(
                MetaJudgeTemplate, self.meta_template, path="meta_template"
            )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        super().validate()
        js, ms = self.judge_settings, self.meta_judge_settings
        _check(
            self,
            [
                (
                    self.judge == "self",
                    "judge",
                    "be 'self' (the meta-judge is the policy, judging its own judgements)",
                    "remove the key (an external judge belongs in an external_reward_dpo stage)",
                ),
                (
                    js.mode == "mean",
                    "judge_settings.mode",
                    "be 'mean' (the meta-judge compares several written judgements)",
                    "remove the key",
                ),
                (
                    js.num_samples >= 2,
                    "judge_settings.num_samples",
                    "be at least 2 (the meta-judge compares judgements of one response)",
                    "use e.g. 3 or more",
                ),
                (
                    js.temperature > 0,
                    "judge_settings.temperature",
                    "be above 0 (greedy judgements are all the same: nothing to compare)",
                    "use e.g. 0.7",
                ),
                (
                    self.judge_pairs_per_prompt >= 1,
                    "judge_pairs_per_prompt",
                    "be at least 1",
                    "the paper meta-judges 1 response per prompt",
                ),
                (
                    0 <= self.max_judge_pair_share < 1,
                    "max_judge_pair_share",
                    "lie in [0, 1)",
                    "use e.g. 0.15 (more made the judge give every response the top score)",
                ),
                (
                    self.max_judgement_chars is None or self.max_judgement_chars >= 1,
                    "max_judgement_chars",
                    "be at least 1 (or null: no limit)",
                    "use e.g. 2000",
                ),
                (ms.num_samples >= 1, "meta_judge_settings.num_samples", "be at least 1", "use 1"),
            ],
        )
        ms.validate("meta_judge_settings")


Stage = (
    SFTStage
    | SPINStage
    | PromptGenerationStage
    | PreferenceStage
    | MetaRewardStage
    | EFTBuildStage
    | HeadToHeadStage
)
# settings that cannot change a stage's records or model: not part of its fingerprint
_FREE_STAGE_KEYS = ("min_parse_rate",)
_FREE_TRAINER_KEYS = ("progress", "log_every", "project_name")
# a preference stage's judge settings (and a meta-reward stage's meta-judge settings): when
# only these change in an unfinished stage, its candidates are judged again instead of refused
_JUDGE_KEYS = (
    "judge",
    "judge_settings",
    "judge_model",
    "meta_judge_settings",
    "meta_template",
    "judge_pairs_per_prompt",
    "max_judgement_chars",
)
STAGE_TYPES: dict[str, type] = {
    "sft": SFTStage,
    "spin": SPINStage,
    "prompt_generation": PromptGenerationStage,
    "self_reward_dpo": PreferenceStage,
    "external_reward_dpo": PreferenceStage,
    "meta_reward_dpo": MetaRewardStage,
    "eft_build": EFTBuildStage,
    "head_to_head": HeadToHeadStage,
}
STAGE_TRAINERS = {
    SFTStage: SFTTrainer,
    SPINStage: SPINTrainer,
    PreferenceStage: DPOTrainer,
    MetaRewardStage: DPOTrainer,
}
#: the stages that sample the policy (and take a generation: override)
SAMPLING_STAGES = (
    SPINStage,
    PromptGenerationStage,
    PreferenceStage,
    EFTBuildStage,
    HeadToHeadStage,
    MetaRewardStage,
)


def _plain_trainer(stage: Any) -> None:
    """``trainer=SFTConfig(batch_size=8)`` stored as ``{"batch_size": 8}``: the plain dict of
    the config's non-default fields (what fingerprints and config.yaml hold)."""
    config = stage.trainer
    if not isinstance(config, TrainingConfig):
        return
    expected = STAGE_TRAINERS[type(stage)].config_class
    if type(config) is not expected:
        raise ConfigError(
            f"{type(stage).__name__}: trainer must be {expected.__name__}(...) or a dict of "
            f"its fields, got {type(config).__name__}(...); the stage's trainer is "
            f"{STAGE_TRAINERS[type(stage)].__name__}"
        )
    defaults = expected()
    stage.trainer = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(defaults, f.name)
    }


def _stage_slug(stage: Stage) -> str:
    return stage.kind.replace("_", "-")


def check_trainer_kwargs(stage: Stage) -> None:
    """Check a stage's values (its ``validate()``) and its trainer keyword arguments (names,
    types and ranges, against the trainer's config) before any work starts.

    Raises :class:`ConfigError` naming the key, the problem and the fix.
    """
    stage.validate()
    trainer_cls = STAGE_TRAINERS.get(type(stage))
    kwargs = getattr(stage, "trainer", {})
    if trainer_cls is None or not kwargs:
        return
    build_config(trainer_cls, kwargs, "trainer")
