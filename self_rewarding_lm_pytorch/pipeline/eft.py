"""An ``eft_build`` stage's work (paper §3.1): the policy judges human-ranked responses,
the judgements that order them as the humans did become EFT examples, balanced over
scores and split by prompt.

``judgements.jsonl`` holds every judgement, appended chunk by chunk (each chunk seeded by
run seed, stage and chunk), so a resumed stage judges only what is missing and writes the
same files; ``eft.jsonl``, ``eft_heldout.jsonl`` and ``stats.json`` are computed from it.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

from ..store import JsonlStore, atomic_write_json, atomic_write_text
from ..utils import derive_seed, make_generator
from .chunks import deal_rounds
from .stages import EFTBuildStage

__all__ = ["agrees", "balance", "build_eft", "check_eft_rows", "eft_examples", "heldout_prompts"]


def check_eft_rows(rows: list[Any], dataset: str, where: str) -> None:
    """Refuse rows that are not ``{prompt: str, responses: [str, ...], human_ranks: [int]}``."""
    for i, row in enumerate(rows):
        at = f"{where}: dataset {dataset!r} row {i}"
        if not isinstance(row, dict):
            raise ValueError(
                f"{at} is {type(row).__name__}; eft_build reads mappings "
                "{prompt, responses, human_ranks} (srlm prepare oasst's "
                "eft_inputs.jsonl)"
            )
        missing = [k for k in ("prompt", "responses", "human_ranks") if k not in row]
        if missing:
            raise ValueError(
                f"{at} has no {', '.join(missing)}; give rows as srlm prepare "
                "oasst writes them to eft_inputs.jsonl"
            )
        responses, ranks = row["responses"], row["human_ranks"]
        if (
            not isinstance(row["prompt"], str)
            or not isinstance(responses, list)
            or not all(isinstance(r, str) for r in responses)
        ):
            raise ValueError(f"{at}: prompt must be a string and responses a list of strings")
        if (
            not isinstance(ranks, list)
            or len(ranks) != len(responses)
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranks)
        ):
            raise ValueError(
                f"{at}: human_ranks must be a list of numbers, one per response (0 = best), "
                f"got {ranks!r} for {len(responses)} responses"
            )


def agrees(scores: list[float], ranks: list[float], rule: str) -> bool | None:
    """Whether ``scores`` (higher = better) order the responses as ``ranks`` (lower =
    better): on every differently-ranked pair (``all_pairs``) or on the best- vs the
    worst-ranked ones (``best_worst``); a tie in score disagrees. None when every rank is
    the same (no human ordering to agree with)."""
    if len(set(ranks)) < 2:
        return None
    idx = range(len(ranks))
    if rule == "best_worst":
        top, bottom = min(ranks), max(ranks)
        pairs = [(i, j) for i in idx if ranks[i] == top for j in idx if ranks[j] == bottom]
    else:
        pairs = [(i, j) for i in idx for j in idx if ranks[i] < ranks[j]]
    return all(scores[i] > scores[j] for i, j in pairs)


def heldout_prompts(prompts: list[str], fraction: float, seed: int) -> set[str]:
    """The held-out prompts: the first ``round(fraction * n)`` of a seeded order of the
    distinct prompts (independent of the input order)."""
    order = sorted(set(prompts))
    random.Random(seed).shuffle(order)
    return set(order[: int(fraction * len(order) + 0.5)])


def _key(score: float) -> str:
    return f"{score:g}"


def balance(examples: list[dict], seed: int) -> list[dict]:
    """Every score value kept at most as often as the rarest one (a seeded choice per
    value), in the original order."""
    by_score: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_score.setdefault(_key(ex["score"]), []).append(i)
    if not by_score:
        return []
    n = min(len(v) for v in by_score.values())
    rng = random.Random(seed)
    keep = {i for key in sorted(by_score) for i in rng.sample(by_score[key], n)}
    return [ex for i, ex in enumerate(examples) if i in keep]


def eft_examples(records: list[dict], stage: EFTBuildStage, seed: int) -> tuple[dict, dict]:
    """The EFT rows ``{"train": [...], "heldout": [...]}`` from the judged ``records``,
    and the stage's statistics."""
    counts = Counter()
    kept: list[dict] = []
    for record in records:
        ranks = record["human_ranks"]
        sets = list(zip(*(j["sample_scores"] for j in record["judgements"])))
        texts = list(zip(*(j["samples"] for j in record["judgements"])))
        for scores, samples in zip(sets, texts):
            counts["sets"] += 1
            if any(s is None for s in scores):
                counts["unparsable"] += 1
                continue
            verdict = agrees(list(scores), ranks, stage.agreement)
            if verdict is None:
                counts["unranked"] += 1
            elif not verdict:
                counts["disagreeing"] += 1
            else:
                counts["agreeing"] += 1
                kept += [
                    {"prompt": r, "response": t, "score": s, "source_prompt": record["prompt"]}
                    for r, t, s in zip(record["judge_prompts"], samples, scores)
                ]
    held = heldout_prompts(
        [r["prompt"] for r in records], stage.heldout_fraction, derive_seed(seed, "eft-split")
    )
    train = [ex for ex in kept if ex["source_prompt"] not in held]
    heldout = [ex for ex in kept if ex["source_prompt"] in held]
    balanced = balance(train, derive_seed(seed, "eft-balance")) if stage.balance else train
    final = balanced
    if stage.max_examples is not None and len(final) > stage.max_examples:
        rng = random.Random(derive_seed(seed, "eft-cap"))
        keep = set(rng.sample(range(len(final)), stage.max_examples))
        final = [ex for i, ex in enumerate(final) if i in keep]

    def histogram(exs: list[dict]) -> dict[str, int]:
        return dict(sorted(Counter(_key(ex["score"]) for ex in exs).items()))

    stats = {
        "rows": len(records),
        "judgement_sets": counts["sets"],
        "agreeing_sets": counts["agreeing"],
        "disagreeing_sets": counts["disagreeing"],
        "unparsable_sets": counts["unparsable"],
        "unranked_sets": counts["unranked"],
        "kept_examples": len(kept),
        "heldout_prompts": len(held),
        "heldout_examples": len(heldout),
        "balanced_away": len(train) - len(balanced),
        "capped_away": len(balanced) - len(final),
        "train_examples": len(final),
        "score_histogram_before": histogram(train),
        "score_histogram_after": histogram(final),
    }
    return {"train": final, "heldout": heldout}, stats


