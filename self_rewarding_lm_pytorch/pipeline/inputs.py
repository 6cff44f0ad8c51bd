"""The data as the stages read it: SFT examples and prompts, each dataset read and
tokenized once (the seed's mock datasets make new items on every access), each preference
stage's per-prompt token budgets, and the pre-flight that checks them all before a run."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ..data import SFTExample, as_prompt_list, materialize, tokenize_sft_item
from ..generation import response_budget
from ..models import Tokenizer
from .eft import check_eft_rows
from .head_to_head_stage import preflight_head_to_head
from .preference import prompt_budgets
from .stages import (
    GENERATED_EFT,
    EFTBuildStage,
    HeadToHeadStage,
    PreferenceStage,
    PromptGenerationStage,
    SFTStage,
    SPINStage,
    Stage,
)

__all__ = ["StageInputs"]


class StageInputs:
    """Reads the named ``datasets`` for the stages (the dict is shared, not copied)."""

    def __init__(
        self,
        datasets: dict[str, Any],
        tokenizer: Tokenizer,
        *,
        max_seq_len: int | None,
        preference_max_seq_len: int,
    ) -> None:
        self.datasets = datasets
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.preference_max_seq_len = preference_max_seq_len
        self._sft_cache: dict[str, list[SFTExample]] = {}
        self._prompt_cache: dict[str, list[str]] = {}
        self._budget_cache: dict[str, tuple[list[str], list[int]]] = {}
        self._row_cache: dict[str, list[dict]] = {}

    def preflight(
        self,
        stages: Sequence[Stage],
        plan: Sequence[str],
        judge_for: Callable[[PreferenceStage], Any],
    ) -> None:
        """Check what ``stages`` (named ``plan``) need from the data, tokenizer and model;
        ``judge_for(stage)`` builds a preference stage's judge.

        Every dataset is read and tokenized (SFT items, prompts: blank ones are refused,
        empty SFT responses warned about), every prompt of a preference stage must fit the
        model's context with the stage's ``max_new_tokens`` (and leave room for a response
        within ``preference_max_seq_len``), SPIN prompts must leave room for a response, and
        the self-judge's template must render. ``run()`` calls this first; ``srlm run
        --check`` runs it without training.
        """
        for stage, name in zip(stages, plan):
            if isinstance(stage, SFTStage):
                for ds in stage.datasets:
                    if ds != GENERATED_EFT:  # written by an earlier eft_build stage
                        self.sft_examples([ds], stage=name)
            elif isinstance(stage, EFTBuildStage):
                rows = self.rows(stage.inputs, stage=name)
                try:
                    judge_for(stage).config.render(rows[0]["prompt"], rows[0]["responses"][0])
                except Exception as exc:  # noqa: BLE001 - any settings or template error, named
                    raise ValueError(
                        f"stage {name}: the self judge: {exc}; fix judge_settings or "
                        "reward_config.prompt_template (variables: {{ prompt }}, {{ response }})"
                    ) from exc
            elif isinstance(stage, SPINStage):
                limit = min(
                    stage.trainer.get("max_seq_len", self.preference_max_seq_len),
                    self.max_seq_len or self.preference_max_seq_len,
                )
                for i, ex in enumerate(self.sft_examples([stage.dataset], stage=name)):
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
                self.prompts(stage.seed_dataset)
            elif isinstance(stage, HeadToHeadStage):
                prompts = self.prompts(stage.prompts)
                preflight_head_to_head(stage, name, prompts, self.datasets, judge_for(stage))
            elif isinstance(stage, PreferenceStage):
                if stage.prompts != "generated":
                    self.prompt_budgets(name, stage, self.prompts(stage.prompts))
                if stage.replay is not None:
                    self.sft_examples([stage.replay], stage=name)
                if stage.judge == "self":
                    sample = (
                        self.prompts(stage.prompts)[0]
                        if stage.prompts != "generated"
                        else "an example prompt"
                    )
                    try:  # the judge's own settings, then its template on a real prompt
                        judge = judge_for(stage)
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
                    judge = judge_for(stage)
                if stage.prompts != "generated" and hasattr(judge, "check_prompts"):
                    judge.check_prompts(  # an LLM judge's prompt must fit its context
                        self.prompts(stage.prompts),
                        where=f"stage {name}, dataset {stage.prompts!r}: ",
                    )

    def rows(self, name: str, *, stage: str = "eft_build") -> list[dict]:
        """The rows of dataset ``name`` for an eft_build stage, checked (see
        :func:`.eft.check_eft_rows`)."""
        if name not in self._row_cache:
            rows = list(self.datasets[name])
            check_eft_rows(rows, name, f"stage {stage}")
            self._row_cache[name] = rows
        return self._row_cache[name]

    def prompts(self, name: str) -> list[str]:
        if name not in self._prompt_cache:
            self._prompt_cache[name] = as_prompt_list(self.datasets[name], name)
        return self._prompt_cache[name]

    def prompt_budgets(self, name: str, stage: PreferenceStage, prompts: list[str]) -> list[int]:
        """Each prompt's limit on new tokens (see :func:`.preference.prompt_budgets`), kept
        per stage, so the pre-flight's pass is not repeated when the stage runs."""
        cached = self._budget_cache.get(name)
        if cached is not None and cached[0][: len(prompts)] == prompts:  # a prefix of those
            return cached[1][: len(prompts)]
        budgets = prompt_budgets(
            name,
            stage,
            prompts,
            stage.prompts,
            self.tokenizer,
            self.max_seq_len,
            self.preference_max_seq_len,
        )
        self._budget_cache[name] = (list(prompts), budgets)
        return budgets

    def sft_examples(self, names: Sequence[str], *, stage: str | None = None) -> list[SFTExample]:
        """The SFT examples of datasets ``names``, concatenated (``stage``: who reads them)."""
        examples: list[SFTExample] = []
        for name in names:
            if name not in self._sft_cache:
                items = materialize(
                    self.datasets[name],
                    lambda item: (item, tokenize_sft_item(item, self.tokenizer)),
                    name=name,
                )
                _warn_empty_responses(name, stage, items, self.tokenizer.eos_id)
                self._sft_cache[name] = [ex for _, ex in items]
            examples += self._sft_cache[name]
        return examples


def _warn_empty_responses(name: str, stage: str | None, items: list, eos: int | None) -> None:
    """Warn about SFT items whose response is empty: they teach only to stop (EOS)."""
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
            stacklevel=5,
        )
