"""The configs of the stages that judge and train nothing: the EFT build (the policy judges
human-ranked responses, paper section 3.1) and the head-to-head evaluation (M_t vs a
baseline, the paper's win rates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..config import from_dict
from ..generation.selection import check_generation_override
from ..judge import JudgeConfig
from .stage_rules import _check, _check_types, _sampling_rules

__all__ = ["EFTBuildStage", "EFTJudgeConfig", "HeadToHeadStage"]


@dataclass
class EFTJudgeConfig(JudgeConfig):
    """:class:`JudgeConfig` with one sampled judgement per response by default: the paper
    trains on single judgements (one chain of thought + score each), not on averages."""

    num_samples: int = field(
        default=1,
        metadata={"help": "judgement sets sampled per row, each checked against the humans"},
    )


@dataclass
class EFTBuildStage:
    """The paper's EFT data (§3.1): the policy judges human-ranked responses with the run's
    reward template; the judgements whose scores order the responses as the humans did are
    kept, balanced over scores and split by prompt. Trains nothing.

    ``inputs`` names a dataset of rows ``{prompt, responses, human_ranks}`` (``srlm prepare
    oasst``'s ``eft_inputs.jsonl``); a later SFT stage reads the result as
    ``datasets: [..., generated_eft]``.
    """

    kind: Literal["eft_build"] = "eft_build"
    inputs: str = field(default="eft_inputs", metadata={"help": "dataset of human-ranked rows"})
    judge_settings: EFTJudgeConfig = field(
        default_factory=EFTJudgeConfig,
        metadata={"help": "how the policy samples its judgements (num_samples sets per row)"},
    )
    agreement: Literal["all_pairs", "best_worst"] = field(
        default="all_pairs",
        metadata={"help": "which differently-ranked pairs the scores must order as the humans"},
    )
    balance: bool = field(
        default=True, metadata={"help": "downsample every score to the rarest one's count"}
    )
    heldout_fraction: float = field(
        default=0.25, metadata={"help": "share of prompts (seeded) written to eft_heldout.jsonl"}
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "training examples at most (seeded choice); null: all"}
    )
    chunk_size: int = field(default=16, metadata={"help": "rows judged (and saved) together"})
    generation: dict[str, Any] = field(  # merged over the run's generation: section
        default_factory=dict,
        metadata={"help": "this stage's backend keys, over the run's (e.g. {backend: vllm})"},
    )

    #: the self judge writes the judgements (the runner's judge lookup reads this)
    judge: ClassVar[str] = "self"

    def __post_init__(self) -> None:
        if isinstance(self.judge_settings, dict):  # judge_settings={"temperature": 0.7}
            self.judge_settings = from_dict(
                EFTJudgeConfig, self.judge_settings, path="judge_settings"
            )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        _check_types(self)
        js = self.judge_settings
        _check(
            self,
            [
                (
                    0 <= self.heldout_fraction < 1,
                    "heldout_fraction",
                    "lie in [0, 1)",
                    "use e.g. 0.25 (the paper holds out 531 of 2,161)",
                ),
                (
                    self.max_examples is None or self.max_examples >= 1,
                    "max_examples",
                    "be at least 1 (or null: every kept example)",
                    "use e.g. 1630 (the paper's count)",
                ),
                (self.chunk_size >= 1, "chunk_size", "be at least 1", "use e.g. 16"),
                (js.num_samples >= 1, "judge_settings.num_samples", "be at least 1", "use 1"),
                (
                    js.mode == "mean",
                    "judge_settings.mode",
                    "be 'mean' (each judgement is a written text with its own score)",
                    "remove the key",
                ),
                *_sampling_rules(
                    js.temperature, js.top_p, "judge_settings.temperature", "judge_settings.top_p"
                ),
            ],
        )
        js.validate("judge_settings")
        check_generation_override(self.generation, "generation")


@dataclass
class HeadToHeadStage:
    """The policy's greedy responses to held-out prompts (``outputs.jsonl``), judged
    against a baseline's: the win rate of the paper's head-to-head evaluations (M_t vs M1).
    Trains nothing.

    ``baseline="first"`` compares with the outputs of the run's first ``head_to_head``
    stage (that stage itself only records its outputs); an earlier head_to_head stage's
    name (``"05-head-to-head"``) or a dataset of rows ``{prompt, response}`` names another
    baseline. ``judge="self"`` is the current policy judging itself against the baseline
    with the run's reward template: biased towards its own outputs (prefer an external
    judge from ``judges:``).
    """

    kind: Literal["head_to_head"] = "head_to_head"
    prompts: str = field(
        default="heldout", metadata={"help": "dataset of evaluation prompts (held out)"}
    )
    max_prompts: int | None = field(
        default=None, metadata={"help": "the first N prompts only; null: all"}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per response at most"})
    temperature: float = field(
        default=0.0, metadata={"help": "response sampling temperature (0: greedy)"}
    )
    top_p: float = field(default=1.0, metadata={"help": "response nucleus top-p (1: off)"})
    baseline: str = field(
        default="first",
        metadata={"help": "'first', an earlier head_to_head stage's name, or a dataset"},
    )
    judge: str = field(
        default="self",
        metadata={"help": "a judge from judges:, or 'self' (the policy: biased to itself)"},
    )
    pairwise: bool = field(
        default=False,
        metadata={"help": "an LLM judge compares both orders instead of scoring each"},
    )
    judge_settings: JudgeConfig = field(
        default_factory=JudgeConfig,
        metadata={"help": "how the self judge samples its judgements"},
    )
    bootstrap: int = field(default=0, metadata={"help": "bootstrap resamples (0: off)"})
    chunk_size: int = field(default=16, metadata={"help": "prompts sampled (and saved) together"})
    generation: dict[str, Any] = field(  # merged over the run's generation: section
        default_factory=dict,
        metadata={"help": "this stage's backend keys, over the run's (e.g. {backend: vllm})"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.judge_settings, dict):  # judge_settings={"num_samples": 1}
            self.judge_settings = from_dict(JudgeConfig, self.judge_settings, path="judge_settings")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        _check_types(self)
        _check(
            self,
            [
                (
                    self.max_prompts is None or self.max_prompts >= 1,
                    "max_prompts",
                    "be at least 1 (or null: every prompt)",
                    "use e.g. 256",
                ),
                (self.max_new_tokens >= 1, "max_new_tokens", "be at least 1", "use e.g. 512"),
                *_sampling_rules(self.temperature, self.top_p, "temperature", "top_p"),
                (bool(self.baseline), "baseline", "name a baseline", "use 'first'"),
                (self.bootstrap >= 0, "bootstrap", "be >= 0", "use e.g. 1000, or 0 (off)"),
                (self.chunk_size >= 1, "chunk_size", "be at least 1", "use e.g. 16"),
            ],
        )
        self.judge_settings.validate("judge_settings")
        check_generation_override(self.generation, "generation")
