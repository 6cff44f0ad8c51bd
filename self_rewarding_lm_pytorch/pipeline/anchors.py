"""Anchored rejection (Temporal Self-Rewarding, Wang et al. 2025, arXiv 2508.06026): a
preference stage with ``rejected_from`` also samples candidates from a frozen earlier
model, has the same judge score them, and pairs the best policy candidate against the
worst of those anchor candidates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..generation import GenerationBackend, GenerationConfig, generate_text
from ..pairs import anchored_pair
from .stages import PreferenceStage

__all__ = ["add_anchors", "anchored_choice"]


def add_anchors(
    records: list[dict],
    backend: GenerationBackend,
    tokenizer: Any,
    judge: Any,
    gen_config: GenerationConfig,
    *,
    budgets: list[int],
    generator: torch.Generator | None,
    oracle: Callable[[str, str], float] | None = None,
) -> None:
    """Add ``anchor_responses`` (sampled through ``backend`` with ``gen_config`` and
    ``generator``), ``anchor_scores`` and ``anchor_judgements`` (``judge``'s, with the same
    generator) and, given ``oracle``, ``anchor_oracle_scores`` to each of ``records``."""
    prompts = [r["prompt"] for r in records]
    responses = generate_text(
        backend,
        tokenizer,
        prompts,
        gen_config,
        generator=generator,
        max_new_tokens_per_prompt=budgets,
    )
    flat_prompts = [p for p, rs in zip(prompts, responses) for _ in rs]
    results = judge.score(flat_prompts, [x for rs in responses for x in rs], generator=generator)
    start = 0
    for record, rs in zip(records, responses):
        res = results[start : start + len(rs)]
        start += len(rs)
        record["anchor_responses"] = list(rs)
        record["anchor_scores"] = [r.score for r in res]
        record["anchor_judgements"] = [r.to_dict() for r in res]
        if oracle is not None:
            record["anchor_oracle_scores"] = [oracle(record["prompt"], x) for x in rs]


def anchored_choice(record: dict, stage: PreferenceStage) -> list[tuple[int, int]]:
    """The record's anchored ``(chosen, rejected)`` pair, at most one: the best policy
    candidate (an index into ``responses``) against the worst candidate of the frozen
    model ``stage.rejected_from`` (an index into ``anchor_responses``)."""
    pair = anchored_pair(
        record["responses"],
        record["scores"],
        record["anchor_responses"],
        record["anchor_scores"],
        strategy=stage.pair_strategy,
        margin=stage.pair_margin,
        length_tolerance=stage.length_tolerance,
    )
    return [] if pair is None else [pair]
