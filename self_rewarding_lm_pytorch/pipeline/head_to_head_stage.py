"""A ``head_to_head`` stage's work: the policy's responses to the evaluation prompts
(``outputs.jsonl``), judged against a baseline's (``judgements.jsonl``), summarised as
:func:`~self_rewarding_lm_pytorch.head_to_head.summarize` does (``head_to_head.json``)
and exported for alpaca_eval (``alpaca_eval/``).

Both JSONL files are appended chunk by chunk, each chunk seeded by run seed, stage and
chunk, so a resumed stage samples and judges only what is missing and writes the same
files. Chunks are dealt round-robin to the ranks of a launch; the main process writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..generation import GenerationConfig, generate_text, response_budget
from ..head_to_head import alpaca_eval_rows, head_to_head, summarize
from ..judge import PairwiseJudge
from ..models import encode_response
from ..store import JsonlStore, atomic_write_json, read_jsonl
from ..utils import derive_seed, make_generator
from .chunks import deal_rounds
from .stages import HeadToHeadStage, Stage

__all__ = [
    "baseline_dataset",
    "preflight_head_to_head",
    "resolve_baseline",
    "run_head_to_head",
    "stage_judge",
]

#: the summary's keys a stage record (and the run report) carries
RECORD_KEYS = ("win_rate", "ci95", "lc_win_rate", "tie_rate", "judged", "items_total")
RECORD_KEYS += ("wins", "ties", "losses", "mean_chars_a", "mean_chars_b", "bootstrap_ci95")
_STAGE_NAME = re.compile(r"\d{2,}-[a-z0-9-]+")


def baseline_dataset(stage: HeadToHeadStage) -> str | None:
    """The dataset the stage's ``baseline`` names (None: ``"first"`` or a stage name)."""
    if stage.baseline == "first" or _STAGE_NAME.fullmatch(stage.baseline):
        return None
    return stage.baseline


def stage_judge(stage: HeadToHeadStage, judge: Any, name: str) -> Any:
    """The stage's judge: ``judge`` itself, or (``pairwise``) a :class:`PairwiseJudge` over
    the same model and tokenizer (the self judge with the stage's ``judge_settings``)."""
    if not stage.pairwise:
        return judge
    if not hasattr(judge, "backend") or not hasattr(judge, "tokenizer"):
        raise ValueError(
            f"stage {name}: pairwise: true needs an LLM judge (judge: self, or a judges: "
            f"entry of kind llm), but judge {stage.judge!r} is a {type(judge).__name__} "
            "without a model to prompt; set pairwise: false (it is then scored pointwise)"
        )
    settings = stage.judge_settings if stage.judge == "self" else judge.settings
    return PairwiseJudge(judge.backend, judge.tokenizer, config=settings)


def _reference(rows: list[Any], dataset: str, name: str) -> dict[str, str]:
    """A reference dataset's rows ``{prompt, response}`` as ``{prompt: response}``."""
    bad = [i for i, r in enumerate(rows) if not _reference_row(r)]
    if bad:
        raise ValueError(
            f"stage {name}: baseline dataset {dataset!r} row {bad[0]} is not {{prompt, "
            "response}} with two strings; give the reference outputs as such rows (e.g. "
            "srlm prepare oasst's ift_heldout.jsonl)"
        )
    return {r["prompt"]: r["response"] for r in rows}


def _reference_row(row: Any) -> bool:
    return isinstance(row, dict) and all(
        isinstance(row.get(k), str) for k in ("prompt", "response")
    )


def resolve_baseline(
    index: int,
    stages: Sequence[Stage],
    plan: Sequence[str],
    dirs: Sequence[Path],
    datasets: dict[str, Any],
) -> tuple[str, dict[str, str]] | None:
    """Stage ``index``'s baseline as ``(name, {prompt: response})``; None for the first
    head_to_head stage of a run when its baseline is ``"first"``."""
    stage = stages[index]
    dataset = baseline_dataset(stage)
    if dataset is not None:
        return dataset, _reference(list(datasets[dataset]), dataset, plan[index])
    if stage.baseline == "first":
        earlier = [j for j in range(index) if isinstance(stages[j], HeadToHeadStage)]
        if not earlier:
            return None
        j = earlier[0]
    else:
        j = list(plan).index(stage.baseline)  # check_plan: an earlier head_to_head stage
    rows = read_jsonl(dirs[j] / "outputs.jsonl")
    return plan[j], {r["prompt"]: r["response"] for r in rows}


def preflight_head_to_head(
    stage: HeadToHeadStage, name: str, prompts: list[str], datasets: dict[str, Any], judge: Any
) -> None:
    """What a head_to_head stage needs before a run: reference rows, a judge that can
    compare (``pairwise``), a self judge template that renders."""
    dataset = baseline_dataset(stage)
    if dataset is not None:
        _reference(list(datasets[dataset]), dataset, name)
    judge = stage_judge(stage, judge, name)
    config = getattr(judge, "config", None)
    if stage.judge == "self" and hasattr(config, "render"):
        try:
            config.render(prompts[0], "an example response")
        except Exception as exc:  # noqa: BLE001 - any template error, named
            raise ValueError(
                f"stage {name}: the judge template does not render ({exc}); fix "
                "reward_config.prompt_template (variables: {{ prompt }}, {{ response }})"
            ) from exc


