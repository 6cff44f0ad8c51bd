"""The demo's report: ``report.json``, ``report.md``, ``report.png`` and the printed table.

Every number comes from the report dictionary that :func:`~.run.run_demo` builds from the
files of the run (the models' greedy outputs under ``eval/``, the pipeline's candidate and
pair files); nothing here is typed in by hand.  :func:`aggregate` combines the reports of
several seeds into the mean / spread table of ``docs/demo.md``::

    python -m self_rewarding_lm_pytorch.demo.report runs/demo-s0 runs/demo-s1 runs/demo-s2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..store import atomic_write_json, atomic_write_text
from .task import CRITERIA

__all__ = [
    "BAR_FULLY_CORRECT",
    "BAR_JUDGE_DROP",
    "aggregate",
    "model_names",
    "ordered_models",
    "plot",
    "render_aggregate",
    "render_markdown",
    "render_table",
    "summarize",
    "write_report",
]

BAR_FULLY_CORRECT = 10.0
"""Issue 6: the last model's (M3 by default) % fully correct must beat M1's by at least
this many points."""
BAR_JUDGE_DROP = 2.0
"""Issue 6: the last model's judge pairwise accuracy may fall at most this many points below
M1's."""
_NAMED_ARMS = ("oracle", "self", "random")
"""The arms the issue's checks name; their ``*_clears_bar`` keys are always present."""


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def model_names(report: dict[str, Any], arm: str) -> list[str]:
    """The report keys of ``arm``'s models in order: ``M1``, ``<arm>/M2``, ``<arm>/M3``..."""
    names = ["M1"]
    t = 2
    while f"{arm}/M{t}" in report["models"]:
        names.append(f"{arm}/M{t}")
        t += 1
    return names


def ordered_models(report: dict[str, Any]) -> list[str]:
    """Every model of the report in display order: ``M1``, then each arm's M2, M3, ..."""
    names = ["M1"] if "M1" in report["models"] else []
    for arm in report["arms"]:
        names += [n for n in model_names(report, arm) if n != "M1"]
    return names


# ====================================================================== summary


