"""The self-rewarding training pipeline: ordered stages, a run directory, resume.

Stages (each a config dataclass) run in the order listed:

* :class:`SFTStage` — supervised fine-tuning on IFT (+ EFT) data; gives M1.
* :class:`SPINStage` — self-play fine-tuning cycles (Chen et al., 2024).
* :class:`PromptGenerationStage` — new prompts by few-shot prompting (Yuan et al., 2024, §2.2).
* :class:`PreferenceStage` — one DPO iteration on pairs built from N sampled candidates
  judged by the model itself (``judge="self"``, the paper's §2.3) or by an external judge
  (OAIF style); gives M(t+1).

The pipeline owns ordering, the run directory, checkpoints and resume; trainers own the
training loops and ``losses.py`` the math. Every generated record is appended to JSONL as
it is made, and ``state.json`` (written atomically) says which stages finished, so running
the same command again resumes where it stopped without losing or duplicating a record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError, to_dict
from .data import PreferenceExample, SFTExample, materialize, to_sft_example
from .generation import GenerationConfig, generate_text, response_budget
from .judge import DEFAULT_REWARD_CONFIG, CallableJudge, LLMJudge, RewardConfig
from .models import CausalLM, Tokenizer, encode_response, wrap_model, wrap_tokenizer
from .pairs import select_pairs
from .prompts import generate_prompts
from .store import (
    JsonlStore,
    RunDirError,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    clear_run_dir,
    ensure_run_dir,
    read_jsonl,
)
from .trainers import DPOTrainer, SFTTrainer, SPINTrainer, build_config
from .trainers.base import load_checkpoint, save_checkpoint

__all__ = [
    "JudgeParseError",
    "NotEnoughPairsError",
    "PreferenceStage",
    "PromptGenerationStage",
    "SFTStage",
    "SPINStage",
    "SelfRewardingTrainer",
    "Stage",
]

log = logging.getLogger(__name__)


# ====================================================================== stage configs


@dataclass
class SFTStage:
    """Supervised fine-tuning on the named datasets (concatenated), e.g. ``["sft", "eft"]``."""

    kind: Literal["sft"] = "sft"
    datasets: list[str] = field(default_factory=lambda: ["sft"])
    trainer: dict[str, Any] = field(default_factory=dict)  # SFTTrainer keyword arguments

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

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        _check_types(self)
        _check(
            self,
            [(self.cycles >= 1, "cycles", "be at least 1", "set 1 or more, or remove the stage")],
        )


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

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        _check_types(self)
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
    judge_samples: int = 3  # paper: 3 judge samples, averaged
    judge_mode: Literal["mean", "expected"] = "mean"
    judge_temperature: float = 0.7
    judge_top_p: float = 0.9
    judge_max_new_tokens: int = 256
    judge_on_too_long: Literal["error", "truncate_response", "truncate_left"] = "error"
    pair_strategy: Any = "best_worst"  # name in pairs.PAIR_STRATEGIES, or a callable
    pair_margin: float = 0.0
    length_tolerance: float = 0.0
    chunk_size: int = 16  # prompts generated + judged (and saved) together
    max_prompts: int | None = None  # bound on prompts tried; default: every prompt once
    min_parse_rate: float = 0.2  # stop with an explanation when the judge parses less
    replay: str | None = None  # SFT dataset replayed as auxiliary loss in every DPO step
    trainer: dict[str, Any] = field(default_factory=dict)  # DPOTrainer keyword arguments

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value is of the wrong type or range."""
        from .pairs import PAIR_STRATEGIES

        _check_types(self)
        n, t = self.num_candidates, self.temperature
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
                (self.judge_samples >= 1, "judge_samples", at_least_1, "the paper averages 3"),
                *_sampling_rules(
                    self.judge_temperature, self.judge_top_p, "judge_temperature", "judge_top_p"
                ),
                (
                    self.judge_max_new_tokens >= 1,
                    "judge_max_new_tokens",
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
                    "use e.g. best_worst (the paper's rule)",
                ),
            ],
        )


Stage = SFTStage | SPINStage | PromptGenerationStage | PreferenceStage
# settings that cannot change a stage's records or model: not part of its fingerprint
_FREE_STAGE_KEYS = ("min_parse_rate",)
_FREE_TRAINER_KEYS = ("progress", "log_every", "project_name")
# a preference stage's judge settings: when only these change in an unfinished stage,
# its candidates are judged again instead of refused
_JUDGE_KEYS = (
    "judge",
    "judge_samples",
    "judge_mode",
    "judge_temperature",
    "judge_top_p",
    "judge_max_new_tokens",
    "judge_on_too_long",
)
STAGE_TYPES: dict[str, type] = {
    "sft": SFTStage,
    "spin": SPINStage,
    "prompt_generation": PromptGenerationStage,
    "self_reward_dpo": PreferenceStage,
    "external_reward_dpo": PreferenceStage,
}
STAGE_TRAINERS = {SFTStage: SFTTrainer, SPINStage: SPINTrainer, PreferenceStage: DPOTrainer}


def _stage_slug(stage: Stage) -> str:
    return stage.kind.replace("_", "-")


def _check(stage: Any, rules: list[tuple[bool, str, str, str]]) -> None:
    """``(ok, key, rule, fix)``: the first rule that fails raises, naming key and value."""
    for ok, key, rule, fix in rules:
        if not ok:
            raise ConfigError(f"{key} must {rule}, got {getattr(stage, key)!r}; {fix}")


def _sampling_rules(temperature: float, top_p: float, t_key: str, p_key: str) -> list:
    return [
        (_non_negative(temperature), t_key, "be a finite number >= 0 (0 = greedy)", "use e.g. 0.7"),
        (0 < top_p <= 1, p_key, "lie in (0, 1] (1 disables it)", "use e.g. 0.9"),
    ]


