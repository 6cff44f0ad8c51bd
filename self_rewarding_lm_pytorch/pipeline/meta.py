"""The judge pairs of a Meta-Rewarding stage (Wu et al. 2024, arXiv 2407.19594, §2.2).

After the actor pairs are built, :func:`build_judge_pairs` picks, per prompt, the
response whose N judge scores vary most; the policy as meta-judge compares every two of
its judgements in both orders, the battle matrix gives Bradley–Terry strengths, and the
strongest and weakest judgement form a DPO pair whose prompt is the judge prompt itself.
Meta-judgements are appended to ``<stage>/meta_judgements.jsonl`` chunk by chunk (each
chunk seeded by run seed, stage and chunk, so an interrupted stage resumes to the same
bytes); the pairs, capped to ``max_judge_pair_share`` of the stage's pairs and spread as
evenly as they allow over the chosen judgements' scores, go to ``<stage>/judge_pairs.jsonl`` and
their statistics into ``stats.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..judge.meta import DEFAULT_META_TEMPLATE, MetaJudge, battle_matrix, bradley_terry
from ..store import JsonlStore, atomic_write_json, atomic_write_text
from ..utils import derive_seed, make_generator
from .chunks import deal_rounds
from .stages import MetaRewardStage, _stage_slug

__all__ = ["balance_by_score", "build_judge_pairs", "cap_share", "judge_pair_room", "meta_items"]

log = logging.getLogger(__name__)

MIN_POSITION_CONSISTENCY = 0.5
"""Below this share of comparisons whose two orders agree, the stage warns that the
meta-judge follows the position more than the judgements."""


def _variance(xs: list[float]) -> float:
    mean = math.fsum(xs) / len(xs)
    return math.fsum((x - mean) ** 2 for x in xs) / len(xs)


def meta_items(records: list[dict], stage: MetaRewardStage) -> tuple[list[dict], int]:
    """The responses to meta-judge, in record order, and how many judgements were too long.

    A response's judgements count when their score parsed, the judge saw the whole response
    (not truncated) and they are at most ``max_judgement_chars`` long (the paper's length
    control, simplified: longer judgements are left out). Per prompt the
    ``judge_pairs_per_prompt`` responses whose kept scores have the highest variance are
    taken (ties: the earlier candidate); responses whose kept judgements all agree are not.
    """
    items, too_long, limit = [], 0, stage.max_judgement_chars
    for record in records:
        ranked = []
        for c, judgement in enumerate(record["judgements"]):
            if judgement.get("truncated"):
                continue
            kept = []
            for j, (text, score) in enumerate(
                zip(judgement.get("samples") or [], judgement.get("sample_scores") or [])
            ):
                if score is None:
                    continue
                if limit is not None and len(text) > limit:
                    too_long += 1
                    continue
                kept.append(j)
            scores = [judgement["sample_scores"][j] for j in kept]
            if len(kept) >= 2 and _variance(scores) > 0:
                ranked.append((-_variance(scores), c, kept))
        for _, c, kept in sorted(ranked)[: stage.judge_pairs_per_prompt]:
            judgement = record["judgements"][c]
            items.append(
                {
                    "id": f"{record['id']}/{c}",
                    "prompt_id": record["id"],
                    "candidate": c,
                    "prompt": record["prompt"],
                    "response": record["responses"][c],
                    "judgement_indices": kept,
                    "texts": [judgement["samples"][j] for j in kept],
                    "scores": [judgement["sample_scores"][j] for j in kept],
                }
            )
    return items, too_long


def _judge_chunk(
    meta_judge: MetaJudge, items: list[dict], chunk: int, generator: Any
) -> list[dict]:
    """Meta-judge every two distinct judgements of each item, both orders; one record each."""
    pairs = [
        (i, m, k)
        for i, item in enumerate(items)
        for m in range(len(item["texts"]))
        for k in range(m + 1, len(item["texts"]))
        if item["texts"][m] != item["texts"][k]
    ]
    results = meta_judge.compare_judgements(
        [items[i]["prompt"] for i, _, _ in pairs],
        [items[i]["response"] for i, _, _ in pairs],
        [items[i]["texts"][m] for i, m, _ in pairs],
        [items[i]["texts"][k] for i, _, k in pairs],
        generator=generator,
    )
    by_item: dict[int, list] = defaultdict(list)
    for (i, m, k), result in zip(pairs, results):
        by_item[i].append((m, k, result.to_dict()))
    out = []
    for i, item in enumerate(items):
        comparisons = by_item[i]
        battles = battle_matrix(len(item["texts"]), comparisons)
        out.append(
            {
                "id": item["id"],
                "chunk": chunk,
                "prompt_id": item["prompt_id"],
                "candidate": item["candidate"],
                "judgement_indices": item["judgement_indices"],
                "scores": item["scores"],
                "comparisons": [{"a": m, "b": k, **r} for m, k, r in comparisons],
                "battles": battles.tolist(),
                "strengths": bradley_terry(battles).tolist(),
            }
        )
    return out


def _judge_pair(meta: dict, item: dict, reward_config: Any) -> dict | None:
    """The strongest vs the weakest judgement of one item, or None when they are level."""
    strengths = meta["strengths"]
    hi = max(range(len(strengths)), key=lambda m: (strengths[m], -m))
    lo = min(range(len(strengths)), key=lambda m: (strengths[m], m))
    if strengths[hi] - strengths[lo] <= 1e-9 or item["texts"][hi] == item["texts"][lo]:
        return None
    return {
        "id": f"{meta['id']}/j{item['judgement_indices'][hi]}-j{item['judgement_indices'][lo]}",
        "prompt_id": meta["prompt_id"],
        "candidate": meta["candidate"],
        "prompt": reward_config.render(item["prompt"], item["response"]),  # as the judge saw it
        "chosen": item["texts"][hi],
        "rejected": item["texts"][lo],
        "chosen_index": item["judgement_indices"][hi],
        "rejected_index": item["judgement_indices"][lo],
        "score_chosen": item["scores"][hi],
        "score_rejected": item["scores"][lo],
        "strength_chosen": strengths[hi],
        "strength_rejected": strengths[lo],
    }


def _score_key(score: float) -> str:
    return str(round(score)) if float(score).is_integer() else f"{score:.2f}"


def judge_pair_room(num_actor_pairs: int, share: float) -> int:
    """``floor(share / (1 - share) * num_actor_pairs)``: the most judge pairs that keep them
    at most ``share`` of all the stage's pairs."""
    return math.floor(share / (1 - share) * num_actor_pairs + 1e-9)


