"""The run directory owns its configuration: file modes, concurrent atomic writes, the
one-writer lock, settings fingerprints and ``--overwrite``, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import make_trainer

from self_rewarding_lm_pytorch.store import RunDirError, atomic_write_json, read_jsonl

HERE = Path(__file__).resolve().parent
DPO = "01-external-reward-dpo"
FILES = ("candidates.jsonl", "pairs.jsonl", "stats.json")


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock's (each run that takes the lock records itself)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".srlm-lock"
    }


# ====================================================================== file modes


def test_run_files_are_readable_by_others_as_open_makes_them(tmp_path):
    old = os.umask(0o022)
    try:
        make_trainer(str(tmp_path / "run"), num_pairs=2).run()
        os.umask(0o077)
        atomic_write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for name in ("state.json", "config.yaml", "report.json", "report.md", f"{DPO}/stats.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600  # the umask holds


# ====================================================================== atomic writes

WRITES = 300
STORE = os.environ.get("SRLM_STORE_PY", str(HERE.parent / "self_rewarding_lm_pytorch" / "store.py"))
_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("store", sys.argv[4])  # stdlib only: fast start
store = importlib.util.module_from_spec(spec)
spec.loader.exec_module(store)
path, me = sys.argv[1], sys.argv[2]
atomic_write_json = store.atomic_write_json
for i in range(int(sys.argv[3])):
    atomic_write_json(path, {"writer": me, "i": i, "pad": "x" * 2000})
"""


def test_two_processes_write_one_file_atomically(tmp_path):
    """Two real writers, 300 writes each, on one path: none fails (a writer never deletes
    the other's live temp file), the file is always one whole version, no temp is left."""
    path = tmp_path / "stats.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), name, str(WRITES), STORE],
            env=env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    seen = set()
    while any(p.poll() is None for p in procs):
        if path.exists():
            data = json.loads(path.read_text())  # never a torn or empty file
            seen.add(data["writer"])
        time.sleep(0.001)
    errors = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert json.loads(path.read_text())["i"] == WRITES - 1
    assert seen  # the reader saw versions while they were written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_only_temp_files_of_dead_writers_are_removed(tmp_path):
    import socket

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".state.json.{dead.pid}.0a1b2c3d.{host}.tmp"
        live = tmp_path / f".state.json.{alive.pid}.0a1b2c3d.{host}.tmp"
        remote = tmp_path / f".state.json.{dead.pid}.0a1b2c3d.other-host.tmp"
        for p in (stale, live, remote):
            p.write_text("partial")
        atomic_write_json(tmp_path / "state.json", {"finished": []})
        assert not stale.exists()  # its writer is dead
        assert live.exists() and remote.exists()  # a live writer's, another host's
    finally:
        alive.kill()
        alive.wait()


# ====================================================================== fingerprints


def test_fingerprint_parts_see_changes_and_nothing_else():
    import functools

    import torch
    from tiny import tiny_model

    from self_rewarding_lm_pytorch.fingerprint import (
        changed_keys,
        dataset_digest,
        flatten,
        identity,
        model_identity,
    )

    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert model_identity(a) == model_identity(b)  # same weights: same identity
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3  # one sampled value moved
    assert model_identity(a) != model_identity(b)
    data = [{"prompt": "a"}, {"prompt": "b"}]
    assert dataset_digest(data) == dataset_digest([dict(d) for d in data])
    assert dataset_digest(data) != dataset_digest(data[::-1])
    assert identity(functools.partial(max, 1)) != identity(functools.partial(max, 2))
    old = flatten(identity({"trainer": {"beta": 0.1, "batch_size": 4}, "seed": 0}))
    new = flatten(identity({"seed": 0, "trainer": {"batch_size": 4, "beta": 0.2}}))
    assert changed_keys(old, new) == ["trainer.beta: 0.1 -> 0.2"]  # key order is no change


# ====================================================================== config.yaml