def _chunked(
    path: Path, ids: list[str], size: int, acc: Any, work: Callable[[int], list[dict]]
) -> list[dict]:
    """A record per id in the JSONL file ``path``: ``work(c)`` makes chunk ``c`` (ids
    ``c * size`` on) when one of its records is missing. The records, in id order."""
    store = JsonlStore(path, repair=acc.is_main_process)  # one writer
    have = {r["id"]: r for r in store.records}
    acc.wait_for_everyone()  # every rank read the file before the main one appends
    chunks = [ids[c : c + size] for c in range(0, len(ids), size)]
    todo = [c for c, part in enumerate(chunks) if not all(i in have for i in part)]
    for parts in deal_rounds(acc, todo, work):
        fresh = [r for part in parts for r in part if r["id"] not in have]
        if acc.is_main_process:
            store.extend(fresh)
        have.update((r["id"], r) for r in fresh)
    return [have[i] for i in ids]


def run_head_to_head(
    ctx: Any,
    *,
    index: int,
    name: str,
    stage: HeadToHeadStage,
    stage_dir: Path,
    prompts: list[str],
    judge: Any,
    baseline: tuple[str, dict[str, str]] | None,
    device: Any,
) -> dict:
    """Sample the policy (``ctx``: the :class:`~.steps.StageContext`) on ``prompts``,
    judge its responses against ``baseline`` and write the stage's files; its record."""
    acc, tok, size = ctx.accelerator, ctx.tokenizer, stage.chunk_size
    prompts = prompts[: stage.max_prompts or len(prompts)]
    ids = [f"{index + 1}-{i}" for i in range(len(prompts))]
    context = getattr(ctx.backend, "max_seq_len", None)
    budgets = [
        response_budget(
            len(tok.encode(tok.format_prompt(p))),
            stage.max_new_tokens,
            context,
            cap=True,
            where=f"stage {name}, dataset {stage.prompts!r}: prompt {i}",
            fix="shorten or remove the prompt",
        )
        for i, p in enumerate(prompts)
    ]
    config = GenerationConfig(
        max_new_tokens=stage.max_new_tokens,
        temperature=stage.temperature,
        top_p=stage.top_p,
        eos_token_id=tok.eos_id,
    )

    def sample(c: int) -> list[dict]:
        part = range(c * size, min((c + 1) * size, len(prompts)))
        texts = generate_text(
            ctx.backend,
            tok,
            [prompts[i] for i in part],
            config,
            generator=make_generator(derive_seed(ctx.seed, index, "h2h", c), device),
            max_new_tokens_per_prompt=[budgets[i] for i in part],
        )
        return [
            {"id": ids[i], "chunk": c, "prompt": prompts[i], "response": t[0]}
            for i, t in zip(part, texts)
        ]

    outputs = _chunked(stage_dir / "outputs.jsonl", ids, size, acc, sample)
    record: dict[str, Any] = {"outputs": _rel(ctx, stage_dir / "outputs.jsonl"), "baseline": None}
    if baseline is None:  # the first head_to_head stage: its outputs are the baseline
        acc.wait_for_everyone()
        return record
    base_name, reference = baseline
    items = [o for o in outputs if o["prompt"] in reference]
    if not items:
        raise ValueError(
            f"stage {name}: none of its {len(outputs)} prompts (dataset {stage.prompts!r}) "
            f"has a response in the baseline {base_name!r}; give the baseline the same "
            "prompts (the same prompts dataset, or reference rows for them)"
        )

    def judged(c: int) -> list[dict]:
        part = items[c * size : (c + 1) * size]
        result = head_to_head(
            [o["prompt"] for o in part],
            [o["response"] for o in part],
            [reference[o["prompt"]] for o in part],
            judge,
            generator=make_generator(derive_seed(ctx.seed, index, "h2h-judge", c), device),
        )
        return [{"id": o["id"], "chunk": c, **row} for o, row in zip(part, result.items)]

    rows = _chunked(stage_dir / "judgements.jsonl", [o["id"] for o in items], size, acc, judged)
    summary = _summary(rows, tok, stage, seed=derive_seed(ctx.seed, index, "h2h-bootstrap"))
    summary.update(name_a=name, name_b=base_name)
    if acc.is_main_process:
        h2h = {**summary, "stage": name, "baseline": base_name, "judge_name": stage.judge}
        atomic_write_json(stage_dir / "head_to_head.json", h2h)
        q = [r["prompt"] for r in rows]
        for file, texts, who in (
            ("model_outputs.json", [r["response_a"] for r in rows], name),
            ("reference_outputs.json", [r["response_b"] for r in rows], base_name),
        ):
            atomic_write_json(stage_dir / "alpaca_eval" / file, alpaca_eval_rows(q, texts, who))
    acc.wait_for_everyone()  # the files are complete before any rank reads them
    record.update(
        baseline=base_name,
        judge=stage.judge,
        judgements=_rel(ctx, stage_dir / "judgements.jsonl"),
        head_to_head={k: summary[k] for k in RECORD_KEYS},
    )
    return record


def _summary(rows: list[dict], tok: Any, stage: HeadToHeadStage, *, seed: int) -> dict:
    """:func:`summarize` of the judged rows (``response_a``: the policy's)."""
    a, b = [r["response_a"] for r in rows], [r["response_b"] for r in rows]
    pairwise = "consistent" in rows[0]
    return summarize(
        [r["preference"] for r in rows],
        [len(x) for x in a],
        [len(x) for x in b],
        consistent=[r["consistent"] for r in rows] if pairwise else None,
        tokens_a=[len(encode_response(tok, x)) for x in a],
        tokens_b=[len(encode_response(tok, x)) for x in b],
        bootstrap=stage.bootstrap,
        bootstrap_seed=seed,
        judge="pairwise" if pairwise else "pointwise",
    ).to_dict()


def _rel(ctx: Any, path: Path) -> str:
    return str(path.relative_to(ctx.run_dir))
