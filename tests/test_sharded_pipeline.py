"""`srlm run` with the policy's parameters sharded over two real CPU ranks (FSDP2, gloo):
SFT, then a self-rewarding DPO iteration whose candidates and judgements are sampled with
the weights gathered on every rank. The run writes the files an unsharded two-rank run
writes, and its checkpoints load on one device to the same weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny_smoke.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, model: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={_free_port()}", "-m", "self_rewarding_lm_pytorch.cli", "run",
        str(EXAMPLE), f"model.path={model}", f"out={out}", "accelerate.log_with=null",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_sharded_run_writes_the_files_of_an_unsharded_one(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    plain = _run(tmp_path / "plain", model)
    assert plain.returncode == 0, plain.stderr[-3000:]
    sharded = _run(tmp_path / "sharded", model, "accelerate.shard_parameters=true")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    # the pipeline sampled with the gathered weights (the warning of a sharded model)
    assert "a sharded model is gathered whole on every rank" in sharded.stderr
    assert "gathered whole" not in plain.stderr
    stage = "02-self-reward-dpo"
    for name in ("candidates.jsonl", "pairs.jsonl"):
        a = (tmp_path / "plain" / stage / name).read_text()
        b = (tmp_path / "sharded" / stage / name).read_text()
        assert a == b and a, name
    for ckpt in ("01-sft/checkpoint", f"{stage}/checkpoint"):
        a = load_model(tmp_path / "plain" / ckpt).state_dict()
        b = load_model(tmp_path / "sharded" / ckpt).state_dict()  # one device, whole
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=f"{ckpt}: {k}")