def _non_negative(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _check_types(stage: Any) -> None:
    """Each field of a stage config against its annotation (the rules of the YAML loader)."""
    from .config import _convert

    hints = typing.get_type_hints(type(stage))
    for f in dataclasses.fields(stage):
        if f.name == "pair_strategy":  # a name or a callable: checked by validate()
            continue
        _convert(getattr(stage, f.name), hints[f.name], f.name)


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


# ====================================================================== errors

#: A judge whose scores tie on every one of this many judged prompts (and no pair yet)
#: stops the stage: it gives no preference signal.
MIN_TIED_PROMPTS = 16


class JudgeParseError(RuntimeError):
    """The judge's outputs could not be parsed often enough to build preference pairs."""


class NotEnoughPairsError(RuntimeError):
    """The prompts ran out before the requested number of preference pairs was built."""


def _parse_failure_message(
    name: str, stage: PreferenceStage, parse_rate: float, samples: list[str], reasons: list
) -> str:
    shown = "\n".join(f"  [{i + 1}] {s[:300]!r}" for i, s in enumerate(samples[:3]))
    common = Counter(r for r in reasons if r).most_common(1)
    why = f" The most common failure: {common[0][0]} ({common[0][1]} outputs)." if common else ""
    if stage.judge == "self":
        fixes = (
            "fine-tune the model on EFT (judge) examples first (an SFT stage with an 'eft' "
            "dataset), give a RewardConfig whose template/regex matches what the model writes, "
            "or use an external judge (judge='<name>' with judges={...})"
        )
    else:
        fixes = (
            f"check the external judge {stage.judge!r}: it must return a score for these "
            "responses (None only where it cannot score one); an LLM judge needs a "
            "RewardConfig whose template/regex matches what its model writes"
        )
    return (
        f"stage {name}: the judge produced a parsable score for only {parse_rate:.1%} of its "
        f"outputs (minimum min_parse_rate={stage.min_parse_rate:.0%}), so preference pairs "
        f"cannot be built.{why} Three of its outputs:\n{shown}\nFixes: {fixes}. After a "
        "change of the judge alone (reward_config, judge settings), rerunning in the same "
        "run folder sets these judgements aside and judges the candidates again; other "
        "changes need --overwrite (overwrite=True) or another --out."
    )


# ====================================================================== helpers


def _seed_for(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:15], 16)


def _as_prompt_list(dataset: Any, name: str) -> list[str]:
    prompts = []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, dict):
            item = item.get("prompt", item.get("instruction"))
        if not isinstance(item, str):
            raise TypeError(
                f"prompt dataset {name!r} item {i} is {type(item).__name__}; prompts must be "
                "strings (or dicts with a 'prompt' key)"
            )
        if not item.strip():
            raise ValueError(
                f"prompt dataset {name!r} item {i} is {'empty' if not item else 'blank'} "
                f"({item!r}); every prompt needs text to respond to: remove the item or fill "
                "it in"
            )
        prompts.append(item)
    if not prompts:
        raise ValueError(f"prompt dataset {name!r} is empty; give at least one prompt")
    return prompts


def tokenize_sft_item(item: Any, tokenizer: Tokenizer) -> SFTExample:
    """An SFT item as token ids: text dicts ``{"prompt", "response"}`` are tokenized
    (prompt through the chat format, EOS appended to the response); token items go
    through :func:`to_sft_example`."""
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        if not isinstance(item.get("response"), str):
            raise TypeError("a text SFT item needs string 'prompt' and 'response' fields")
        prompt_ids = tokenizer.encode(tokenizer.format_prompt(item["prompt"]))
        response_ids = encode_response(tokenizer, item["response"])
        if tokenizer.eos_id is not None:
            response_ids = response_ids + [tokenizer.eos_id]
        return SFTExample(prompt_ids + response_ids, len(prompt_ids))
    return to_sft_example(item, pad_id=getattr(tokenizer, "pad_id", None))


