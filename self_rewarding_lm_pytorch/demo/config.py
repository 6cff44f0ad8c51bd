"""The demo's settings: :class:`DemoConfig` (every size and setting of a run, with
its ``--quick`` variant), the demo judge's ``RewardConfig``, the seeded random judge of the
lower-bound arm, and the error for a run directory that cannot be used."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import RewardConfig
from ..judge import ScoreRange
from . import task
from .model import DemoModelConfig

__all__ = [
    "DemoConfig",
    "DemoSetupError",
    "IterationConfig",
    "RandomJudge",
    "demo_reward_config",
    "quick_config",
]


@dataclass(frozen=True)
class IterationConfig:
    """DPO settings of one preference iteration (feasibility note, round 2: beta ~1,
    lr ~1e-4, ~2 epochs, NLL on the chosen response, EFT replay); ``pair_margin``: with the
    self judge, a pair is kept only when the chosen's score exceeds the rejected's by more
    than this (a filter for the noise of a few sampled judgements; the oracle and random
    controls keep every best/worst pair)."""

    learning_rate: float = 1e-4
    end_learning_rate: float = 1e-5
    num_epochs: int = 2
    beta: float = 1.0
    nll_weight: float = 1.0
    replay_weight: float = 1.0
    batch_size: int = 32
    pair_margin: float = 0.0


@dataclass(frozen=True)
class DemoConfig:
    """Every size and setting of a demo run (the defaults fit 10 minutes on 2 cores)."""

    model: DemoModelConfig = field(default_factory=DemoModelConfig)
    task_config: task.TaskConfig = field(default_factory=task.TaskConfig)
    ift_noise: task.IFTNoise = field(default_factory=task.IFTNoise)
    n_ift: int = 4000
    n_eft: int = 4000
    sft_steps: int = 1000
    sft_batch_size: int = 64
    sft_learning_rate: float = 2e-3
    sft_end_learning_rate: float = 2e-4
    sft_warmup_steps: int = 50
    # length-grouped batches make SFT steps 1.6x faster but, with IFT and EFT then in
    # separate batches, the judge failed to learn (docs/demo.md): off by default
    group_by_length: bool = False
    # the rows longer than any judge sequence (most meta-judge examples) are batched apart
    # (``length_buckets``), so they no longer set the padded length of nearly every batch;
    # IFT and EFT rows stay mixed (docs/demo.md)
    bucket_long_rows: bool = True
    iterations: tuple[IterationConfig, ...] = (
        IterationConfig(pair_margin=1.0),
        # iteration 2 at 0.3x the learning rate: it holds iteration 1's gains where the
        # full rate reward-hacks the judge's blind spots (docs/demo.md)
        IterationConfig(pair_margin=1.0, learning_rate=3e-5, end_learning_rate=3e-6),
    )
    pairs_per_iteration: int = 650
    prompt_pool: int = 3000
    chunk_size: int = 50
    num_candidates: int = 8
    candidate_temperature: float = 1.0
    max_new_tokens: int = 16
    judge_samples: int = 3
    judge_mode: str = "mean"
    judge_temperature: float = 0.7
    judge_top_p: float = 0.9
    judge_max_new_tokens: int = 20
    judge_letters: bool = True
    # meta-judge examples (a response and two judgements -> which is right) mixed into
    # M1's SFT and the EFT replay, so that the meta arm's M1 can meta-judge; 0 = off (the
    # skill is still measured on every model). 1,000 gives meta-judge accuracy 0.63-0.68
    # (0 without) at about 1.4x the SFT time (docs/demo.md)
    n_meta_eft: int = 1000
    n_meta_eval: int = 200
    # the meta arm: judge pairs at most this share of an iteration's DPO pairs (NeMo-Aligner
    # saw the judge collapse above ~15%)
    meta_judge_pair_share: float = 0.15
    # the health arm: prompts its judge is measured on, and the drop that freezes it
    n_health_prompts: int = 100
    health_max_drop: float = 0.03
    n_eval_prompts: int = 1000
    n_judge_eval_prompts: int = 200
    judge_eval_responses: int = 4
    n_headroom_prompts: int = 300

    def __post_init__(self) -> None:
        positive = (
            "n_ift",
            "n_eft",
            "sft_steps",
            "sft_batch_size",
            "pairs_per_iteration",
            "prompt_pool",
            "chunk_size",
            "max_new_tokens",
            "judge_samples",
            "judge_max_new_tokens",
            "n_eval_prompts",
            "n_health_prompts",
            "n_judge_eval_prompts",
            "judge_eval_responses",
            "n_headroom_prompts",
            "n_meta_eval",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be a positive int, got {value!r}")
        n = self.n_meta_eft
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"DemoConfig.n_meta_eft must be an int >= 0 (0 = off), got {n!r}")
        if not 0 <= self.meta_judge_pair_share < 1:
            raise ValueError(
                "DemoConfig.meta_judge_pair_share must lie in [0, 1), got "
                f"{self.meta_judge_pair_share!r}"
            )
        if not 0 <= self.health_max_drop <= 1:
            raise ValueError(
                f"DemoConfig.health_max_drop must lie in [0, 1], got {self.health_max_drop!r}"
            )
        if self.num_candidates < 2:
            raise ValueError(
                f"DemoConfig.num_candidates must be >= 2 to form a pair, got {self.num_candidates}"
            )
        if self.prompt_pool < self.pairs_per_iteration:
            raise ValueError(
                f"DemoConfig.prompt_pool ({self.prompt_pool}) must be at least "
                f"pairs_per_iteration ({self.pairs_per_iteration}): each prompt gives one pair"
            )
        if self.judge_mode not in ("mean", "expected"):
            raise ValueError(f"judge_mode must be 'mean' or 'expected', got {self.judge_mode!r}")
        if self.group_by_length and self.bucket_long_rows:
            raise ValueError(
                "DemoConfig: group_by_length and bucket_long_rows are both set; keep one"
            )
        if not self.iterations:
            raise ValueError("DemoConfig.iterations is empty; give at least one IterationConfig")

    def length_buckets(self) -> list[int] | None:
        """The trainers' ``length_buckets``: one boundary at the longest judge sequence
        (prompt, response and judgement) when ``bucket_long_rows``, else none."""
        if not self.bucket_long_rows:
            return None
        return [task.max_sequence_length(self.task_config, self.max_new_tokens)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every setting."""
        return json.loads(json.dumps(asdict(self)))


