"""The run directory's records of a run: ``state.json``, the stages' fingerprints and
what happens to a stage's records when its settings change between launches.

A stage that finished or wrote records must keep its settings (its fingerprint, stored in
``state.json``); one whose only change is its judge, and that has not finished, has its
judged records set aside and is judged again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fingerprint import changed_keys, dataset_digest, flatten, identity
from ..store import RunDirError
from .stages import (
    _FREE_STAGE_KEYS,
    _FREE_TRAINER_KEYS,
    _JUDGE_KEYS,
    START_AFRESH,
    EFTBuildStage,
    HeadToHeadStage,
    PreferenceStage,
    PromptGenerationStage,
    SFTStage,
    SPINStage,
    Stage,
)

__all__ = ["check_fingerprints", "load_state", "set_aside_interrupted_metrics", "stage_fingerprint"]

log = logging.getLogger(__name__)


def load_state(path: Path) -> dict:
    """The run state in ``path`` (``state.json``): ``{"finished": [...], ...}``; a fresh
    one when the file does not exist."""
    if not path.exists():
        return {"finished": []}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RuntimeError(
            f"{path} is not valid JSON ({exc}); it records which stages "
            "finished. Restore it from a backup, or delete it to run every stage again "
            "(records already in the stage folders are reused)"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("finished"), list):
        raise RuntimeError(
            f"{path} does not hold a run state (no 'finished' list); delete it "
            "to run every stage again, or point checkpoints_folder elsewhere"
        )
    return state


def stage_fingerprint(
    stage: Stage,
    *,
    run: dict[str, Any],
    datasets: dict[str, Any],
    models: dict[str, Any],
    judges: dict[str, Any],
    reward_config: Any,
    oracle: Any,
    early_stopper_eval_module: Any,
    preference_max_seq_len: int,
    generation: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """What shapes the stage's output, as flat ``{key: value}`` maps: ``settings``
    (resolved stage settings with defaults, trainer arguments, the ``run``-wide settings
    such as seed, mixed precision, model and tokenizer, data identities, and the sampling
    backend's ``generation`` settings that change samples) and, for preference stages,
    ``judge`` (the judge's settings, template and regex, or the external judge's identity)."""
    raw = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}
    raw.pop("generation", None)  # the stage's override; the resolved backend is `generation`
    if generation:
        raw["generation"] = generation
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
            raw["generator_identity"] = models[stage.generator_model]
    elif isinstance(stage, EFTBuildStage):
        data = [stage.inputs]
        judge["reward_config"] = reward_config
    elif isinstance(stage, HeadToHeadStage):  # a baseline stage's outputs: its fingerprint
        data = [stage.prompts, stage.baseline]
        if stage.judge == "self":
            judge["reward_config"] = reward_config
        else:
            judge["judge_identity"] = judges[stage.judge]
    else:
        data = [n for n in (stage.prompts, stage.replay) if n not in (None, "generated")]
        if stage.judge == "self":
            judge["reward_config"] = reward_config
        else:
            judge["judge_identity"] = judges[stage.judge]
        judge["oracle"] = oracle
        raw["early_stopper_eval_module"] = early_stopper_eval_module
    if isinstance(stage, (SPINStage, PreferenceStage)):
        raw["preference_max_seq_len"] = preference_max_seq_len
    settings = {
        **raw,
        "trainer": trainer,
        **run,
        "data": {n: dataset_digest(datasets[n]) for n in data if n in datasets},
    }
    out = {"settings": flatten(identity(settings))}
    if judge:
        out["judge"] = flatten(identity(judge))
    return out


def stage_defaults(stage: Stage) -> dict[str, dict[str, Any]]:
    """The stage's settings at their defaults, keyed as :func:`stage_fingerprint` keys
    them: what a run directory written before a setting existed did."""
    raw = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(stage)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    for key in ("trainer", "generation", *_FREE_STAGE_KEYS):
        raw.pop(key, None)
    judge = {k: raw.pop(k) for k in _JUDGE_KEYS if k in raw}
    return {"settings": flatten(identity(raw)), "judge": flatten(identity(judge))}


def check_fingerprints(
    state: dict,
    fingerprints: Sequence[dict],
    stage_dirs: Sequence[Path],
    defaults: Sequence[dict] | None = None,
) -> None:
    """Refuse changed settings of a stage that finished or has records; a stage whose
    only change is its judge, and that has not finished, has its judgements set aside
    and is judged again. Stages not yet started may change freely. ``fingerprints[i]``
    is stage ``i``'s :func:`stage_fingerprint`; ``state["fingerprints"]`` is updated.
    A setting the stored fingerprint lacks (the library gained it later) counts as
    unchanged when it is at its default in ``defaults[i]`` (:func:`stage_defaults`)."""
    stored = state.setdefault("fingerprints", {})
    finished = {r["stage"] for r in state["finished"]}
    defaults = list(defaults) if defaults is not None else [{}] * len(fingerprints)
    for name, new, stage_dir, default in zip(state["plan"], fingerprints, stage_dirs, defaults):
        old = stored.get(name)
        done = name in finished
        if old is not None and (done or _has_records(stage_dir)):
            groups = sorted(set(old) | set(new))
            diffs = {
                g: changed_keys(old.get(g, {}), _added_at_default(old, new, default, g))
                for g in groups
            }
            settings = [d for g in groups if g != "judge" for d in diffs[g]]
            judge = diffs.get("judge", [])
            if settings or (judge and done):
                raise RunDirError(_changed_settings_message(name, done, settings + judge))
            if judge:
                _set_aside_judgements(stage_dir, name, judge)
        stored[name] = new


def _added_at_default(old: dict, new: dict, defaults: dict, group: str) -> dict[str, Any]:
    """``new[group]`` without the keys ``old[group]`` lacks whose value is their default."""
    before, base = old.get(group, {}), defaults.get(group, {})
    missing = object()
    return {k: v for k, v in new.get(group, {}).items() if k in before or base.get(k, missing) != v}


def _has_records(stage_dir: Path) -> bool:
    """Whether an unfinished stage already wrote records (candidates, pairs, prompts)."""
    names = ("candidates.jsonl", "pairs.jsonl", "prompts.jsonl", "judgements.jsonl")
    names += ("outputs.jsonl",)  # a head_to_head stage's
    return any((stage_dir / n).is_file() and (stage_dir / n).stat().st_size > 0 for n in names)


def _changed_settings_message(name: str, finished: bool, changes: list[str]) -> str:
    how = "finished" if finished else "was interrupted after writing records"
    return (
        f"stage {name} {how} with other settings than this run gives it: "
        f"{'; '.join(changes)}. Resuming would mix results of both settings, so nothing was "
        "run. Either restore those settings to resume the run, or start it afresh: "
        f"{START_AFRESH}"
    )


def _set_aside_judgements(stage_dir: Path, name: str, changes: list[str]) -> None:
    """Only the judge of an unfinished preference stage changed: move its judged records
    to ``stale-judge-<k>/`` so the stage samples the same candidates and judges them anew."""
    k = 1
    while (stage_dir / f"stale-judge-{k}").exists():
        k += 1
    aside = stage_dir / f"stale-judge-{k}"
    aside.mkdir()
    judged = ("candidates.jsonl", "pairs.jsonl", "judgements.jsonl", "stats.json")
    for file in (*judged, "meta_judgements.jsonl", "judge_pairs.jsonl"):
        if (stage_dir / file).exists():
            (stage_dir / file).rename(aside / file)
    log.warning(
        "stage %s: the judge changed (%s); its judged candidates are set aside in %s and "
        "judged again with the new judge",
        name,
        "; ".join(changes),
        aside,
    )


def set_aside_interrupted_metrics(stage_dir: Path) -> None:
    """A stage rerun after a crash starts its metrics afresh; the interrupted attempt's
    lines are kept beside it as ``metrics.interrupted-<k>.jsonl``."""
    metrics = stage_dir / "metrics.jsonl"
    if metrics.exists():
        k = 1
        while (stage_dir / f"metrics.interrupted-{k}.jsonl").exists():
            k += 1
        metrics.rename(stage_dir / f"metrics.interrupted-{k}.jsonl")