def _checks(
    report_arms: Sequence[str],
    delta_fc: dict[str, float],
    delta_pa: dict[str, float],
    last: dict[str, float],
) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for arm in dict.fromkeys((*_NAMED_ARMS, *report_arms)):
        checks[f"{arm}_clears_bar"] = (
            delta_fc[arm] >= BAR_FULLY_CORRECT if arm in delta_fc else None
        )
    checks["self_judge_kept"] = delta_pa["self"] >= -BAR_JUDGE_DROP if "self" in delta_pa else None
    checks["controls_ordered"] = (
        last["oracle"] >= last["self"] >= last["random"]
        if all(a in last for a in _NAMED_ARMS)
        else None
    )
    return checks


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per-arm series over M1 ... M_{T+1} and the issue's checks, read from ``report``.

    ``checks`` (``None`` where an arm did not run), on each arm's last model:
    ``<arm>_clears_bar`` for every arm (% fully correct >= M1 + 10 points),
    ``self_judge_kept`` (judge pairwise accuracy >= M1's - 2 points), ``controls_ordered``
    (oracle >= self >= random).
    """
    models = report["models"]
    arms: dict[str, Any] = {}
    for arm in report["arms"]:
        if arm not in report.get("iterations", {}):
            continue
        names = model_names(report, arm)
        fc = [models[n]["task"]["pct_fully_correct"] for n in names]
        pa = [100.0 * models[n]["judge"]["pairwise_accuracy"] for n in names]
        its = report["iterations"][arm]
        arms[arm] = {
            "models": names,
            "pct_fully_correct": fc,
            "mean_score": [models[n]["task"]["mean_score"] for n in names],
            "mean_response_length": [models[n]["task"]["mean_response_length"] for n in names],
            "judge_pairwise_accuracy_pct": pa,
            "judge_parse_rate": [models[n]["judge"]["parse_rate"] for n in names],
            "on_policy_judge_pairwise_accuracy_pct": [
                100.0 * it["judge_pairwise_accuracy_on_policy"] for it in its
            ],
            "pairs_oracle_correct_pct": [100.0 * it["pairs_oracle_correct"] for it in its],
            "model_judge": any("verdicts" in it for it in its),
            "delta_fully_correct": fc[-1] - fc[0],
            "delta_judge_pairwise_accuracy": pa[-1] - pa[0],
        }
        if all("meta_judge" in models[n] for n in names):
            arms[arm]["meta_judge_accuracy_pct"] = [
                100.0 * models[n]["meta_judge"]["accuracy"] for n in names
            ]
    checks = _checks(
        report["arms"],
        {arm: a["delta_fully_correct"] for arm, a in arms.items()},
        {arm: a["delta_judge_pairwise_accuracy"] for arm, a in arms.items()},
        {arm: a["pct_fully_correct"][-1] for arm, a in arms.items()},
    )
    return {"arms": arms, "checks": checks}


# ====================================================================== text


def render_table(report: dict[str, Any]) -> str:
    """The results table printed at the end of a run (Markdown)."""
    names = ordered_models(report)
    meta = bool(names) and all("meta_judge" in report["models"][n] for n in names)
    header = (
        "| model | mean score | % fully correct | mean length | judge pairwise acc | "
        "exact match | Spearman | Kendall tau | parse rate |"
    )
    header += " meta-judge acc | meta position consistency |" if meta else ""
    lines = [header, "|" + "---|" * (11 if meta else 9)]
    for name in names:
        m = report["models"][name]
        t, j = m["task"], m["judge"]
        row = (
            f"| {name} | {_fmt(t['mean_score'], 2)} | {_fmt(t['pct_fully_correct'])} | "
            f"{_fmt(t['mean_response_length'], 2)} | {_fmt(j['pairwise_accuracy'], 3)} | "
            f"{_fmt(j['exact_match'], 3)} | {_fmt(j['spearman'], 3)} | "
            f"{_fmt(j['kendall_tau'], 3)} | {_fmt(j['parse_rate'], 3)} |"
        )
        if meta:
            mj = m["meta_judge"]
            row += f" {_fmt(mj['accuracy'], 3)} | {_fmt(mj['position_consistency'], 3)} |"
        lines.append(row)
    return "\n".join(lines)


def _criteria_table(report: dict[str, Any]) -> list[str]:
    cols = [c for c in CRITERIA]
    lines = [
        "| model | " + " | ".join(f"% {c}" for c in cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for name in ordered_models(report):
        sat = report["models"][name]["task"]["pct_satisfied"]
        lines.append(f"| {name} | " + " | ".join(_fmt(sat.get(c)) for c in cols) + " |")
    return lines


def _iteration_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| arm | iteration | prompts | pairs | candidates % fully correct | judge parse rate | "
        "judge pairwise acc (on policy) | pairs oracle-correct | tied | inverted |",
        "|" + "---|" * 10,
    ]
    for arm in report["arms"]:
        for t, it in enumerate(report["iterations"].get(arm, []), start=1):
            lines.append(
                f"| {arm} | {t} | {it['prompts']} | {it['pairs']} | "
                f"{_fmt(it['candidates_pct_fully_correct'])} | {_fmt(it['judge_parse_rate'], 3)} | "
                f"{_fmt(it['judge_pairwise_accuracy_on_policy'], 3)} | "
                f"{_fmt(it['pairs_oracle_correct'], 3)} | {_fmt(it['pairs_oracle_tied'], 3)} | "
                f"{_fmt(it['pairs_oracle_inverted'], 3)} |"
            )
    return lines


def _verdict_tables(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    rows = []
    for arm in report["arms"]:
        for t, it in enumerate(report["iterations"].get(arm, []), start=1):
            if "verdicts" in it:
                rows.append((f"{arm} iteration {t} (own candidates, M{t} judging)", it["verdicts"]))
    for name in ordered_models(report):
        rows.append((f"{name} (held-out judge set)", report["models"][name]["judge"]["verdicts"]))
    if not rows:
        return lines
    lines += [
        "Each cell: verdict accuracy / failure recall (of the verdicts the oracle says fail, "
        "the fraction the judge flagged as failing). A criterion whose failure recall falls "
        "on the policy's own candidates is a blind spot the policy can exploit.",
        "",
        "| judged set | all | " + " | ".join(CRITERIA) + " |",
        "|" + "---|" * (len(CRITERIA) + 2),
    ]
    for label, v in rows:
        per = v["per_criterion"]
        cells = [
            f"{_fmt(per[c]['accuracy'], 3)} / {_fmt(per[c]['fail_recall'], 3)}" if c in per else "-"
            for c in CRITERIA
        ]
        lines.append(f"| {label} | {_fmt(v['accuracy'], 3)} | " + " | ".join(cells) + " |")
    return lines


def _last_label(arms: dict[str, Any]) -> str:
    """``M<k>``: the last model of the arm with the most iterations (M3 by default)."""
    return f"M{max((len(a['pct_fully_correct']) for a in arms.values()), default=1)}"


def _other_arm_checks(checks: dict[str, Any], arms: Sequence[str]) -> list[str]:
    """The bar check of every arm the issue does not name, one line each."""
    return [
        f"- {arm} gains at least {BAR_FULLY_CORRECT:g} points: {_fmt(checks[f'{arm}_clears_bar'])}"
        for arm in arms
        if arm not in _NAMED_ARMS
    ]


def _checks_lines(summary: dict[str, Any]) -> list[str]:
    last = _last_label(summary["arms"])
    lines = [
        f"| arm | % fully correct M1 -> {last} | change | judge pairwise acc M1 -> {last} (%) "
        "| change |",
        "|---|---|---|---|---|",
    ]
    for arm, a in summary["arms"].items():
        fc, pa = a["pct_fully_correct"], a["judge_pairwise_accuracy_pct"]
        lines.append(
            f"| {arm} | {' -> '.join(_fmt(x) for x in fc)} | {a['delta_fully_correct']:+.1f} | "
            f"{' -> '.join(_fmt(x) for x in pa)} | {a['delta_judge_pairwise_accuracy']:+.1f} |"
        )
    c = summary["checks"]
    lines += [
        "",
        f"- oracle pairs gain at least {BAR_FULLY_CORRECT:g} points ({last} >= M1 + "
        f"{BAR_FULLY_CORRECT:g} % fully correct): {_fmt(c['oracle_clears_bar'])}",
        f"- self-reward gains at least {BAR_FULLY_CORRECT:g} points: {_fmt(c['self_clears_bar'])}",
        f"- self-reward judge kept ({last} pairwise accuracy >= M1 - {BAR_JUDGE_DROP:g} "
        f"points): {_fmt(c['self_judge_kept'])}",
        f"- controls ordered at {last} (oracle >= self >= random): {_fmt(c['controls_ordered'])}",
    ]
    return lines + _other_arm_checks(c, summary["arms"])


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: results, headroom, iterations, per-criterion tables, timings."""
    cfg = report["config"]
    h = report["headroom"]
    n = h["samples_per_prompt"]
    lines = [
        f"# srlm demo report (seed {report['seed']}{', quick' if report['quick'] else ''})",
        "",
        f"Model: {report['model_parameters']:,} parameters (dim {cfg['model']['dim']}, "
        f"depth {cfg['model']['depth']}). SFT: {cfg['n_ift']} IFT + {cfg['n_eft']} EFT, "
        f"{cfg['sft_steps']} steps of {cfg['sft_batch_size']}. Each iteration: "
        f"{cfg['pairs_per_iteration']} pairs from {cfg['num_candidates']} candidates at "
        f"T={cfg['candidate_temperature']}; self judge: {cfg['judge_samples']} samples, "
        f"mode {cfg['judge_mode']}. Held-out: {cfg['n_eval_prompts']} prompts (greedy), "
        f"{cfg['n_judge_eval_prompts']} x {cfg['judge_eval_responses']} judge examples.",
        "",
        "## Arms",
        "",
        *[f"- {arm}: {desc}" for arm, desc in report.get("arm_descriptions", {}).items()],
        "",
        "## Results (held-out)",
        "",
        render_table(report),
        "",
        f"## M1 -> {_last_label(report['summary']['arms'])} against the demo's goals",
        "",
        *_checks_lines(report["summary"]),
        "",
        "## Headroom of M1",
        "",
        f"On {h['n_prompts']} held-out prompts, {n} samples at T={cfg['candidate_temperature']}: "
        f"pass@1 {_fmt(100 * h['pass_at_1'])}%, pass@{n} {_fmt(100 * h['pass_at_n'])}% "
        f"(greedy: {_fmt(report['models']['M1']['task']['pct_fully_correct'])}%).",
        "",
        "## Per-criterion satisfaction (% of held-out prompts asking it, greedy)",
        "",
        *_criteria_table(report),
        "",
        "## Iterations (from candidates.jsonl and pairs.jsonl)",
        "",
        *_iteration_table(report),
        "",
        "## Judge verdicts per criterion",
        "",
        *_verdict_tables(report),
        "",
    ]
    if report["failures"]:
        lines += ["## Arms that stopped early", ""]
        lines += [f"- {arm}: {msg}" for arm, msg in report["failures"].items()]
        lines.append("")
    lines += [
        "## Timings",
        "",
        f"torch threads {report['machine']['torch_threads']}, "
        f"{report['machine']['cpu_count']} CPUs, load average at the end "
        f"{report['machine']['load_average_at_end']}.",
        "",
        "| phase | wall s | process CPU s |",
        "|---|---|---|",
    ]
    order = ["data", "sft", "eval M1"]
    order += [p for arm in report["arms"] for p in (f"arm {arm}", f"eval {arm}")]
    phases = [p for p in order if p in report["timings"]]
    phases += sorted(p for p in report["timings"] if p not in order and p != "total")
    for phase in [*phases, "total"]:
        t = report["timings"][phase]
        lines.append(f"| {phase} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} |")
    lines.append("")
    return "\n".join(lines)


# ====================================================================== plot


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """``report.png``: % fully correct and judge pairwise accuracy (held-out, solid; on the
    policy's own candidates, dashed) per iteration, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"self": "tab:blue", "oracle": "tab:green", "random": "tab:gray"}
    spare = iter(("tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive"))
    for arm, a in summary["arms"].items():
        xs = list(range(1, len(a["pct_fully_correct"]) + 1))
        c = colors.get(arm) or next(spare, None)
        ax1.plot(xs, a["pct_fully_correct"], "o-", color=c, label=arm)
        ax2.plot(xs, a["judge_pairwise_accuracy_pct"], "o-", color=c, label=f"{arm} (held-out)")
        on_policy = a["on_policy_judge_pairwise_accuracy_pct"]
        if a.get("model_judge") and on_policy:
            ax2.plot(
                xs[: len(on_policy)], on_policy, "s--", color=c, label=f"{arm} (own candidates)"
            )
    for ax, title in (
        (ax1, "held-out prompts: % fully correct (greedy)"),
        (ax2, "judge pairwise accuracy (%)"),
    ):
        n = max((len(a["pct_fully_correct"]) for a in summary["arms"].values()), default=1)
        ax.set_xticks(list(range(1, n + 1)), [f"M{i}" for i in range(1, n + 1)])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"srlm demo, seed {report['seed']}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: str | Path, report: dict[str, Any]) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out``."""
    out = Path(out)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], render_markdown(report))
    plot(report, paths["png"])
    return paths