def preference_example(
    prompt: str, chosen: str, rejected: str, tokenizer: Tokenizer
) -> PreferenceExample:
    """Tokenize one (prompt, chosen, rejected) text triple; EOS ends both responses."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return PreferenceExample(
        prompt_ids=tokenizer.encode(tokenizer.format_prompt(prompt)),
        chosen_ids=encode_response(tokenizer, chosen) + eos,
        rejected_ids=encode_response(tokenizer, rejected) + eos,
    )


# ====================================================================== the trainer


class SelfRewardingTrainer:
    """Run SFT, SPIN, prompt generation and self-/external-reward DPO stages in order.

    Either give ``stages`` explicitly, or use the seed's keyword API, which builds the
    paper's default order: SFT on ``train_sft_dataset``, ``num_spin_cycles`` SPIN cycles,
    then ``self_reward_num_iterations`` self-rewarding DPO iterations with
    ``num_preference_pairs[i]`` pairs each.

    Datasets are named: ``train_sft_dataset`` is ``"sft"``, ``prompt_dataset`` is
    ``"prompts"``, and ``datasets={"eft": ...}`` adds more. SFT items are the seed's
    ``(token_ids, prompt_len)`` tuples or text dicts ``{"prompt", "response"}``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        tokenizer_encode: Callable[[str], Any] | None = None,
        tokenizer_decode: Callable[[Any], str] | None = None,
        eos_id: int | None = None,
        stages: Sequence[Stage] | None = None,
        train_sft_dataset: Any = None,
        valid_sft_dataset: Any = None,
        prompt_dataset: Any = None,
        datasets: dict[str, Any] | None = None,
        judges: dict[str, Any] | None = None,
        models: dict[str, nn.Module] | None = None,
        reward_prompt_config: RewardConfig | None = None,
        oracle: Callable[[str, str], float] | None = None,
        # the seed's keyword API
        initial_sft: bool = True,
        spin: bool = False,
        num_spin_cycles: int = 0,
        self_reward_num_iterations: int | None = None,
        num_preference_pairs: int | Sequence[int] = 1000,
        num_candidate_responses: int = 4,
        preference_max_seq_len: int = 1024,
        generate_reward_max_seq_len: int = 256,
        dpo_beta: float = 0.1,
        pad_id: int | None = None,
        accelerate_kwargs: dict | None = None,
        sft_trainer_kwargs: dict | None = None,
        spin_trainer_kwargs: dict | None = None,
        dpo_trainer_kwargs: dict | None = None,
        early_stopper_eval_module: Callable[[nn.Module], float] | None = None,
        checkpoints_folder: str | Path = "./checkpoints",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.lm: CausalLM = wrap_model(model)
        self.model = self.lm.module
        self.tokenizer = wrap_tokenizer(
            tokenizer,
            encode=tokenizer_encode,
            decode=tokenizer_decode,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        self.pad_id = pad_id
        self.reward_config = reward_prompt_config or DEFAULT_REWARD_CONFIG
        self.oracle = oracle
        self.run_dir = Path(checkpoints_folder)
        self.seed = seed
        self.progress = progress
        self.early_stopper_eval_module = early_stopper_eval_module
        self.preference_max_seq_len = preference_max_seq_len
        self.accelerate_kwargs = dict(accelerate_kwargs or {})

        self.datasets: dict[str, Any] = {}
        if train_sft_dataset is not None:
            self.datasets["sft"] = train_sft_dataset
        if valid_sft_dataset is not None:
            self.datasets["valid_sft"] = valid_sft_dataset
        if prompt_dataset is not None:
            self.datasets["prompts"] = prompt_dataset
        self.datasets.update(datasets or {})
        self.judges = dict(judges or {})
        self.models = dict(models or {})
        # datasets read once (the seed's mock datasets make new items on every access)
        self._sft_cache: dict[str, list[SFTExample]] = {}
        self._prompt_cache: dict[str, list[str]] = {}
        self._budget_cache: dict[str, tuple[list[str], list[int]]] = {}
        self._preflight_done = False

        if stages is None:
            stages = self._seed_stages(
                initial_sft=initial_sft and train_sft_dataset is not None,
                num_spin_cycles=num_spin_cycles if (spin or num_spin_cycles) else 0,
                iterations=self_reward_num_iterations,
                num_preference_pairs=num_preference_pairs,
                num_candidates=num_candidate_responses,
                judge_max_new_tokens=generate_reward_max_seq_len,
                sft_kwargs=sft_trainer_kwargs or {},
                spin_kwargs=spin_trainer_kwargs or {},
                dpo_kwargs={"beta": dpo_beta, **(dpo_trainer_kwargs or {})},
            )
        self.stages: list[Stage] = list(stages)
        self._validate()
        samples = (SPINStage, PromptGenerationStage, PreferenceStage)
        if self.tokenizer.eos_id is None and any(isinstance(s, samples) for s in self.stages):
            warnings.warn(
                "the tokenizer has no EOS id, so sampled responses never end before "
                "max_new_tokens and the model is never taught to stop; pass eos_id=... (or a "
                "tokenizer with an eos token)",
                UserWarning,
                stacklevel=2,
            )
        self._accelerator = None
        self._lock = RunLock(self.run_dir)
        self._run_open = False
        self._state: dict = {"finished": []}
        self._model_identity: str | None = None

    # ------------------------------------------------------------------ set-up
    def _seed_stages(
        self,
        *,
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
                    judge_max_new_tokens=judge_max_new_tokens,
                    replay="eft" if "eft" in self.datasets else None,
                    trainer=dict(dpo_kwargs),
                )
            )
        return stages

    def _validate(self) -> None:
        if not self.stages:
            raise ValueError(
                "no stages to run: give stages=[...] or a train_sft_dataset / prompt_dataset"
            )
        for stage, name in zip(self.stages, self._plan()):
            try:
                check_trainer_kwargs(stage)
            except ConfigError as exc:
                raise ConfigError(f"stage {name}: {exc}") from exc
            if isinstance(stage, SFTStage):
                if not stage.datasets:
                    raise ConfigError(
                        f"stage {name}: datasets is empty; name the SFT data, e.g. ['sft']"
                    )
                for ds in stage.datasets:
                    self._need_dataset(ds, stage)
            elif isinstance(stage, SPINStage):
                self._need_dataset(stage.dataset, stage)
            elif isinstance(stage, PromptGenerationStage):
                self._need_dataset(stage.seed_dataset, stage)
                if stage.generator_model != "self" and stage.generator_model not in self.models:
                    raise ValueError(
                        f"prompt_generation uses model {stage.generator_model!r}, which is not "
                        f"in models= (known: {sorted(self.models)})"
                    )
            elif isinstance(stage, PreferenceStage):
                if stage.prompts != "generated":
                    self._need_dataset(stage.prompts, stage)
                if stage.replay is not None:
                    self._need_dataset(stage.replay, stage)
                if stage.judge != "self" and stage.judge not in self.judges:
                    raise ValueError(
                        f"{stage.kind} uses judge {stage.judge!r}, which is not in judges= "
                        f"(known: {sorted(self.judges)}); pass judges={{{stage.judge!r}: ...}}"
                    )
                if stage.kind == "self_reward_dpo" and stage.judge != "self":
                    raise ValueError(
                        "a self_reward_dpo stage judges with the model itself (judge='self'); "
                        "use kind='external_reward_dpo' for an external judge"
                    )
                if (
                    stage.judge == "self"
                    and stage.judge_samples > 1
                    and not stage.judge_temperature
                ):
                    warnings.warn(
                        f"stage {name}: judge_samples={stage.judge_samples} with "
                        "judge_temperature=0 judges each candidate greedily, so all "
                        f"{stage.judge_samples} judgements are the same and their mean is one "
                        "judgement; set judge_samples=1 (as fast, same scores) or "
                        "judge_temperature > 0 (the paper uses 0.7)",
                        UserWarning,
                        stacklevel=3,
                    )

    def _need_dataset(self, name: str, stage: Stage) -> None:
        if name not in self.datasets:
            raise ValueError(
                f"stage {stage.kind} needs dataset {name!r}, which was not given "
                f"(known datasets: {sorted(self.datasets)})"
            )
        if len(self.datasets[name]) == 0:
            raise ValueError(f"dataset {name!r} (used by stage {stage.kind}) is empty")

    def preflight(self) -> None:
        """Check what the stages need from the data, tokenizer and model before any runs.

        Every dataset is read and tokenized (SFT items, prompts: blank ones are refused,
        empty SFT responses warned about), every prompt of a preference stage must fit the
        model's context with the stage's ``max_new_tokens`` (and leave room for a response
        within ``preference_max_seq_len``), SPIN prompts must leave room for a response, and
        the self-judge's template must render. ``run()`` calls this first; ``srlm run
        --check`` runs it without training. The checks run once per trainer.
        """
        if self._preflight_done:
            return
        for stage, name in zip(self.stages, self._plan()):
            if isinstance(stage, SFTStage):
                for ds in stage.datasets:
                    self._sft_examples([ds], stage=name)
            elif isinstance(stage, SPINStage):
                limit = min(
                    stage.trainer.get("max_seq_len", self.preference_max_seq_len),
                    self.lm.max_seq_len or self.preference_max_seq_len,
                )
                for i, ex in enumerate(self._sft_examples([stage.dataset], stage=name)):
                    response_budget(
                        ex.prompt_len,
                        1,
                        limit,
                        cap=True,
                        where=f"stage {name}: dataset {stage.dataset!r} item {i}: its prompt",
                        context_name="max_seq_len (and the model's context)",
                        fix="shorten the prompt or raise the SPIN trainer's max_seq_len",
                    )
            elif isinstance(stage, PromptGenerationStage):
                self._prompts(stage.seed_dataset)
            elif isinstance(stage, PreferenceStage):
                if stage.prompts != "generated":
                    self._prompt_budgets(name, stage, self._prompts(stage.prompts), stage.prompts)
                if stage.replay is not None:
                    self._sft_examples([stage.replay], stage=name)
                if stage.judge == "self":
                    sample = (
                        self._prompts(stage.prompts)[0]
                        if stage.prompts != "generated"
                        else "an example prompt"
                    )
                    try:  # the judge's own settings, then its template on a real prompt
                        judge = self._judge_for(stage)
                    except (ValueError, TypeError) as exc:
                        raise type(exc)(f"stage {name}: the self judge: {exc}") from exc
                    try:
                        judge.config.render(sample, "an example response")
                    except Exception as exc:  # noqa: BLE001 - any template error, named
                        raise ValueError(
                            f"stage {name}: the judge template does not render ({exc}); fix "
                            "reward_config.prompt_template (variables: {{ prompt }}, "
                            "{{ response }})"
                        ) from exc
                else:
                    judge = self._judge_for(stage)
                if stage.prompts != "generated" and hasattr(judge, "check_prompts"):
                    judge.check_prompts(  # an LLM judge's prompt must fit its context
                        self._prompts(stage.prompts),
                        where=f"stage {name}, dataset {stage.prompts!r}: ",
                    )
        self._preflight_done = True

    def _prompts(self, name: str) -> list[str]:
        if name not in self._prompt_cache:
            self._prompt_cache[name] = _as_prompt_list(self.datasets[name], name)
        return self._prompt_cache[name]

    def _prompt_budgets(
        self, name: str, stage: PreferenceStage, prompts: list[str], dataset: str
    ) -> list[int]:
        """Each prompt's limit on new tokens: ``max_new_tokens`` must fit the model's context
        with the prompt; ``preference_max_seq_len`` (the DPO length bound) caps it. Kept
        per stage, so the pre-flight's pass is not repeated when the stage runs."""
        cached = self._budget_cache.get(name)
        if cached is not None and cached[0][: len(prompts)] == prompts:  # a prefix of those
            return cached[1][: len(prompts)]
        ctx, pref = self.lm.max_seq_len, self.preference_max_seq_len
        budgets = []
        for i, p in enumerate(prompts):
            n = len(self.tokenizer.encode(self.tokenizer.format_prompt(p)))
            where = f"stage {name}, dataset {dataset!r}: prompt {i}"
            budget = response_budget(
                n,
                stage.max_new_tokens,
                ctx,
                where=where,
                fix="shorten or remove the prompt, or lower the stage's max_new_tokens",
            )
            budgets.append(
                response_budget(
                    n,
                    budget,
                    pref,
                    cap=True,
                    where=where,
                    context_name="preference_max_seq_len",
                    fix="shorten or remove the prompt, or raise preference_max_seq_len",
                )
            )
        self._budget_cache[name] = (list(prompts), budgets)
        return budgets

    @property
    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(**self.accelerate_kwargs)
        return self._accelerator

    def _stage_dir(self, index: int, stage: Stage) -> Path:
        return self.run_dir / f"{index + 1:02d}-{_stage_slug(stage)}"

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    def _load_state(self) -> dict:
        if not self.state_path.exists():
            return {"finished": []}
        try:
            state = json.loads(self.state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RuntimeError(
                f"{self.state_path} is not valid JSON ({exc}); it records which stages "
                "finished. Restore it from a backup, or delete it to run every stage again "
                "(records already in the stage folders are reused)"
            ) from exc
        if not isinstance(state, dict) or not isinstance(state.get("finished"), list):
            raise RuntimeError(
                f"{self.state_path} does not hold a run state (no 'finished' list); delete it "
                "to run every stage again, or point checkpoints_folder elsewhere"
            )
        return state

    def _save_state(self, state: dict) -> None:
        if self.accelerator.is_main_process:
            atomic_write_json(self.state_path, state)

    def _plan(self) -> list[str]:
        return [f"{i + 1:02d}-{_stage_slug(s)}" for i, s in enumerate(self.stages)]

    # ------------------------------------------------------------------ fingerprints
    def _fingerprint(self, index: int, stage: Stage) -> dict[str, dict[str, Any]]:
        """What shapes the stage's output, as flat ``{key: value}`` maps: ``settings``
        (resolved stage settings with defaults, trainer arguments, seed, mixed precision,
        model, tokenizer and data identities) and, for preference stages, ``judge`` (the judge's settings,
        template and regex, or the external judge's identity)."""
        from .fingerprint import dataset_digest, flatten, identity, model_identity

        if self._model_identity is None:  # the model as given, before any checkpoint
            self._model_identity = model_identity(self.model)
        raw = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}
        trainer = {k: v for k, v in raw.pop("trainer", {}).items() if k not in _FREE_TRAINER_KEYS}
        for key in _FREE_STAGE_KEYS:
            raw.pop(key, None)
        judge = {k: raw.pop(k) for k in _JUDGE_KEYS if k in raw}
        if isinstance(stage, SFTStage):
            data = list(stage.datasets)
        elif isinstance(stage, SPINStage):
            data = [stage.dataset]
        elif isinstance(stage, PromptGenerationStage):
            data = [stage.seed_dataset]
            if stage.generator_model != "self":
                raw["generator_identity"] = self.models[stage.generator_model]
        else:
            data = [n for n in (stage.prompts, stage.replay) if n not in (None, "generated")]
            if stage.judge == "self":
                judge["reward_config"] = self.reward_config
            else:
                judge["judge_identity"] = self.judges[stage.judge]
            judge["oracle"] = self.oracle
            raw["early_stopper_eval_module"] = self.early_stopper_eval_module
        if isinstance(stage, (SPINStage, PreferenceStage)):
            raw["preference_max_seq_len"] = self.preference_max_seq_len
        settings = {
            **raw,
            "trainer": trainer,
            "seed": self.seed,
            "mixed_precision": str(self.accelerator.mixed_precision),  # as resolved
            "model": self._model_identity,
            "tokenizer": self.tokenizer,
            "data": {n: dataset_digest(self.datasets[n]) for n in data if n in self.datasets},
        }
        out = {"settings": flatten(identity(settings))}
        if judge:
            out["judge"] = flatten(identity(judge))
        return out

    def _check_fingerprints(self, state: dict) -> None:
        """Refuse changed settings of a stage that finished or has records; a stage whose
        only change is its judge, and that has not finished, has its judgements set aside
        and is judged again. Stages not yet started may change freely."""
        from .fingerprint import changed_keys

        stored = state.setdefault("fingerprints", {})
        finished = {r["stage"] for r in state["finished"]}
        for index, stage in enumerate(self.stages):
            name = state["plan"][index]
            new = self._fingerprint(index, stage)
            old = stored.get(name)
            stage_dir = self._stage_dir(index, stage)
            done = name in finished
            if old is not None and (done or _has_records(stage_dir)):
                groups = sorted(set(old) | set(new))
                diffs = {g: changed_keys(old.get(g, {}), new.get(g, {})) for g in groups}
                settings = [d for g in groups if g != "judge" for d in diffs[g]]
                judge = diffs.get("judge", [])
                if settings or (judge and done):
                    raise RunDirError(_changed_settings_message(name, done, settings + judge))
                if judge:
                    _set_aside_judgements(stage_dir, name, judge)
            stored[name] = new

    # ------------------------------------------------------------------ run directory
    def open_run_dir(self, *, overwrite: bool = False) -> None:
        """Take the run directory for this launch (done by :meth:`run`; call it first to
        write files of your own into the folder).

        One launch writes a run directory at a time: the main process takes a lock, and
        a second process is refused at once, naming the holder. ``overwrite`` empties a
        directory this library made (anything else is refused, nothing deleted). Stages
        that finished or have records must keep their settings (see ``state.json``);
        ``config.yaml`` is written once, when the run starts. Every rank gets the outcome,
        so a refusal stops all of them."""
        if self._run_open:
            return
        self.preflight()  # data, tokenizer and model checked before any file is touched
        acc = self.accelerator
        self._lock = RunLock(self.run_dir)
        error: Exception | None = None
        if acc.is_main_process:
            try:
                self._take_run_dir(overwrite)
            except Exception as exc:  # shared with the other ranks below, then raised
                self._lock.release()
                error = exc
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            outcome = [None if error is None else str(error)]
            broadcast_object_list(outcome, from_process=0)
            if error is None and outcome[0] is not None:
                raise RunDirError(outcome[0])
        if error is not None:
            raise error
        self._state = self._load_state()  # every rank reads what the main process wrote
        self._run_open = True

    def close_run_dir(self) -> None:
        """Give the run directory up (the lock); :meth:`run` does this when it ends."""
        self._lock.release()
        self._run_open = False

    def _take_run_dir(self, overwrite: bool) -> None:
        run_dir = self.run_dir
        if overwrite:  # refuse a folder that is not a run directory before writing to it
            clear_run_dir(run_dir, dry_run=True)
        ensure_run_dir(run_dir)
        self._lock.acquire()
        if overwrite:
            clear_run_dir(run_dir)
        state = self._load_state()
        plan = self._plan()
        if state.get("plan") not in (None, plan):
            raise RuntimeError(
                f"{run_dir} holds a run with stages {state['plan']}, but this run has "
                f"{plan}; use another checkpoints_folder / --out, or overwrite_checkpoints=True"
            )
        state["plan"] = plan
        self._check_fingerprints(state)
        atomic_write_json(self.state_path, state)  # first: it marks the folder as a run
        if not (run_dir / "config.yaml").exists():
            atomic_write_text(run_dir / "config.yaml", self._config_yaml())

    # ------------------------------------------------------------------ run
    def __call__(self, overwrite_checkpoints: bool = False) -> dict:
        return self.run(overwrite=overwrite_checkpoints)

    def run(self, *, overwrite: bool = False) -> dict:
        """Run every stage not yet finished; returns the run report (also written to disk)."""
        self.open_run_dir(overwrite=overwrite)
        try:
            return self._run_stages(self._state)
        finally:
            self.close_run_dir()

    def _run_stages(self, state: dict) -> dict:
        plan = self._plan()
        main = self.accelerator.is_main_process
        finished = {r["stage"]: r for r in state["finished"]}
        last_ckpt = None
        for name in plan:
            if name in finished and finished[name].get("checkpoint"):
                last_ckpt = finished[name]["checkpoint"]
        if last_ckpt is not None:
            load_checkpoint(self.model, self.run_dir / last_ckpt)

        for index, stage in enumerate(self.stages):
            name = plan[index]
            if name in finished:
                continue
            stage_dir = self._stage_dir(index, stage)
            if main:
                stage_dir.mkdir(parents=True, exist_ok=True)
                _set_aside_interrupted_metrics(stage_dir)
            self.accelerator.wait_for_everyone()
            log.info("stage %s", name)
            result = self._run_stage(index, stage, stage_dir)
            record = {"stage": name, **result}
            state["finished"].append(record)
            self._save_state(state)
            finished[name] = record
        report = self._write_report(state)
        return report

    def _run_stage(self, index: int, stage: Stage, stage_dir: Path) -> dict:
        if isinstance(stage, SFTStage):
            return self._run_sft(stage, stage_dir)
        if isinstance(stage, SPINStage):
            return self._run_spin(stage, stage_dir)
        if isinstance(stage, PromptGenerationStage):
            return self._run_prompt_generation(index, stage, stage_dir)
        return self._run_preference(index, stage, stage_dir)

    def _checkpoint(self, stage_dir: Path) -> str:
        path = stage_dir / "checkpoint"
        if self.accelerator.is_main_process:
            save_checkpoint(self.model, path)
            hf_tokenizer = getattr(self.tokenizer, "tokenizer", None)
            if hasattr(hf_tokenizer, "save_pretrained"):
                hf_tokenizer.save_pretrained(path)  # so from_pretrained(path) finds both
        self.accelerator.wait_for_everyone()
        return str(path.relative_to(self.run_dir))

    # ------------------------------------------------------------------ SFT / SPIN
    def _sft_examples(self, names: Sequence[str], *, stage: str | None = None) -> list[SFTExample]:
        examples: list[SFTExample] = []
        for name in names:
            if name not in self._sft_cache:
                items = materialize(
                    self.datasets[name],
                    lambda item: (item, tokenize_sft_item(item, self.tokenizer)),
                    name=name,
                )
                self._warn_empty_responses(name, stage, items)
                self._sft_cache[name] = [ex for _, ex in items]
            examples += self._sft_cache[name]
        return examples

    def _warn_empty_responses(self, name: str, stage: str | None, items: list) -> None:
        """Warn about SFT items whose response is empty: they teach only to stop (EOS)."""
        eos = self.tokenizer.eos_id
        empty = [
            i
            for i, (item, ex) in enumerate(items)
            if (
                isinstance(item, dict)
                and isinstance(item.get("response"), str)
                and not item["response"].strip()
            )
            or all(t == eos for t in ex.response_ids)
        ]
        if empty:
            where = f"stage {stage}: " if stage else ""
            warnings.warn(
                f"{where}dataset {name!r} has {len(empty)} item(s) with an empty response "
                f"(items {empty[:10]}{' ...' if len(empty) > 10 else ''}); they teach the model "
                "only to stop (EOS) after their prompt: fill in or remove them",
                UserWarning,
                stacklevel=4,
            )

    def _run_sft(self, stage: SFTStage, stage_dir: Path) -> dict:
        kwargs = {"seed": self.seed, "progress": self.progress, **stage.trainer}
        trainer = SFTTrainer(
            self.model,
            train_dataset=self._sft_examples(stage.datasets),
            accelerator=self.accelerator,
            output_dir=stage_dir,
            save_final_checkpoint=False,  # the pipeline writes <stage>/checkpoint
            **kwargs,
        )
        with trainer:  # gives back its optimizer and loaders when done
            metrics = trainer.train()
        return {"checkpoint": self._checkpoint(stage_dir), "metrics": _plain(metrics)}

    def _run_spin(self, stage: SPINStage, stage_dir: Path) -> dict:
        kwargs = {"progress": self.progress, **stage.trainer}
        if "epochs" not in kwargs:  # trainer.epochs (passes in all) replaces cycles
            kwargs.setdefault("iterations", stage.cycles)
        max_seq_len = kwargs.pop("max_seq_len", self.preference_max_seq_len)
        trainer = SPINTrainer(
            self.model,
            sft_dataset=self._sft_examples([stage.dataset]),
            max_seq_len=max_seq_len,
            eos_id=self.tokenizer.eos_id,
            accelerator=self.accelerator,
            checkpoint_folder=str(stage_dir / "spin-checkpoints"),
            **kwargs,
        )
        with trainer:  # gives back its optimizer and loaders when done
            metrics = trainer.train()
        return {"checkpoint": self._checkpoint(stage_dir), "metrics": _plain(metrics)}

    # ------------------------------------------------------------------ prompt generation
    def _run_prompt_generation(
        self, index: int, stage: PromptGenerationStage, stage_dir: Path
    ) -> dict:
        model = (
            self.model if stage.generator_model == "self" else self.models[stage.generator_model]
        )
        seed_prompts = self._prompts(stage.seed_dataset)
        generator = torch.Generator(device=wrap_model(model).device)
        generator.manual_seed(_seed_for(self.seed, index, "prompts"))
        result = generate_prompts(
            model,
            self.tokenizer,
            seed_prompts,
            stage.num_prompts,
            num_shots=stage.num_shots,
            num_seed_shots=stage.num_seed_shots,
            temperature=stage.temperature,
            top_p=stage.top_p,
            max_new_tokens=stage.max_new_tokens,
            max_attempts=stage.max_attempts,
            generator=generator,
            progress=self.progress,
            generated_prompts=self._generated_prompts_before(index),
        )
        if self.accelerator.is_main_process:
            store = JsonlStore(stage_dir / "prompts.jsonl")
            store.extend(
                {"id": f"{index + 1}-{i}", "prompt": p} for i, p in enumerate(result.prompts)
            )
        stats = _plain(dataclasses.asdict(result)) if dataclasses.is_dataclass(result) else {}
        stats.pop("prompts", None)
        stats["num_prompts"] = len(result.prompts)
        if self.accelerator.is_main_process:
            atomic_write_json(stage_dir / "stats.json", stats)
        self.accelerator.wait_for_everyone()  # prompts.jsonl is complete before any rank reads it
        return {
            "prompts": str((stage_dir / "prompts.jsonl").relative_to(self.run_dir)),
            "stats": stats,
        }

    def _generated_prompts_before(self, index: int) -> list[str]:
        """The prompts of every prompt-generation stage before stage ``index``, in order."""
        return [
            r["prompt"]
            for j in range(index)
            if isinstance(self.stages[j], PromptGenerationStage)
            for r in read_jsonl(self._stage_dir(j, self.stages[j]) / "prompts.jsonl")
        ]

    def _latest_generated_prompts(self, index: int) -> list[str]:
        for j in range(index - 1, -1, -1):
            if isinstance(self.stages[j], PromptGenerationStage):
                path = self._stage_dir(j, self.stages[j]) / "prompts.jsonl"
                prompts = [r["prompt"] for r in read_jsonl(path)]
                if not prompts:
                    raise ValueError(f"the prompt-generation stage wrote no prompts to {path}")
                return prompts
        raise ValueError(
            "prompts='generated' needs a prompt_generation stage before this stage; add one "
            "or name a prompt dataset"
        )

    # ------------------------------------------------------------------ preference iteration
    def _judge_for(self, stage: PreferenceStage):
        if stage.judge != "self":
            judge = self.judges[stage.judge]
            return judge if hasattr(judge, "score") else CallableJudge(judge)
        return LLMJudge(
            self.model,
            self.tokenizer,
            self.reward_config,
            num_samples=stage.judge_samples,
            mode=stage.judge_mode,
            temperature=stage.judge_temperature,
            top_p=stage.judge_top_p,
            max_new_tokens=stage.judge_max_new_tokens,
            on_too_long=stage.judge_on_too_long,
        )

    def _run_preference(self, index: int, stage: PreferenceStage, stage_dir: Path) -> dict:
        prompts = (
            self._latest_generated_prompts(index)
            if stage.prompts == "generated"
            else self._prompts(stage.prompts)
        )
        pairs = self._build_pairs(index, stage, stage_dir, prompts)
        examples = [
            preference_example(p["prompt"], p["chosen"], p["rejected"], self.tokenizer)
            for p in pairs
        ]
        replay = self._sft_examples([stage.replay]) if stage.replay else None
        kwargs = {
            "max_seq_len": self.preference_max_seq_len,
            "seed": self.seed,
            "progress": self.progress,
            **stage.trainer,
        }
        if self.early_stopper_eval_module is not None:
            kwargs.setdefault("early_stopper_eval_module", self.early_stopper_eval_module)
        trainer = DPOTrainer(
            self.model,
            train_dataset=examples,
            replay_dataset=replay,
            accelerator=self.accelerator,
            output_dir=stage_dir,
            save_final_checkpoint=False,  # the pipeline writes <stage>/checkpoint
            **kwargs,
        )
        with trainer:  # gives back its optimizer and loaders when done
            metrics = trainer.train()
        stats = json.loads((stage_dir / "stats.json").read_text())
        return {
            "checkpoint": self._checkpoint(stage_dir),
            "pairs": str((stage_dir / "pairs.jsonl").relative_to(self.run_dir)),
            "stats": stats,
            "metrics": _plain(metrics),
        }

    def _build_pairs(
        self, index: int, stage: PreferenceStage, stage_dir: Path, prompts: list[str]
    ) -> list[dict]:
        """Generate, judge and pair, chunk by chunk, appending records as they are made.

        Each chunk's randomness is seeded by (run seed, stage, chunk), so a resumed run
        regenerates an interrupted chunk exactly and appends only its missing records.
        With several processes, chunks are dealt round-robin to the ranks; every round's
        records are gathered, and the main process writes them in chunk order, so the
        files do not depend on the number of processes.
        """
        acc = self.accelerator
        main = acc.is_main_process
        candidates = JsonlStore(stage_dir / "candidates.jsonl", repair=main)  # one writer
        pair_store = JsonlStore(stage_dir / "pairs.jsonl", repair=main)
        records = candidates.records  # every rank reads the same files at the start
        pairs = pair_store.records
        acc.wait_for_everyone()
        done_ids = {r["id"] for r in records}
        target = stage.num_preference_pairs
        max_prompts = min(stage.max_prompts or len(prompts), len(prompts))
        judge = self._judge_for(stage)
        budgets = self._prompt_budgets(
            self._plan()[index], stage, prompts[:max_prompts], stage.prompts
        )
        gen_config = GenerationConfig(
            max_new_tokens=stage.max_new_tokens,
            temperature=stage.temperature,
            top_p=stage.top_p,
            top_k=stage.top_k,
            min_p=stage.min_p,
            eos_token_id=self.tokenizer.eos_id,
            num_return_sequences=stage.num_candidates,
        )

        def add(new_records: list[dict]) -> None:
            new_pairs = []
            for record in new_records:
                new_pairs += self._pairs_of(record, stage, target - len(pairs) - len(new_pairs))
            if main:
                candidates.extend(new_records)
                pair_store.extend(new_pairs)
            records.extend(r for r in new_records if r["id"] not in done_ids)
            done_ids.update(r["id"] for r in new_records)
            pairs.extend(new_pairs)

        # pairs lost by a crash after their candidates were written (or a torn line) are
        # rebuilt here, pair by pair, in record order
        have = {p["id"] for p in pairs}
        missing_pairs = []
        for record in records:
            room = target - len(pairs) - len(missing_pairs)
            lost = [p for p in self._pairs_of(record, stage, target) if p["id"] not in have]
            missing_pairs += lost[: max(room, 0)]
        if main:
            pair_store.extend(missing_pairs)
        pairs.extend(missing_pairs)

        chunk = stage.chunk_size
        chunk_ids = [
            [f"{index + 1}-{i}" for i in range(c * chunk, min((c + 1) * chunk, max_prompts))]
            for c in range(math.ceil(max_prompts / chunk))
        ]
        todo = [c for c, ids in enumerate(chunk_ids) if not all(i in done_ids for i in ids)]
        bar = tqdm(
            total=target,
            initial=min(len(pairs), target),
            desc=f"{_stage_slug(stage)}: generate + judge",
            unit="pair",
            disable=not (self.progress and main),
        )
        world, rank = acc.num_processes, acc.process_index
        try:
            for start in range(0, len(todo), world):
                if len(pairs) >= target:
                    break
                mine = todo[start + rank] if start + rank < len(todo) else None
                fresh = (
                    []
                    if mine is None
                    else self._judge_chunk(
                        index,
                        stage,
                        mine,
                        chunk_ids[mine],
                        prompts,
                        judge,
                        gen_config,
                        done_ids,
                        budgets,
                    )
                )
                if world > 1:
                    from accelerate.utils import gather_object

                    fresh = gather_object([fresh])
                    fresh = [
                        r
                        for part in sorted(fresh, key=lambda p: p[0]["chunk"] if p else -1)
                        for r in part
                    ]
                before = len(pairs)
                add(fresh)
                bar.update(min(len(pairs), target) - min(before, target))
                self._check_parse_rate(self._plan()[index], stage, records)
                self._check_ties(index, stage, stage_dir, records, pairs, max_prompts)
        finally:
            bar.close()
        stats = candidate_stats(records, pairs)
        if main:
            atomic_write_json(stage_dir / "stats.json", stats)
        acc.wait_for_everyone()
        if len(pairs) < target:
            raise NotEnoughPairsError(
                f"{stage.kind}: built {len(pairs)} of {target} preference pairs after "
                f"trying {len(records)} prompts (all {max_prompts} allowed were used). "
                f"Judge parse rate {stats['parse_rate']:.1%}, tie rate {stats['tie_rate']:.1%}. "
                "Give more prompts (or a prompt_generation stage), raise max_prompts, lower "
                "num_preference_pairs, or sample more candidates per prompt. The records built "
                f"so far are kept in {stage_dir}; these changes alter the stage, so apply them "
                "with --overwrite (overwrite=True) or another --out."
            )
        return pairs[:target]

    def _judge_chunk(
        self,
        index: int,
        stage: PreferenceStage,
        chunk_index: int,
        ids: list[str],
        prompts: list[str],
        judge: Any,
        gen_config: GenerationConfig,
        done_ids: set[str],
        budgets: list[int],
    ) -> list[dict]:
        """Candidates for one chunk of prompts, judged; one record per prompt.

        ``budgets[i]`` is prompt ``i``'s limit on new tokens (see :meth:`_prompt_budgets`).
        """
        positions = [int(i.rsplit("-", 1)[1]) for i in ids]
        chunk_prompts = [prompts[i] for i in positions]
        generator = torch.Generator(device=self.lm.device)
        generator.manual_seed(_seed_for(self.seed, index, chunk_index))
        responses = generate_text(
            self.model,
            self.tokenizer,
            chunk_prompts,
            gen_config,
            generator=generator,
            max_new_tokens_per_prompt=[budgets[i] for i in positions],
        )
        flat_prompts = [p for p, rs in zip(chunk_prompts, responses) for _ in rs]
        flat_responses = [r for rs in responses for r in rs]
        results = judge.score(flat_prompts, flat_responses, generator=generator)
        k = stage.num_candidates
        out = []
        for j, (rid, prompt) in enumerate(zip(ids, chunk_prompts)):
            if rid in done_ids:
                continue
            res = results[j * k : (j + 1) * k]
            record = {
                "id": rid,
                "chunk": chunk_index,
                "prompt": prompt,
                "responses": flat_responses[j * k : (j + 1) * k],
                "scores": [r.score for r in res],
                "judgements": [r.to_dict() for r in res],
            }
            if self.oracle is not None:
                record["oracle_scores"] = [self.oracle(prompt, r) for r in record["responses"]]
            out.append(record)
        return out

    def _pairs_of(self, record: dict, stage: PreferenceStage, room: int) -> list[dict]:
        """At most ``room`` preference pairs from one judged record (TRL columns + scores)."""
        if room <= 0:
            return []
        chosen_rejected = select_pairs(
            record["responses"],
            record["scores"],
            strategy=stage.pair_strategy,
            margin=stage.pair_margin,
            length_tolerance=stage.length_tolerance,
        )
        return [
            {
                "id": f"{record['id']}/{c}-{r}",
                "prompt_id": record["id"],
                "prompt": record["prompt"],
                "chosen": record["responses"][c],
                "rejected": record["responses"][r],
                "chosen_index": c,
                "rejected_index": r,
                "score_chosen": record["scores"][c],
                "score_rejected": record["scores"][r],
            }
            for c, r in chosen_rejected[:room]
        ]

    def _check_parse_rate(self, name: str, stage: PreferenceStage, records: list[dict]) -> None:
        # every judge reports one sample_scores / failures entry per output; samples holds
        # the output texts of judges that write text (external judges have none)
        outputs: list[tuple[str, float | None, str | None]] = []
        for r in records:
            for j in r["judgements"]:
                scores = j.get("sample_scores", [])
                failures = j.get("failures") or [None] * len(scores)
                texts = j.get("samples") or [None] * len(scores)
                for text, score, why in zip(texts, scores, failures):
                    outputs.append((text if text is not None else str(why), score, why))
        if len(outputs) < 8:  # judge at least a few outputs before deciding
            return
        rate = sum(score is not None for _, score, _ in outputs) / len(outputs)
        if rate < stage.min_parse_rate:
            failed = [(text, why) for text, score, why in outputs if score is None]
            raise JudgeParseError(
                _parse_failure_message(
                    name, stage, rate, [s for s, _ in failed], [w for _, w in failed]
                )
            )

    def _check_ties(
        self,
        index: int,
        stage: PreferenceStage,
        stage_dir: Path,
        records: list[dict],
        pairs: list[dict],
        max_prompts: int,
    ) -> None:
        """Stop early when the judge gives no signal: every judged prompt's scores tie."""
        if pairs or len(records) >= max_prompts:
            return  # a pair was built, or every prompt is judged (the usual end applies)
        scored = [[s for s in r["scores"] if s is not None] for r in records]
        scored = [s for s in scored if len(s) >= 2]
        if len(scored) < MIN_TIED_PROMPTS or any(len(set(s)) > 1 for s in scored):
            return
        values = sorted({s[0] for s in scored})
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (" ..." if len(values) > 5 else "")
        raise NotEnoughPairsError(
            f"stage {self._plan()[index]}: the judge gives no signal: on each of the first "
            f"{len(scored)} judged prompts it gave every candidate the same score (scores "
            f"seen: {shown}), so no preference pair can be formed, and judging the other "
            f"{max_prompts - len(records)} prompts would not change that. Check the judge: "
            "an external judge must score different responses differently; with judge='self', "
            "fine-tune the model on EFT (judge) examples first, or use a reward_config whose "
            "scale the model uses. The records judged so far are kept in "
            f"{stage_dir}."
        )

    # ------------------------------------------------------------------ report
    def _config_yaml(self) -> str:
        """The resolved configuration (defaults included), written once when a run starts."""
        import yaml

        reward = {k: v for k, v in to_dict(self.reward_config).items() if not k.startswith("_")}
        cfg = {
            "seed": self.seed,
            "preference_max_seq_len": self.preference_max_seq_len,
            "datasets": {name: len(data) for name, data in sorted(self.datasets.items())},
            "judges": sorted(self.judges),
            "reward_config": reward,
            "stages": [to_dict(s) for s in self.stages],
        }
        return yaml.safe_dump(cfg, sort_keys=False)

    def _write_report(self, state: dict) -> dict:
        report = {"run_dir": str(self.run_dir), "stages": state["finished"]}
        if self.accelerator.is_main_process:
            atomic_write_json(self.run_dir / "report.json", report)
            atomic_write_text(self.run_dir / "report.md", render_report_md(report))
        return report