def test_config_yaml_holds_defaults_and_is_written_once(tmp_path):
    import yaml

    make_trainer(str(tmp_path), num_pairs=2).run()
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    stage = config["stages"][0]
    assert (
        stage["judge_settings"]["top_p"] == 0.9 and stage["pair_strategy"] == "best_worst"
    )  # defaults
    assert config["seed"] == 0 and config["preference_max_seq_len"] == 1024
    assert config["reward_config"]["match"] == "last"  # the default judge's settings
    assert config["datasets"] == {"prompts": 60, "sft": 16}
    first = (tmp_path / "config.yaml").stat()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["fingerprints"][DPO]["settings"]["num_preference_pairs"] == 2
    again = make_trainer(str(tmp_path), num_pairs=2)
    again.progress = True  # a change that cannot affect results
    again.run()
    now = (tmp_path / "config.yaml").stat()
    assert (now.st_ino, now.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten


# ====================================================================== faults with real runs

_JOB = """
import sys
from tiny import make_trainer
make_trainer(sys.argv[1], num_pairs=int(sys.argv[2]), chunk_size=2).run()
"""


def _job(run: Path, pairs: int = 8) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _JOB, str(run), str(pairs)],
        cwd=HERE,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_runs_changed_rerun_and_foreign_overwrite(tmp_path):
    """Fault test: two real runs on one folder at the same time (the second is refused at
    once, naming the first), a rerun with a changed setting (refused, nothing touched), a
    resume (nothing redone) and ``srlm run --overwrite`` on a folder of the user's (it
    stays intact): no record is doubled or lost, the files equal an undisturbed run's."""
    import torch

    reference, threads = tmp_path / "reference", torch.get_num_threads()
    torch.set_num_threads(1)  # as in the jobs (OMP_NUM_THREADS=1): the same samples
    try:
        make_trainer(str(reference), num_pairs=8, chunk_size=2).run()
    finally:
        torch.set_num_threads(threads)

    run = tmp_path / "run"
    first = _job(run)
    try:  # hold the first run still while it owns the folder, then start the second
        deadline = time.monotonic() + 120
        while not (run / DPO / "candidates.jsonl").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run wrote no candidates"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        second = _job(run)
        _, err = second.communicate(timeout=120)
        assert second.returncode != 0
        assert f"is in use by another run (pid {first.pid} on " in err
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    for name in FILES:
        assert (run / DPO / name).read_bytes() == (reference / DPO / name).read_bytes(), name
    ids = [r["id"] for r in read_jsonl(run / DPO / "candidates.jsonl")]
    assert len(ids) == len(set(ids))

    finished = files_of(run)
    with pytest.raises(RunDirError, match=r"num_preference_pairs: 8 -> 9"):
        make_trainer(str(run), num_pairs=9, chunk_size=2).run()
    assert files_of(run) == finished
    make_trainer(str(run), num_pairs=8, chunk_size=2).run()  # resumes: nothing to redo
    changed = {k for k, v in files_of(run).items() if finished.get(k) != v}
    assert changed <= {"report.json", "report.md"}, changed

    from fault_job import write_job

    from self_rewarding_lm_pytorch.cli import main

    config = write_job(tmp_path / "job")
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    (mine / "thesis.tex").write_text("\\documentclass{article}")
    (mine / "state.json").write_text('{"my": "own state file"}')
    before = files_of(mine)
    assert main(["-q", "run", str(config), "--out", str(mine), "--overwrite"]) == 1
    assert files_of(mine) == before
    assert sorted(p.name for p in mine.iterdir()) == ["photos", "state.json", "thesis.tex"]


def test_judge_settings_are_fingerprinted_as_the_judge():
    from self_rewarding_lm_pytorch.fingerprint import changed_keys
    from self_rewarding_lm_pytorch.judge import JudgeConfig
    from self_rewarding_lm_pytorch.pipeline import PreferenceStage
    from self_rewarding_lm_pytorch.pipeline.rundir import stage_fingerprint

    def parts(stage):
        return stage_fingerprint(
            stage,
            run={"seed": 0},
            datasets={"prompts": ["a", "b"]},
            models={},
            judges={},
            reward_config=None,
            oracle=None,
            early_stopper_eval_module=None,
            preference_max_seq_len=64,
        )

    base = parts(PreferenceStage())
    judge_only = parts(PreferenceStage(judge_settings=JudgeConfig(num_samples=1)))
    sampling = parts(PreferenceStage(temperature=0.5))
    # a judge-only change is in the judge part alone (an unfinished stage is re-judged)
    assert base["settings"] == judge_only["settings"]
    assert changed_keys(base["judge"], judge_only["judge"]) == [
        "judge_settings.num_samples: 3 -> 1"
    ]
    # a sampling change is a settings change (a stage with records refuses it)
    assert base["judge"] == sampling["judge"]
    assert changed_keys(base["settings"], sampling["settings"]) == ["temperature: 0.7 -> 0.5"]
