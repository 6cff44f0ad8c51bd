"""Fault injection: SIGKILL the real ``srlm run`` process at random points, over and over,
and check that every rerun resumes without losing, duplicating or redoing anything.

The driver and the checks are in ``fault_job.py`` (the kill points and what is checked
after each kill are described there). The default run makes ``SRLM_FAULT_TRIALS`` (30)
kills in chains of 10 against one uninterrupted reference run; set
``SRLM_FAULT_TRIALS=200`` for a long campaign, ``SRLM_FAULT_SEED`` to draw other points.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from fault_job import (
    PLAN,
    Trigger,
    leftovers,
    run_and_kill,
    run_campaign,
    run_job,
    snapshot,
    write_job,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the kill traps read /proc/self/fd"
)

TRIALS = int(os.environ.get("SRLM_FAULT_TRIALS", "30"))
SEED = int(os.environ.get("SRLM_FAULT_SEED", "0"))
PHASES = {
    "sft-training",
    "candidate-generation",
    "judging",
    "record-append",
    "dpo-training",
    "checkpoint-writing",
    "state-commit",
}


def test_sigkill_campaign_loses_duplicates_and_repeats_nothing(tmp_path):
    report = run_campaign(tmp_path, trials=TRIALS, kills_per_chain=10, seed=SEED)
    summary = json.dumps(report.to_dict(), indent=2)
    (tmp_path / "fault-report.json").write_text(summary)
    print(summary)
    assert not report.failures, "\n".join(report.failures)
    assert report.kills >= TRIALS
    assert report.leftover_temp_paths == 0
    # an interrupted stage's metrics are set aside, not mixed into the rerun's
    assert report.duplicated_metric_lines == 0
    if TRIALS >= 30:  # the shuffled decks of kill points cover every phase
        hit = {key.split("@")[0] for key in report.kill_points}
        assert PHASES <= hit, f"phases never hit: {sorted(PHASES - hit)}"


def test_kill_inside_checkpoint_swap_then_resume(tmp_path):
    """The smallest chain, run on its own: a kill just before the SFT stage commits (its
    checkpoint is written), then a kill while the rerun swaps that checkpoint for its own
    (no ``checkpoint/`` folder exists at that instant), then a resume that finishes."""
    config = write_job(tmp_path / "job")
    run = tmp_path / "run"
    for spec in ("state:01:1", "ckpt-swap:01:1"):
        rc, err = run_and_kill(config, run, Trigger("trap", "checkpoint-writing", spec=spec))
        assert rc == -signal.SIGKILL, err
        killed = snapshot(run)
        assert not killed.problems and killed.finished == []
    assert not (run / PLAN[0] / "checkpoint").exists()  # killed inside the swap window
    done = run_job(config, run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert snapshot(run).finished == PLAN


def test_killed_checkpoint_write_leaves_no_temp_folder_after_resume(tmp_path):
    config = write_job(tmp_path / "job")
    run = tmp_path / "run"
    rc, err = run_and_kill(
        config, run, Trigger("trap", "checkpoint-writing", spec="ckpt-write:01:1")
    )
    assert rc == -signal.SIGKILL, err
    done = run_job(config, run)
    assert done.returncode == 0, done.stderr[-3000:]
    # each killed write leaves a full copy of the model behind (a 7B model: ~14 GB)
    assert leftovers(run) == []


def test_torn_pairs_line_with_several_pairs_per_prompt_is_restored(tmp_path, monkeypatch):
    """A crash in the middle of the second pairs.jsonl append (its last line torn), with
    all_pairs (up to 6 pairs per prompt); the rerun must end with the same pairs as a run
    that never crashed."""
    import os as os_module
    from pathlib import Path

    from tiny import PROMPTS, char_tokenizer, scripted_score, tiny_model

    from self_rewarding_lm_pytorch import PreferenceStage, SelfRewardingTrainer

    def make(run_dir):
        stage = PreferenceStage(
            kind="external_reward_dpo",
            judge="scripted",
            num_preference_pairs=12,
            max_new_tokens=6,
            chunk_size=2,
            temperature=1.0,
            top_p=1.0,
            pair_strategy="all_pairs",
            trainer=dict(batch_size=4, num_train_steps=1),
        )
        return SelfRewardingTrainer(
            tiny_model(),
            tokenizer=char_tokenizer(),
            prompt_dataset=PROMPTS,
            judges={"scripted": scripted_score},
            stages=[stage],
            checkpoints_folder=str(run_dir),
            accelerate_kwargs=dict(cpu=True),
            progress=False,
        )

    class Crash(BaseException):
        pass

    real_fsync, appends = os_module.fsync, []

    def fsync(fd):
        real_fsync(fd)
        path = Path(os_module.readlink(f"/proc/self/fd/{fd}"))
        if path.name == "pairs.jsonl":
            appends.append(path)
            if len(appends) == 2:  # cut the last line of this append in half, then die
                data = path.read_bytes()
                start = data.rfind(b"\n", 0, len(data) - 1) + 1
                os_module.truncate(path, start + (len(data) - start) // 2)
                raise Crash

    make(tmp_path / "clean").run()
    monkeypatch.setattr(os_module, "fsync", fsync)
    with pytest.raises(Crash):
        make(tmp_path / "crashed").run()
    monkeypatch.undo()
    make(tmp_path / "crashed").run()
    name = "01-external-reward-dpo/pairs.jsonl"
    assert (tmp_path / "crashed" / name).read_text() == (tmp_path / "clean" / name).read_text()


def test_checkpoint_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    import os as os_module
    from pathlib import Path

    from tiny import tiny_model

    from self_rewarding_lm_pytorch.trainers.checkpoint import save_checkpoint

    events = []
    real_fsync, real_replace = os_module.fsync, os_module.replace

    def fsync(fd):
        events.append(("fsync", Path(os_module.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os_module, "fsync", fsync)
    monkeypatch.setattr(os_module, "replace", replace)
    save_checkpoint(tiny_model(), tmp_path / "checkpoint", state={"step": 1})
    monkeypatch.undo()
    rename = next(
        i for i, e in enumerate(events) if e[0] == "replace" and e[2].name == "checkpoint"
    )
    tmp_dir = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    written = {tmp_dir / p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert written <= synced, f"not fsynced before the rename: {sorted(written - synced)}"
