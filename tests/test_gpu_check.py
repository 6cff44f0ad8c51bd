"""``benchmarks/gpu_check.py --smoke`` on CPU: one run of every section, then its report.

The run happens once (a subprocess with a timeout); each test reads the report it wrote and
checks one thing: files and sections present, the figures consistent with each other
(tokens/s = tokens / seconds, MFU = 6 x params x tokens/s / peak, summary ratios), FSDP2 at
world size 1 losing nothing against the unsharded model, and a recorded error where vLLM is
missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
REPORT = ROOT / "benchmarks" / "gpu_check_report.py"
SECTIONS = ("env", "sft", "dpo", "fsdp2", "gen_hf", "gen_torch", "gen_vllm")
PEAK_TFLOPS = 0.5


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--device", "cpu",
         "--peak-tflops", str(PEAK_TFLOPS), "--budget-s", "240"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((out / "report.json").read_text())
    return data, (out / "report.md").read_text(), out


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_every_section_reports_numbers_or_an_error(report):
    data, md, _ = report
    secs = data["sections"]
    assert list(secs) == list(SECTIONS)
    for name, rec in secs.items():
        assert rec["status"] in ("ok", "error"), (name, rec)
        assert rec["wall_s"] >= 0
        if rec["status"] == "error":
            assert rec["error"].strip() and ":" in rec["error"], (name, rec)
        elif name != "env":
            figures = [v for k, v in rec.items() if k.endswith("tokens_per_s")]
            assert figures and all(isinstance(v, float) and v > 0 for v in figures), (name, rec)
        assert f"## {name} ({rec['status']}" in md
    # the library's own sections must work on CPU; only vLLM may be missing here
    assert all(secs[n]["status"] == "ok" for n in SECTIONS if n != "gen_vllm")
    assert [row["section"] for row in data["summary"]] == list(SECTIONS[1:])
    for row in data["summary"]:
        assert f"| {row['section']} | {row['status']} |" in md


def test_training_figures_are_consistent(report):
    data, _, _ = report
    meta = data["meta"]
    assert data["sections"]["env"]["peak_bf16_tflops"] == PEAK_TFLOPS
    for name, rows in (("sft", meta["batch"]), ("dpo", 2 * meta["pairs"])):
        rec = data["sections"][name]
        assert rec["timed_steps"] == meta["steps"]
        assert rec["tokens"] == rows * meta["seq_len"] * rec["timed_steps"]
        assert _close(rec["tokens_per_s"], rec["tokens"] / rec["seconds"])
        assert _close(rec["mfu"], 6 * rec["params"] * rec["tokens_per_s"] / (PEAK_TFLOPS * 1e12))
        assert len(rec["losses"]) == meta["warmup"] + meta["steps"]
        assert all(math.isfinite(x) and x > 0 for x in rec["losses"])
        assert rec["peak_mem_gib"] is None and rec["peak_mem_note"]  # CPU: no allocator stats
        assert rec["plan_train_gib"] > 0
    # DPO starts at log(2): the policy is its own reference before the first update
    assert abs(data["sections"]["dpo"]["losses"][0] - math.log(2)) < 1e-3


def test_fsdp2_world_size_one_matches_the_unsharded_steps(report):
    data, _, _ = report
    rec = data["sections"]["fsdp2"]
    assert rec["backend"] == "gloo" and rec["world_size"] == 1
    diffs = [abs(a - b) for a, b in zip(rec["plain_losses"], rec["fsdp2_losses"])]
    assert len(diffs) == data["meta"]["warmup"] + data["meta"]["steps"]
    assert _close(rec["max_abs_loss_diff"], max(diffs))
    assert rec["max_abs_loss_diff"] < 1e-4  # one shard holds everything: the same updates
    for kind in ("plain", "fsdp2"):
        assert _close(rec[f"{kind}_tokens_per_s"], rec["tokens"] / rec[f"{kind}_seconds"])
    row = next(r for r in data["summary"] if r["section"] == "fsdp2")
    assert _close(row["ratio"], rec["fsdp2_tokens_per_s"] / rec["plain_tokens_per_s"])


def test_generation_figures_and_the_missing_vllm(report):
    data, _, _ = report
    secs, meta = data["sections"], data["meta"]
    for name in ("gen_hf", "gen_torch"):
        rec = secs[name]
        assert rec["tokens"] == meta["prompts"] * meta["new_tokens"]  # no EOS: full rows
        assert _close(rec["tokens_per_s"], rec["tokens"] / rec["seconds"])
        assert 0 < rec["distinct_token_share"] <= 1
    assert 0 <= secs["gen_torch"]["identical_to_hf"] <= 1
    row = next(r for r in data["summary"] if r["section"] == "gen_hf")
    assert _close(row["ratio"], secs["gen_hf"]["tokens_per_s"] / secs["gen_torch"]["tokens_per_s"])
    vllm = secs["gen_vllm"]
    if secs["env"]["vllm"] is None:  # the main test env has no vLLM: the error says so
        assert vllm["status"] == "error" and "vLLM is not installed" in vllm["error"]
        assert "--vllm-python" in vllm["error"]
    else:
        assert vllm["status"] == "ok"
        assert vllm["tokens"] == meta["prompts"] * meta["new_tokens"]


def _load_report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sections_record_errors_and_budget_skips(tmp_path: Path):
    g = _load_report_module()
    rep = g.Report(tmp_path, {"smoke": True})

    def broken() -> dict:
        raise ValueError("no such shape")

    assert rep.run("sft", lambda: {"tokens_per_s": 2.0}, g.Budget(60), 1.0)["status"] == "ok"
    bad = rep.run("dpo", broken, g.Budget(60), 1.0)
    assert bad["status"] == "error" and bad["error"] == "ValueError: no such shape"
    assert "broken" in bad["traceback"]
    late = rep.run("fsdp2", lambda: pytest.fail("ran past the budget"), g.Budget(0.5), 5.0)
    assert late["status"] == "skipped" and "--budget-s" in late["error"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["status"] for r in data["summary"]] == ["ok", "error", "skipped"]
    md = (tmp_path / "report.md").read_text()
    assert "## dpo (error" in md and "ValueError: no such shape" in md


def test_watchdog_writes_the_report_and_exits(tmp_path: Path):
    code = (
        "import importlib.util, time, pathlib\n"
        f"spec = importlib.util.spec_from_file_location('g', {str(REPORT)!r})\n"
        "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n"
        f"rep = g.Report(pathlib.Path({str(tmp_path)!r}), {{}})\n"
        "rep.current = 'gen_vllm'\n"
        "rep.watchdog(0.5)\n"
        "time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 3, done.stderr
    rec = json.loads((tmp_path / "report.json").read_text())["sections"]["gen_vllm"]
    assert rec["status"] == "error" and rec["error"].startswith("watchdog:")