# ====================================================================== statistics


def candidate_stats(candidates: list[dict], pairs: list[dict]) -> dict:
    """Per-iteration judge and pair statistics (paper-style reporting)."""
    sample_scores = [
        s for r in candidates for j in r["judgements"] for s in j.get("sample_scores", [])
    ]
    scores = [s for r in candidates for s in r["scores"]]
    parsable = [s for s in scores if s is not None]
    prompts_with_pair = {p["prompt_id"] for p in pairs}
    tied = sum(
        1
        for r in candidates
        if len([s for s in r["scores"] if s is not None]) >= 2
        and len({s for s in r["scores"] if s is not None}) == 1
    )
    with_two = sum(1 for r in candidates if len([s for s in r["scores"] if s is not None]) >= 2)
    hist = Counter(str(round(s)) if float(s).is_integer() else f"{s:.2f}" for s in parsable)
    stats: dict[str, Any] = {
        "prompts": len(candidates),
        "candidates": len(scores),
        "judge_outputs": len(sample_scores),
        "parse_rate": (
            sum(s is not None for s in sample_scores) / len(sample_scores) if sample_scores else 0.0
        ),
        "candidate_score_rate": len(parsable) / len(scores) if scores else 0.0,
        "score_histogram": dict(sorted(hist.items())),
        "tie_rate": tied / with_two if with_two else 0.0,
        "pairs": len(pairs),
        "prompts_with_pair": len(prompts_with_pair),
        "mean_chosen_chars": _mean([len(p["chosen"]) for p in pairs]),
        "mean_rejected_chars": _mean([len(p["rejected"]) for p in pairs]),
    }
    if candidates and "oracle_scores" in candidates[0]:
        from .metrics import pairwise_accuracy

        pred = [s for r in candidates for s in r["scores"]]
        gold = [s for r in candidates for s in r["oracle_scores"]]
        groups = [i for i, r in enumerate(candidates) for _ in r["scores"]]
        stats["judge_pairwise_accuracy_on_policy"] = pairwise_accuracy(pred, gold, groups=groups)
        by_id = {r["id"]: r for r in candidates}
        correct = sum(
            by_id[p["prompt_id"]]["oracle_scores"][p["chosen_index"]]
            > by_id[p["prompt_id"]]["oracle_scores"][p["rejected_index"]]
            for p in pairs
        )
        stats["pairs_oracle_correct"] = correct / len(pairs) if pairs else 0.0
    return stats