def build_eft(
    *,
    index: int,
    stage: EFTBuildStage,
    stage_dir: Path,
    rows: list[dict],
    judge: Any,
    reward_config: Any,
    seed: int,
    device: Any,
    accelerator: Any,
) -> dict:
    """Judge ``rows`` with ``judge`` (resuming ``judgements.jsonl``; with several processes
    the chunks are dealt round-robin to them, see :mod:`.chunks`), then write ``eft.jsonl``,
    ``eft_heldout.jsonl`` and ``stats.json`` (on the main process); returns the statistics."""
    main = accelerator.is_main_process
    store = JsonlStore(stage_dir / "judgements.jsonl", repair=main)  # one writer
    done = {r["id"] for r in store.records}
    accelerator.wait_for_everyone()  # every rank read the file before the main one appends
    chunk = stage.chunk_size
    chunk_ids = [
        [f"{index + 1}-{i}" for i in range(c * chunk, min((c + 1) * chunk, len(rows)))]
        for c in range(math.ceil(len(rows) / chunk))
    ]
    todo = [c for c, ids in enumerate(chunk_ids) if not all(i in done for i in ids)]

    def work(c: int) -> list[dict]:
        ids, part = chunk_ids[c], rows[c * chunk : c * chunk + len(chunk_ids[c])]
        prompts = [r["prompt"] for r in part for _ in r["responses"]]
        responses = [x for r in part for x in r["responses"]]
        generator = make_generator(derive_seed(seed, index, "eft", c), device)
        results = judge.score(prompts, responses, generator=generator)
        at, fresh = 0, []
        for rid, row in zip(ids, part):
            k = len(row["responses"])
            res = results[at : at + k]
            at += k
            if rid not in done:
                fresh.append(
                    {
                        "id": rid,
                        "chunk": c,
                        "prompt": row["prompt"],
                        "responses": row["responses"],
                        "human_ranks": row["human_ranks"],
                        "judge_prompts": [
                            reward_config.render(row["prompt"], x) for x in row["responses"]
                        ],
                        "judgements": [r.to_dict() for r in res],
                    }
                )
        return fresh

    for parts in deal_rounds(accelerator, todo, work):
        if main:
            store.extend(r for part in parts for r in part)
    if not main:  # the main process writes the files; the runner makes the others wait
        return {}
    records = sorted(store.records, key=lambda r: int(r["id"].rsplit("-", 1)[1]))
    data, stats = eft_examples(records, stage, seed)
    for name, exs in (("eft.jsonl", data["train"]), ("eft_heldout.jsonl", data["heldout"])):
        atomic_write_text(stage_dir / name, "".join(_row_line(ex) for ex in exs))
    atomic_write_json(stage_dir / "stats.json", stats)
    return stats


def _row_line(ex: dict) -> str:
    return json.dumps({"prompt": ex["prompt"], "response": ex["response"]}) + "\n"
