"""A run's statistics and reports: per-stage judge/pair statistics, ``report.json``,
``report.md`` and the resolved ``config.yaml``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..store import atomic_write_json, atomic_write_text

__all__ = [
    "candidate_stats",
    "config_yaml",
    "head_to_head_table",
    "plain",
    "render_report_md",
    "write_report",
]


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
        from ..metrics import pairwise_accuracy

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


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON data: tensors as numbers, non-finite floats and objects as text."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
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
        for key in (
            "checkpoint",
            "pairs",
            "judge_pairs",
            "prompts",
            "eft",
            "outputs",
            "judgements",
        ):
            if rec.get(key):
                lines.append(f"- {key}: `{rec[key]}`")
        for section in ("stats", "metrics"):
            values = rec.get(section) or {}
            if values:
                lines += ["", f"| {section} | value |", "|---|---|"]
                for k, v in values.items():
                    v = f"{v:.4g}" if isinstance(v, float) else v
                    if isinstance(v, dict):  # e.g. an eft_build stage's score histogram
                        v = ", ".join(f"{a}: {b}" for a, b in v.items())
                    lines.append(f"| {k} | {v} |")
        lines.append("")
    return "\n".join(lines + head_to_head_table(report["stages"]))


def head_to_head_table(records: list[dict]) -> list[str]:
    """The "Head-to-head" section: a row per head_to_head stage that had a baseline."""
    rows = [r for r in records if r.get("head_to_head")]
    if not rows:
        return []

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["## Head-to-head", "", "| stage | vs | n | win rate [95% CI] | LC win rate | ties "
             "| mean chars A / B |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        h = r["head_to_head"]
        ci = f" [{pct(h['ci95'][0])}, {pct(h['ci95'][1])}]" if h.get("ci95") else ""
        chars = f"{h['mean_chars_a']:.1f} / {h['mean_chars_b']:.1f}"
        lines.append(
            f"| {r['stage']} | {r['baseline']} | {h['judged']} | {pct(h['win_rate'])}{ci} | "
            f"{pct(h['lc_win_rate'])} | {pct(h['tie_rate'])} | {chars} |"
        )
    return lines + [""]


def write_report(run_dir: Path, finished: list[dict], *, main: bool) -> dict:
    """The run report (every finished stage's record); the main process writes it as
    ``report.json`` and ``report.md`` in ``run_dir``."""
    report = {"run_dir": str(run_dir), "stages": finished}
    if main:
        atomic_write_json(run_dir / "report.json", report)
        atomic_write_text(run_dir / "report.md", render_report_md(report))
    return report


def config_yaml(
    *,
    seed: int,
    preference_max_seq_len: int,
    datasets: dict[str, Any],
    judges: dict[str, Any],
    reward_config: Any,
    stages: Sequence[Any],
) -> str:
    """The resolved configuration (defaults included), written once when a run starts."""
    import yaml

    reward = {k: v for k, v in to_dict(reward_config).items() if not k.startswith("_")}
    cfg = {
        "seed": seed,
        "preference_max_seq_len": preference_max_seq_len,
        "datasets": {name: len(data) for name, data in sorted(datasets.items())},
        "judges": sorted(judges),
        "reward_config": reward,
        "stages": [to_dict(s) for s in stages],
    }
    return yaml.safe_dump(cfg, sort_keys=False)
