"""Two CPU processes (gloo, through accelerate): sharded candidate generation and DDP DPO."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from self_rewarding_lm_pytorch.store import read_jsonl

HERE = Path(__file__).parent


def _env() -> dict[str, str]:
    path = os.pathsep.join(
        [str(HERE), *([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ else [])]
    )
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _run(args: list[str], cwd: Path, timeout: float = 600) -> None:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()[-4000:]


def _torchrun(port: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(HERE / "ddp_job.py"),
        *args,
    ]


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(HERE / "ddp_job.py"), str(one)], HERE)
    _run(_torchrun(29517, str(two)), HERE)
    stage = "run/01-external-reward-dpo"
    pairs = read_jsonl(two / stage / "pairs.jsonl")
    assert len(pairs) == 10  # exactly the requested count
    records = read_jsonl(two / stage / "candidates.jsonl")
    prompt_ids = [r["id"] for r in records]
    assert len(prompt_ids) == len(set(prompt_ids))  # no prompt stored twice
    # two real ranks split the chunks: disjoint sets that together cover every chunk
    ranks = [json.loads((two / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    chunk_of = {r["prompt"]: r["chunk"] for r in records}
    done = [{chunk_of[p] for p in r["judged"]} for r in ranks]
    assert done[0] and done[1] and not done[0] & done[1], done
    assert done[0] | done[1] == set(chunk_of.values())
    # generated prompts are complete before the other rank reads them
    assert len(read_jsonl(two / "pg/01-prompt-generation/prompts.jsonl")) == 5
    assert len(read_jsonl(two / "pg/02-external-reward-dpo/pairs.jsonl")) == 3
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


def test_a_busy_run_folder_stops_every_rank(tmp_path):
    """Another process holds the run's lock: both ranks of a launch are refused (the main
    process's outcome is shared), and none waits at a barrier for the other."""
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from self_rewarding_lm_pytorch.store import RunLock\n"
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        _run(_torchrun(29518, str(tmp_path), "--expect-busy"), HERE, timeout=240)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    for rank in (0, 1):
        msg = (tmp_path / f"refused-rank-{rank}.txt").read_text()
        assert f"is in use by another run (pid {holder.pid} on " in msg
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".srlm-lock"]
