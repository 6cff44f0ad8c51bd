"""The chunked generate -> judge -> pair loop of a preference stage, and its stop rules.

:class:`PairBuilder` samples candidates for a chunk of prompts, has the judge score
them and forms preference pairs, appending every record to JSONL as it is made (so an
interrupted stage resumes without losing or repeating one). It stops with
:class:`JudgeParseError` when the judge's outputs cannot be parsed often enough, and with
:class:`NotEnoughPairsError` when the prompts run out or the judge gives no signal.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..generation import GenerationBackend, GenerationConfig, generate_text, response_budget
from ..generation.selection import usage_delta
from ..models import Tokenizer
from ..pairs import select_pairs
from ..store import JsonlStore, atomic_write_json
from ..utils import derive_seed, make_generator
from .anchors import add_anchors, anchored_choice
from .chunks import deal_rounds
from .report import candidate_stats
from .stages import START_AFRESH, PreferenceStage, _stage_slug

__all__ = ["MIN_TIED_PROMPTS", "JudgeParseError", "NotEnoughPairsError", "PairBuilder"]

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
        "change of the judge alone (reward_config, judge_settings), rerunning in the same "
        "run folder sets these judgements aside and judges the candidates again; other "
        f"changes need {START_AFRESH}."
    )


def prompt_budgets(
    name: str,
    stage: PreferenceStage,
    prompts: list[str],
    dataset: str,
    tokenizer: Tokenizer,
    max_seq_len: int | None,
    preference_max_seq_len: int,
) -> list[int]:
    """Each prompt's limit on new tokens: the stage's ``max_new_tokens`` must fit the
    model's context (``max_seq_len``) with the prompt; ``preference_max_seq_len`` (the DPO
    length bound) caps it."""
    budgets = []
    for i, p in enumerate(prompts):
        n = len(tokenizer.encode(tokenizer.format_prompt(p)))
        where = f"stage {name}, dataset {dataset!r}: prompt {i}"
        budget = response_budget(
            n,
            stage.max_new_tokens,
            max_seq_len,
            where=where,
            fix="shorten or remove the prompt, or lower the stage's max_new_tokens",
        )
        budgets.append(
            response_budget(
                n,
                budget,
                preference_max_seq_len,
                cap=True,
                where=where,
                context_name="preference_max_seq_len",
                fix="shorten or remove the prompt, or raise preference_max_seq_len",
            )
        )
    return budgets


@dataclass
class PairBuilder:
    """Builds one preference stage's pairs in ``stage_dir`` (``name`` is its plan name,
    ``index`` its position: both seed the chunks and name the records). Candidates are
    sampled through ``backend``; each chunk's generator lives on ``device``."""

    name: str
    index: int
    stage: PreferenceStage
    stage_dir: Path
    backend: GenerationBackend
    device: Any
    tokenizer: Tokenizer
    judge: Any
    accelerator: Any
    seed: int
    oracle: Any = None
    progress: bool = True
    #: samples the anchor responses of ``rejected_from`` (a frozen earlier model), or None
    anchor: GenerationBackend | None = None
    #: the stage's judge health record (``judge_health.json``), added to its stats
    health: dict | None = None
    #: what the backends that keep ``.usage`` counters used in this launch, by role
    usage: dict[str, dict[str, int]] = field(default_factory=dict)

    def _count(self, role: str, backend: Any, before: dict[str, int] | None) -> None:
        if before is None:
            return
        used = self.usage.setdefault(role, {})
        for key, n in usage_delta(before, dict(backend.usage)).items():
            used[key] = used.get(key, 0) + n

    def _gathered_usage(self) -> dict[str, dict[str, int]]:
        """Every rank's usage, summed (each rank samples with its own backend)."""
        if self.accelerator.num_processes == 1:
            return self.usage
        from accelerate.utils import gather_object

        total: dict[str, dict[str, int]] = {}
        for part in gather_object([self.usage]):
            for role, counts in part.items():
                for key, n in counts.items():
                    total.setdefault(role, {})[key] = total.get(role, {}).get(key, 0) + n
        return total

    def build(self, prompts: list[str], budgets: list[int]) -> list[dict]:
        """Generate, judge and pair, chunk by chunk, appending records as they are made.

        Each chunk's randomness is seeded by (run seed, stage, chunk), so a resumed run
        regenerates an interrupted chunk exactly and appends only its missing records.
        With several processes, chunks are dealt round-robin to the ranks; every round's
        records are gathered, and the main process writes them in chunk order up to the
        chunk that reaches the target (where one process stops), so the files do not
        depend on the number of processes.
        """
        index, stage, stage_dir = self.index, self.stage, self.stage_dir
        acc = self.accelerator
        main = acc.is_main_process
        candidates = JsonlStore(stage_dir / "candidates.jsonl", repair=main)  # one writer
        pair_store = JsonlStore(stage_dir / "pairs.jsonl", repair=main)
        records = candidates.records  # every rank reads the same files at the start
        pairs = pair_store.records
        acc.wait_for_everyone()
        done_ids = {r["id"] for r in records}
        target = stage.num_preference_pairs
        max_prompts = prompts_tried(stage, prompts)
        gen_config = candidate_config(stage, self.tokenizer.eos_id)

        def add(new_records: list[dict]) -> None:
            new_pairs = []
            for record in new_records:
                new_pairs += pairs_of(record, stage, target - len(pairs) - len(new_pairs))
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
            lost = [p for p in pairs_of(record, stage, target) if p["id"] not in have]
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
        rounds = deal_rounds(
            acc,
            todo,
            lambda c: self.judge_chunk(c, chunk_ids[c], prompts, gen_config, done_ids, budgets),
            stop=lambda: len(pairs) >= target,
        )
        try:
            for parts in rounds:
                for part in parts:  # in chunk order, as one process makes them
                    if len(pairs) >= target:
                        break  # one process stops after the chunk that reached the target
                    before = len(pairs)
                    add(part)
                    bar.update(min(len(pairs), target) - min(before, target))
                    check_parse_rate(self.name, stage, records)
                    check_ties(self.name, stage, stage_dir, records, pairs, max_prompts)
        finally:
            bar.close()
        stats = candidate_stats(records, pairs)
        usage = self._gathered_usage()
        if usage:
            stats["usage"] = usage
        if self.health is not None:
            stats["judge_health"] = self.health
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
                f"with {START_AFRESH}."
            )
        return pairs[:target]

    def judge_chunk(
        self,
        chunk_index: int,
        ids: list[str],
        prompts: list[str],
        gen_config: GenerationConfig,
        done_ids: set[str],
        budgets: list[int],
    ) -> list[dict]:
        """Candidates for one chunk of prompts, judged; one record per prompt.

        ``budgets[i]`` is prompt ``i``'s limit on new tokens (see :func:`prompt_budgets`).
        """
        stage = self.stage
        positions = [int(i.rsplit("-", 1)[1]) for i in ids]
        chunk_prompts = [prompts[i] for i in positions]
        generator = make_generator(derive_seed(self.seed, self.index, chunk_index), self.device)
        judge_backend = getattr(self.judge, "backend", None)
        before = _snapshot(self.backend)
        responses = generate_text(
            self.backend,
            self.tokenizer,
            chunk_prompts,
            gen_config,
            generator=generator,
            max_new_tokens_per_prompt=[budgets[i] for i in positions],
        )
        self._count("candidates", self.backend, before)
        flat_prompts = [p for p, rs in zip(chunk_prompts, responses) for _ in rs]
        flat_responses = [r for rs in responses for r in rs]
        before = _snapshot(judge_backend)
        results = self.judge.score(flat_prompts, flat_responses, generator=generator)
        self._count("judge", judge_backend, before)
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
        if self.anchor is not None and out:  # rejected_from: the frozen model's candidates
            seed = derive_seed(self.seed, self.index, chunk_index, "anchor")
            before = _snapshot(judge_backend)
            add_anchors(
                out,
                self.anchor,
                self.tokenizer,
                self.judge,
                gen_config,
                budgets=[budgets[int(r["id"].rsplit("-", 1)[1])] for r in out],
                generator=make_generator(seed, self.device),
                oracle=self.oracle,
            )
            self._count("judge", judge_backend, before)
        return out