# ====================================================================== several seeds


def _spread(xs: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "values": list(xs),
    }


def aggregate(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of each arm's M1 ... M_{T+1} % fully correct and judge
    pairwise accuracy, their last - M1 changes, each arm's paired difference to the self
    arm (``vs_self``), and the issue's checks on the means (for every arm that all
    ``reports`` ran, in the first report's order)."""
    if not reports:
        raise ValueError("no reports to aggregate; pass at least one run directory")
    seeds = [r["seed"] for r in reports]
    arms: dict[str, Any] = {}
    for arm in dict.fromkeys(a for r in reports for a in r["summary"]["arms"]):
        runs = [r["summary"]["arms"][arm] for r in reports if arm in r["summary"]["arms"]]
        if len(runs) != len(reports):
            continue
        k = min(len(a["pct_fully_correct"]) for a in runs)
        arms[arm] = {
            "pct_fully_correct": [
                _spread([a["pct_fully_correct"][i] for a in runs]) for i in range(k)
            ],
            "judge_pairwise_accuracy_pct": [
                _spread([a["judge_pairwise_accuracy_pct"][i] for a in runs]) for i in range(k)
            ],
            "on_policy_judge_pairwise_accuracy_pct": [
                _spread([a["on_policy_judge_pairwise_accuracy_pct"][i] for a in runs])
                for i in range(k - 1)
            ],
            "pairs_oracle_correct_pct": [
                _spread([a["pairs_oracle_correct_pct"][i] for a in runs]) for i in range(k - 1)
            ],
            "delta_fully_correct": _spread([a["delta_fully_correct"] for a in runs]),
            "delta_judge_pairwise_accuracy": _spread(
                [a["delta_judge_pairwise_accuracy"] for a in runs]
            ),
        }
    _paired_with_self(reports, arms)
    checks = _checks(
        list(arms),
        {arm: a["delta_fully_correct"]["mean"] for arm, a in arms.items()},
        {arm: a["delta_judge_pairwise_accuracy"]["mean"] for arm, a in arms.items()},
        {arm: a["pct_fully_correct"][-1]["mean"] for arm, a in arms.items()},
    )
    return {"seeds": seeds, "arms": arms, "checks": checks}


def _paired_with_self(reports: Sequence[dict[str, Any]], arms: dict[str, Any]) -> None:
    """Add ``vs_self`` to every arm but ``self``: per seed, the arm's last model minus the
    self arm's (% fully correct, judge pairwise accuracy). Both start from the seed's M1,
    so the paired difference leaves out the spread of M1 across seeds."""
    if "self" not in arms:
        return
    for arm, a in arms.items():
        if arm == "self":
            continue
        diffs = {"fully_correct": [], "judge_pairwise_accuracy": []}
        for r in reports:
            mine, base = r["summary"]["arms"][arm], r["summary"]["arms"]["self"]
            k = min(len(mine["pct_fully_correct"]), len(base["pct_fully_correct"])) - 1
            diffs["fully_correct"].append(
                mine["pct_fully_correct"][k] - base["pct_fully_correct"][k]
            )
            diffs["judge_pairwise_accuracy"].append(
                mine["judge_pairwise_accuracy_pct"][k] - base["judge_pairwise_accuracy_pct"][k]
            )
        a["vs_self"] = {key: _spread(xs) for key, xs in diffs.items()}
        a["vs_self"]["seeds_above"] = sum(x > 0 for x in diffs["fully_correct"])


def _ms(s: dict[str, float]) -> str:
    return f"{s['mean']:.1f} ± {s['std']:.1f} [{s['min']:.1f}, {s['max']:.1f}]"


def render_aggregate(agg: dict[str, Any]) -> str:
    """Markdown of :func:`aggregate`: mean ± standard deviation [min, max] over seeds."""
    lines = [
        f"Seeds {', '.join(map(str, agg['seeds']))}; mean ± std [min, max] over seeds.",
        "",
        "| arm | model | % fully correct | judge pairwise acc (%) |",
        "|---|---|---|---|",
    ]
    for arm, a in agg["arms"].items():
        for i, (fc, pa) in enumerate(
            zip(a["pct_fully_correct"], a["judge_pairwise_accuracy_pct"]), start=1
        ):
            lines.append(f"| {arm} | M{i} | {_ms(fc)} | {_ms(pa)} |")
        lines.append(
            f"| {arm} | M{len(a['pct_fully_correct'])} - M1 | {_ms(a['delta_fully_correct'])} | "
            f"{_ms(a['delta_judge_pairwise_accuracy'])} |"
        )
    lines += [
        "",
        "| arm | iteration | judge pairwise acc on own candidates (%) | pairs oracle-correct (%) |",
        "|---|---|---|---|",
    ]
    for arm, a in agg["arms"].items():
        for i, (op, pc) in enumerate(
            zip(a["on_policy_judge_pairwise_accuracy_pct"], a["pairs_oracle_correct_pct"]), start=1
        ):
            lines.append(f"| {arm} | {i} | {_ms(op)} | {_ms(pc)} |")
    c = agg["checks"]
    last = _last_label(agg["arms"])
    paired = {arm: a["vs_self"] for arm, a in agg["arms"].items() if "vs_self" in a}
    if paired:
        n = len(agg["seeds"])
        lines += [
            "",
            f"Paired with the self arm (same seed, same M1): {last} of the arm minus {last} "
            "of self.",
            "",
            "| arm | % fully correct, per seed | mean ± std | seeds above self | "
            "judge pairwise acc (%), mean ± std |",
            "|---|---|---|---|---|",
        ]
        for arm, v in paired.items():
            fc = v["fully_correct"]
            per_seed = " / ".join(f"{x:+.1f}" for x in fc["values"])
            lines.append(
                f"| {arm} | {per_seed} | {fc['mean']:+.1f} ± {fc['std']:.1f} | "
                f"{v['seeds_above']} of {n} | {v['judge_pairwise_accuracy']['mean']:+.1f} ± "
                f"{v['judge_pairwise_accuracy']['std']:.1f} |"
            )
    lines += [
        "",
        f"- oracle gains at least {BAR_FULLY_CORRECT:g} points (mean {last} - M1 >= "
        f"{BAR_FULLY_CORRECT:g}): {_fmt(c['oracle_clears_bar'])}",
        f"- self-reward gains at least {BAR_FULLY_CORRECT:g} points: {_fmt(c['self_clears_bar'])}",
        f"- self-reward judge kept (mean change >= -{BAR_JUDGE_DROP:g}): {_fmt(c['self_judge_kept'])}",
        f"- controls ordered (mean {last}: oracle >= self >= random): {_fmt(c['controls_ordered'])}",
    ]
    return "\n".join(lines + _other_arm_checks(c, agg["arms"]))


def main(argv: list[str] | None = None) -> int:
    """Aggregate the ``report.json`` of several demo run directories (one per seed)."""
    p = argparse.ArgumentParser(
        prog="python -m self_rewarding_lm_pytorch.demo.report",
        description="mean and spread over seeds of several `srlm demo` runs",
    )
    p.add_argument("runs", nargs="+", help="run directories (each with report.json)")
    p.add_argument("--json", help="also write the aggregate as JSON to this file")
    args = p.parse_args(argv)
    reports = []
    for d in args.runs:
        path = Path(d) / "report.json"
        if not path.exists():
            print(f"{path} does not exist; run `srlm demo --out {d}` first", file=sys.stderr)
            return 2
        reports.append(json.loads(path.read_text()))
    agg = aggregate(reports)
    if args.json:
        atomic_write_json(args.json, agg)
    print(render_aggregate(agg))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
