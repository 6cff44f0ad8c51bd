"""Parameter-sharded training (FSDP2 ``fully_shard`` through ``shard_model``) on two real CPU
processes (torchrun, gloo) against one unsharded process on the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from self_rewarding_lm_pytorch.hf import build_tiny_model
from self_rewarding_lm_pytorch.models import wrap_model
from self_rewarding_lm_pytorch.trainers import load_checkpoint, shard_model

HERE = Path(__file__).parent
TIMEOUT_S = 240  # the launch takes ~35 s on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tiny model folder, sharded run's folder, unsharded run's folder): the 2-rank launch
    runs in the background while this process computes the 1-process reference."""
    from sharded_worker import run

    root = tmp_path_factory.mktemp("sharded")
    model_dir = build_tiny_model(root / "tiny")
    two, one = root / "two", root / "one"
    two.mkdir()
    one.mkdir()
    path = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    args += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    args += [str(HERE / "sharded_worker.py"), str(model_dir), str(two)]
    job = subprocess.Popen(
        args, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        run(str(model_dir), str(one), sharded=False)
        log, _ = job.communicate(timeout=TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, log.decode(errors="replace")[-4000:]
    return model_dir, two, one


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_sharded_training_matches_one_process(runs):
    model_dir, two, one = runs
    # every parameter is split between the two ranks: about half each, nothing held twice
    numels = [json.loads((two / f"numels-{r}.json").read_text()) for r in (0, 1)]
    assert set(numels[0]) == set(numels[1]) and len(numels[0]) > 10
    for name, (local0, full, rows) in numels[0].items():
        local1 = numels[1][name][0]
        assert local0 + local1 == full, name
        assert abs(local0 - local1) <= full // rows, (name, local0, local1)  # one row at most

    # the same reference log-probs, computed through the sharded model on both ranks
    ref2 = load_file(str(two / "ref_logps.safetensors"))["ref_logps"]
    ref1 = load_file(str(one / "ref_logps.safetensors"))["ref_logps"]
    assert ref2.shape == (4, 2) and bool((ref1 < 0).all())
    torch.testing.assert_close(ref2, ref1, atol=1e-5, rtol=0)

    # one SFT, DPO and SPIN step each: the same parameters as the unsharded run, and moved
    previous = load_file(str(model_dir / "model.safetensors"))  # the starting weights
    for stage in ("after_sft", "after_dpo", "after_spin"):
        sharded = load_file(str(two / f"{stage}.safetensors"))
        plain = load_file(str(one / f"{stage}.safetensors"))
        assert _max_diff(sharded, plain) <= 1e-5, stage
        moved = {k: plain[k] for k in previous}
        assert _max_diff(moved, previous) > 1e-4, stage
        previous = moved

    r2 = json.loads((two / "results.json").read_text())
    r1 = json.loads((one / "results.json").read_text())
    for stage in ("sft", "dpo", "spin"):  # the global gradient norm and the mean loss
        for key in ("grad_norm", "loss"):
            assert r2[stage][key] == pytest.approx(r1[stage][key], abs=1e-5), (stage, key)
    assert r2["sft"]["valid_nll"] == pytest.approx(r1["sft"]["valid_nll"], abs=1e-5)
    # early stopping evaluated on the main process alone (under gathered), twice
    assert len(r2["probes"]) == 2 and r2["probes"] == pytest.approx(r1["probes"], abs=1e-5)
    # SPIN's greedy generations under gathered: the ranks decoded different lengths
    assert r2["generated"] == r1["generated"]
    assert len({len(g) for g in r2["generated"]}) > 1
    assert len(r2["gathered_warnings"]) == 1 and "vLLM" in r2["gathered_warnings"][0]
    assert r1["gathered_warnings"] == []

    refused = r2["refused"]
    assert "state_dict=full_state_dict(model)" in refused["save"]
    assert not any(two.glob("refused-*")) and not any(two.glob(".refused-*"))
    assert "precompute_ref_logps=True" in refused["copy"]
    assert "[2, 1]" in refused["uneven"] and "even_batches=True" in refused["uneven"]


def test_sharded_checkpoint_loads_on_one_device(runs):
    from transformers import AutoModelForCausalLM

    model_dir, two, one = runs
    after = load_file(str(two / "after_spin.safetensors"))
    ckpt = two / "ckpt"
    assert (ckpt / "config.json").exists()  # the Hugging Face folder, as unsharded
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    assert _max_diff(reloaded, after) == 0.0
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    load_checkpoint(fresh, ckpt)
    assert _max_diff(fresh.state_dict(), after) == 0.0
    # a fresh sharded model that loaded the checkpoint holds the same weights (resume)
    assert _max_diff(load_file(str(two / "resumed.safetensors")), after) == 0.0
    # an x-transformers model: the same SFT step, saved as model.safetensors
    xt = load_file(str(two / "xt_after_sft.safetensors"))
    assert _max_diff(xt, load_file(str(one / "xt_after_sft.safetensors"))) <= 1e-5
    assert _max_diff(load_file(str(two / "xt_ckpt" / "model.safetensors")), xt) == 0.0
    # early stopping's saved best state, loaded back into the sharded model
    assert _max_diff(load_file(str(two / "restored.safetensors")), after) == 0.0


def test_shard_model_refuses_without_process_group_or_on_a_wrapper():
    from tiny import tiny_model

    model = tiny_model()
    with pytest.raises(TypeError, match="unwrap_model"):
        shard_model(wrap_model(model))
    with pytest.raises(RuntimeError, match="initialised process group.*torchrun"):
        shard_model(model)  # this test process has no process group
