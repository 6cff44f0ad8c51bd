"""``benchmarks/gpu_check.py --smoke`` with vLLM installed: its ``gen_vllm`` section runs the
vLLM worker subprocess on the saved model and compares its rows with Hugging Face's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_vllm_section(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--device", "cpu",
         "--out", str(tmp_path), "--sections", "env,gen_hf,gen_torch,gen_vllm",
         "--gen-dtype", "float32", "--budget-s", "200", "--vllm-timeout-s", "150"],
        env=env, capture_output=True, text=True, timeout=260, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((tmp_path / "report.json").read_text())
    secs, meta = data["sections"], data["meta"]
    assert list(secs) == ["env", "gen_hf", "gen_torch", "gen_vllm"]
    assert secs["env"]["vllm"], secs["env"]
    rec = secs["gen_vllm"]
    assert rec["status"] == "ok", rec
    assert rec["tokens"] == meta["prompts"] * meta["new_tokens"]
    assert math.isclose(rec["tokens_per_s"], rec["tokens"] / rec["seconds"], rel_tol=1e-9)
    assert rec["engine_start_s"] > 0
    # float32 greedy on the same weights: both backends give Hugging Face's rows, in order
    assert rec["identical_to_hf"] == 1.0 and secs["gen_torch"]["identical_to_hf"] == 1.0
    assert rec["distinct_token_share"] > 1 / meta["new_tokens"]  # rows are not one token
    row = next(r for r in data["summary"] if r["section"] == "gen_vllm")
    assert math.isclose(row["ratio"], rec["tokens_per_s"] / secs["gen_torch"]["tokens_per_s"])
