"""The report of ``gpu_check.py``: the run's time budget, each section's record (numbers,
or the error and its traceback, or why it was skipped), the summary rows with their ratios,
JSON and Markdown written after every section, and the watchdog that stops a hung run."""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Budget:
    """Seconds left of ``--budget-s`` since the start."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


# ---------------------------------------------------------------------- report


class Report:
    """The sections' results; JSON and Markdown rewritten after every section."""

    def __init__(
        self, out: Path, meta: dict[str, Any], after: Callable[[], None] | None = None
    ) -> None:
        self.out = out
        self.after = after  # run after every section (e.g. give back device memory)
        self.data: dict[str, Any] = {"meta": meta, "sections": {}, "summary": []}
        self.current: str | None = None
        self.lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn: Callable[[], dict[str, Any]], budget: Budget, need_s: float):
        """Run one section: its numbers, or ``status: error`` with the error and traceback."""
        if budget.left() < need_s:
            rec = {"status": "skipped", "error": f"budget: {budget.left():.0f} s left, "
                   f"this section starts with {need_s:.0f} s or more; raise --budget-s"}  # fmt: skip
            self._store(name, rec)
            return rec
        self.current = name
        t0 = time.perf_counter()
        try:
            rec = {"status": "ok", **fn()}
        except Exception as exc:  # noqa: BLE001 -- every failure goes into the report
            rec = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=8)[-3000:]}  # fmt: skip
        rec["wall_s"] = time.perf_counter() - t0
        self.current = None
        self._store(name, rec)
        if self.after is not None:
            self.after()
        return rec

    def _store(self, name: str, rec: dict[str, Any]) -> None:
        with self.lock:
            self.data["sections"][name] = rec
            self.data["summary"] = summary(self.data["sections"])
            self.write()

    def write(self) -> None:
        (self.out / "report.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "report.md").write_text(markdown(self.data))

    def watchdog(self, seconds: float) -> threading.Timer:
        """A timer that records the running section as hung, writes the report, exits 3."""

        def fire() -> None:
            with self.lock:
                name = self.current or "between sections"
                self.data["sections"][name] = {
                    "status": "error",
                    "error": f"watchdog: still running {seconds:.0f} s after the start "
                    "(--budget-s plus grace); the run was stopped here",
                }
                self.data["summary"] = summary(self.data["sections"])
                self.write()
            os._exit(3)

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        return timer


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def summary(sections: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measurement: tokens/s, MFU, memory vs plan, and a ratio to its baseline
    (training: measured / planned memory; FSDP2 / plain; HF and vLLM / the torch engine)."""
    gen_torch = sections.get("gen_torch", {}).get("tokens_per_s")
    rows = []
    for name, rec in sections.items():
        if name == "env":
            continue
        row: dict[str, Any] = {"section": name, "status": rec.get("status"),
                               "tokens_per_s": rec.get("tokens_per_s")}  # fmt: skip
        if name in ("sft", "dpo"):
            row.update(mfu=rec.get("mfu"), peak_mem_gib=rec.get("peak_mem_gib"),
                       plan_gib=rec.get("plan_train_gib"), ratio_label="measured / plan mem",
                       ratio=_ratio(rec.get("peak_mem_gib"), rec.get("plan_train_gib")))  # fmt: skip
        elif name == "fsdp2":
            tps, plain = rec.get("fsdp2_tokens_per_s"), rec.get("plain_tokens_per_s")
            row.update(tokens_per_s=tps, ratio_label="FSDP2 / plain", ratio=_ratio(tps, plain),
                       max_abs_loss_diff=rec.get("max_abs_loss_diff"))  # fmt: skip
        elif name in ("gen_hf", "gen_vllm"):
            row.update(ratio_label=f"{name[4:]} / torch engine",
                       ratio=_ratio(rec.get("tokens_per_s"), gen_torch))  # fmt: skip
        if "identical_to_hf" in rec:
            row["identical_to_hf"] = rec["identical_to_hf"]
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(data: dict[str, Any]) -> str:
    """The report as Markdown: environment, summary table, each section's figures."""
    meta, secs = data["meta"], data["sections"]
    lines = ["# GPU check", "", " ".join(f"{k}={_fmt(v)}" for k, v in meta.items()), ""]
    cols = ("section", "status", "tokens_per_s", "mfu", "peak_mem_gib", "plan_gib",
            "identical_to_hf", "max_abs_loss_diff", "ratio_label", "ratio")  # fmt: skip
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in data["summary"]:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    for name, rec in secs.items():
        lines += ["", f"## {name} ({rec.get('status')}, {_fmt(rec.get('wall_s'))} s)", ""]
        for k, v in rec.items():
            if k in ("status", "wall_s", "traceback"):
                continue
            lines.append(f"- {k}: {_fmt(v) if not isinstance(v, (list, dict)) else json.dumps(v)}")
        if rec.get("traceback"):
            lines += ["", "```", rec["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"