def balance_by_score(pairs: list[dict], room: int, rng: random.Random) -> list[dict]:
    """The most even spread over chosen-judgement scores of ``min(room, len(pairs))``
    pairs (water-filling; a seeded choice, order kept).

    Every score keeps at most ``c`` pairs, ``c`` the highest level at which the total fits
    ``room``; what room is left goes one pair each to seeded scores that have more than
    ``c``. A rare score therefore keeps all its pairs without emptying the others, and no
    score gets more than one pair beyond any score that could have given more.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[_score_key(p["score_chosen"])].append(i)
    if len(pairs) <= room:
        return list(pairs)
    level = 0
    while sum(min(len(g), level + 1) for g in groups.values()) <= room:
        level += 1
    take = {key: min(len(g), level) for key, g in groups.items()}
    above = sorted(key for key, g in groups.items() if len(g) > level)
    for key in rng.sample(above, room - sum(take.values())):  # fewer than len(above)
        take[key] += 1
    keep = {i for key in sorted(groups) for i in rng.sample(groups[key], take[key])}
    return [p for i, p in enumerate(pairs) if i in keep]


def cap_share(pairs: list[dict], room: int, rng: random.Random) -> list[dict]:
    """At most ``room`` of ``pairs`` (a seeded choice; order kept)."""
    if len(pairs) <= room:
        return list(pairs)
    keep = set(rng.sample(range(len(pairs)), room))
    return [p for i, p in enumerate(pairs) if i in keep]


def _histogram(values: list[float]) -> dict[str, int]:
    return dict(sorted(Counter(_score_key(v) for v in values).items()))


def _stats(metas: list[dict], pairs: list[dict], n_actor: int, **counts: int) -> dict:
    outputs = parsed = consistent = decided = 0
    for meta in metas:
        for c in meta["comparisons"]:
            verdicts = c["verdicts_ab"] + c["verdicts_ba"]
            outputs += len(verdicts)
            parsed += sum(v is not None for v in verdicts)
            if c["consistent"] is not None:
                decided += 1
                consistent += bool(c["consistent"])
    return {
        "meta_judged_responses": len(metas),
        "meta_outputs": outputs,
        "meta_parse_rate": parsed / outputs if outputs else 0.0,
        "meta_position_consistency": consistent / decided if decided else 0.0,
        **counts,
        "judge_pairs": len(pairs),
        "judge_pair_share": len(pairs) / (len(pairs) + n_actor) if pairs or n_actor else 0.0,
        "judge_chosen_score_histogram": _histogram([p["score_chosen"] for p in pairs]),
        "judge_rejected_score_histogram": _histogram([p["score_rejected"] for p in pairs]),
    }


def build_judge_pairs(builder: Any, actor_pairs: list[dict]) -> list[dict]:
    """The judge pairs of the stage ``builder`` (a :class:`~.preference.PairBuilder` whose
    ``build`` finished) built: the meta-judge is the policy, sampled through the stage's
    backend with ``meta_judge_settings``; the judge prompt is rendered with the self judge's
    reward config. With several processes the chunks are dealt round-robin to the ranks and
    the main process appends every round's records in chunk order (the files do not depend
    on the number of processes); every rank returns the pairs."""
    stage: MetaRewardStage = builder.stage
    stage_dir: Path = builder.stage_dir
    acc = builder.accelerator
    main = acc.is_main_process
    records = JsonlStore(stage_dir / "candidates.jsonl", repair=False).records
    items, too_long = meta_items(records, stage)
    store = JsonlStore(stage_dir / "meta_judgements.jsonl", repair=main)  # one writer
    acc.wait_for_everyone()
    done = store.ids
    meta_judge = MetaJudge(
        builder.backend,
        builder.tokenizer,
        stage.meta_template or DEFAULT_META_TEMPLATE,
        config=stage.meta_judge_settings,
    )
    size = stage.chunk_size
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    todo = [c for c, chunk in enumerate(chunks) if any(it["id"] not in done for it in chunk)]
    bar = tqdm(
        total=len(items),
        initial=len(items) - sum(len(chunks[c]) for c in todo),
        desc=f"{_stage_slug(stage)}: meta-judge",
        unit="response",
        disable=not (builder.progress and main),
    )
    device = builder.device

    def work(c: int) -> list[dict]:
        generator = make_generator(derive_seed(builder.seed, builder.index, "meta", c), device)
        try:
            return _judge_chunk(meta_judge, chunks[c], c, generator)
        except ValueError as exc:  # a meta-judge prompt that does not fit the context
            raise ValueError(
                f"stage {builder.name}: the meta-judge: {exc}. In the stage: set "
                "meta_judge_settings.on_too_long: truncate_response, lower "
                "max_judgement_chars or meta_judge_settings.max_new_tokens (a rerun in "
                "the same run folder then judges the stage's candidates again)"
            ) from exc

    try:
        for parts in deal_rounds(acc, todo, work):
            fresh = [r for part in parts for r in part]
            if main:
                store.extend(fresh)
            bar.update(len(fresh))
    finally:
        bar.close()
    if main:
        _write_judge_pairs(builder, stage, items, store.records, actor_pairs, too_long)
    acc.wait_for_everyone()
    path = stage_dir / "judge_pairs.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_judge_pairs(
    builder: Any,
    stage: MetaRewardStage,
    items: list[dict],
    metas: list[dict],
    actor_pairs: list[dict],
    too_long: int,
) -> None:
    """Pair, balance and cap; write ``judge_pairs.jsonl`` and the statistics."""
    stage_dir: Path = builder.stage_dir
    by_id = {m["id"]: m for m in metas}
    candidates = [_judge_pair(by_id[it["id"]], it, builder.judge.reward_config) for it in items]
    candidates = [p for p in candidates if p is not None]
    rng = random.Random(derive_seed(builder.seed, builder.index, "judge-pairs"))
    room = judge_pair_room(len(actor_pairs), stage.max_judge_pair_share)
    fill = balance_by_score if stage.balance_judge_scores else cap_share
    pairs = fill(candidates, room, rng)
    text = "".join(json.dumps(p, sort_keys=True) + "\n" for p in pairs)
    atomic_write_text(stage_dir / "judge_pairs.jsonl", text)
    stats = json.loads((stage_dir / "stats.json").read_text())
    extra = _stats(
        [by_id[it["id"]] for it in items],
        pairs,
        len(actor_pairs),
        judgements_too_long=too_long,
        judge_pair_candidates=len(candidates),
        judge_pair_room=room,
        judge_pairs_dropped_by_cap=len(candidates) - len(pairs),
    )
    if extra["meta_outputs"] and extra["meta_parse_rate"] < stage.min_parse_rate:
        log.warning(
            "stage %s: the meta-judge's verdicts parsed for only %.1f%% of its outputs, so few "
            "judge pairs are built; give meta_template a verdict_template and labels that "
            "match what the model writes",
            builder.name,
            100 * extra["meta_parse_rate"],
        )
    if extra["meta_outputs"] and extra["meta_position_consistency"] < MIN_POSITION_CONSISTENCY:
        log.warning(
            "stage %s: the meta-judge picked the same judgement in both orders in only "
            "%.1f%% of its comparisons, so its verdicts mostly follow the position and the "
            "%d judge pairs are close to noise; sample more verdicts per order "
            "(meta_judge_settings.num_samples), let the meta-judge reason before its verdict "
            "(meta_template), or set max_judge_pair_share: 0",
            builder.name,
            100 * extra["meta_position_consistency"],
            len(pairs),
        )
    atomic_write_json(stage_dir / "stats.json", {**stats, **extra})