def candidate_config(stage: PreferenceStage, eos_id: int | None) -> GenerationConfig:
    """How the stage samples its ``num_candidates`` candidates per prompt."""
    return GenerationConfig(
        max_new_tokens=stage.max_new_tokens,
        temperature=stage.temperature,
        top_p=stage.top_p,
        top_k=stage.top_k,
        min_p=stage.min_p,
        eos_token_id=eos_id,
        num_return_sequences=stage.num_candidates,
    )


def _snapshot(backend: Any) -> dict[str, int] | None:
    """A copy of a backend's ``usage`` counters (None: it keeps none)."""
    usage = getattr(backend, "usage", None)
    return dict(usage) if isinstance(usage, dict) else None


def prompts_tried(stage: PreferenceStage, prompts: list[str]) -> int:
    """How many of ``prompts`` the stage may try: ``max_prompts``, or every prompt once."""
    return min(stage.max_prompts or len(prompts), len(prompts))


def pairs_of(record: dict, stage: PreferenceStage, room: int) -> list[dict]:
    """At most ``room`` preference pairs from one judged record (TRL columns + scores)."""
    if room <= 0:
        return []
    # anchored (rejected_from): the rejected side is the frozen model's candidates
    anchored = "anchor_responses" in record
    side, tag = ("anchor_", "anchor") if anchored else ("", "")
    origin = {"chosen_from": "policy", "rejected_from": stage.rejected_from} if anchored else {}
    chosen_rejected = (
        anchored_choice(record, stage)
        if anchored
        else select_pairs(
            record["responses"],
            record["scores"],
            strategy=stage.pair_strategy,
            margin=stage.pair_margin,
            length_tolerance=stage.length_tolerance,
        )
    )
    return [
        {
            "id": f"{record['id']}/{c}-{tag}{r}",
            "prompt_id": record["id"],
            "prompt": record["prompt"],
            "chosen": record["responses"][c],
            "rejected": record[f"{side}responses"][r],
            "chosen_index": c,
            "rejected_index": r,
            **origin,
            "score_chosen": record["scores"][c],
            "score_rejected": record[f"{side}scores"][r],
        }
        for c, r in chosen_rejected[:room]
    ]


def check_parse_rate(name: str, stage: PreferenceStage, records: list[dict]) -> None:
    """Stop with :class:`JudgeParseError` when too few judge outputs parse."""
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


def check_ties(
    name: str,
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
        f"stage {name}: the judge gives no signal: on each of the first "
        f"{len(scored)} judged prompts it gave every candidate the same score (scores "
        f"seen: {shown}), so no preference pair can be formed, and judging the other "
        f"{max_prompts - len(records)} prompts would not change that. Check the judge: "
        "an external judge must score different responses differently; with judge='self', "
        "fine-tune the model on EFT (judge) examples first, or use a reward_config whose "
        "scale the model uses. The records judged so far are kept in "
        f"{stage_dir}."
    )
