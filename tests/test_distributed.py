"""Two CPU processes (gloo, through accelerate): sharded candidate generation and DDP DPO."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from self_rewarding_lm_pytorch.store import read_jsonl

HERE = Path(__file__).parent


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-4000:]


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(HERE / "ddp_job.py"), str(one)], HERE)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(HERE / "ddp_job.py"),
            str(two),
        ],
        HERE,
    )
    stage = "run/01-external-reward-dpo"
    pairs = read_jsonl(two / stage / "pairs.jsonl")
    assert len(pairs) == 10  # exactly the requested count
    prompt_ids = [r["id"] for r in read_jsonl(two / stage / "candidates.jsonl")]
    assert len(prompt_ids) == len(set(prompt_ids))  # no prompt judged twice across ranks
    # the files do not depend on the number of processes
    assert (two / stage / "pairs.jsonl").read_text() == (one / stage / "pairs.jsonl").read_text()
    assert (two / stage / "candidates.jsonl").read_text() == (
        one / stage / "candidates.jsonl"
    ).read_text()

    # one DPO step on the same global batch: 2 ranks x 2 pairs == 1 rank x 4 pairs
    a = load_file(str(one / "after_step.safetensors"))
    b = load_file(str(two / "after_step.safetensors"))
    start = load_file(str(one / "before_step.safetensors"))
    assert set(a) == set(b) == set(start)
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # the step moved them
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