def _has_records(stage_dir: Path) -> bool:
    """Whether an unfinished stage already wrote records (candidates, pairs, prompts)."""
    names = ("candidates.jsonl", "pairs.jsonl", "prompts.jsonl")
    return any((stage_dir / n).is_file() and (stage_dir / n).stat().st_size > 0 for n in names)


def _changed_settings_message(name: str, finished: bool, changes: list[str]) -> str:
    how = "finished" if finished else "was interrupted after writing records"
    return (
        f"stage {name} {how} with other settings than this run gives it: "
        f"{'; '.join(changes)}. Resuming would mix results of both settings, so nothing was "
        "run. Either restore those settings to resume the run, or start it afresh: "
        "--overwrite (overwrite=True) or another --out (checkpoints_folder)"
    )


def _set_aside_judgements(stage_dir: Path, name: str, changes: list[str]) -> None:
    """Only the judge of an unfinished preference stage changed: move its judged records
    to ``stale-judge-<k>/`` so the stage samples the same candidates and judges them anew."""
    k = 1
    while (stage_dir / f"stale-judge-{k}").exists():
        k += 1
    aside = stage_dir / f"stale-judge-{k}"
    aside.mkdir()
    for file in ("candidates.jsonl", "pairs.jsonl", "stats.json"):
        if (stage_dir / file).exists():
            (stage_dir / file).rename(aside / file)
    log.warning(
        "stage %s: the judge changed (%s); its judged candidates are set aside in %s and "
        "judged again with the new judge",
        name,
        "; ".join(changes),
        aside,
    )


def _set_aside_interrupted_metrics(stage_dir: Path) -> None:
    """A stage rerun after a crash starts its metrics afresh; the interrupted attempt's
    lines are kept beside it as ``metrics.interrupted-<k>.jsonl``."""
    metrics = stage_dir / "metrics.jsonl"
    if metrics.exists():
        k = 1
        while (stage_dir / f"metrics.interrupted-{k}.jsonl").exists():
            k += 1
        metrics.rename(stage_dir / f"metrics.interrupted-{k}.jsonl")


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def render_report_md(report: dict) -> str:
    """The run report as Markdown: one section per finished stage."""
    lines = [f"# Run report: {report['run_dir']}", ""]
    for rec in report["stages"]:
        lines += [f"## {rec['stage']}", ""]
        for key in ("checkpoint", "pairs", "prompts"):
            if rec.get(key):
                lines.append(f"- {key}: `{rec[key]}`")
        for section in ("stats", "metrics"):
            values = rec.get(section) or {}
            if values:
                lines += ["", f"| {section} | value |", "|---|---|"]
                for k, v in values.items():
                    v = f"{v:.4g}" if isinstance(v, float) else v
                    lines.append(f"| {k} | {v} |")
        lines.append("")
    return "\n".join(lines)