def quick_config() -> DemoConfig:
    """``--quick``: a smaller model and tiny data sets, for smoke tests (it need not show
    the effect); about 10 seconds on an idle machine (about 12 CPU-seconds)."""
    return DemoConfig(
        model=DemoModelConfig(dim=64, depth=2, heads=2, dim_head=32),
        n_ift=600,
        n_eft=600,
        sft_steps=150,
        sft_batch_size=32,
        sft_learning_rate=3e-3,
        sft_end_learning_rate=3e-4,
        sft_warmup_steps=10,
        iterations=(
            IterationConfig(num_epochs=1, batch_size=16),
            IterationConfig(num_epochs=1, batch_size=16),
        ),
        pairs_per_iteration=24,
        prompt_pool=400,
        chunk_size=16,
        num_candidates=4,
        judge_samples=2,
        n_eval_prompts=60,
        n_judge_eval_prompts=15,
        judge_eval_responses=4,
        n_headroom_prompts=30,
        n_meta_eft=150,
        n_meta_eval=20,
        n_health_prompts=12,
    )


def demo_reward_config() -> RewardConfig:
    """The demo judge: ``rate <prompt><response>|`` -> ``yyny Score: N`` (scores 0..5)."""
    return RewardConfig(
        **task.reward_config_kwargs(),
        validate_reward=ScoreRange(0, task.MAX_SCORE),
        score_values=tuple(range(task.MAX_SCORE + 1)),
    )


class RandomJudge:
    """A seeded random judge: ``score(prompt, response)`` is a uniform number in [0, 5]
    drawn from a hash of (seed, salt, prompt, response), so it is reproducible, independent
    of call order (resume-safe), and carries no information about quality."""

    def __init__(self, seed: int, salt: str = "") -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.salt = salt

    def __call__(self, prompt: str, response: str) -> float:
        key = f"{self.seed}\x00{self.salt}\x00{prompt}\x00{response}".encode()
        u = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") / 2.0**64
        return task.MAX_SCORE * u


class DemoSetupError(ValueError):
    """The run directory cannot be used as asked (other settings, not a demo run)."""
