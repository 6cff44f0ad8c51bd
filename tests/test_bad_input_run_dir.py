"""Bad-input catalogue, run directory (``docs/bad-input.md``): changed settings on a rerun,
a second run on a busy folder, ``--overwrite`` of a folder this library did not make, and
an ``--out`` that names a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import make_trainer
from torch import nn

from self_rewarding_lm_pytorch.judge import JudgeConfig, RewardConfig
from self_rewarding_lm_pytorch.pipeline import (
    JudgeParseError,
    PreferenceStage,
    SelfRewardingTrainer,
)
from self_rewarding_lm_pytorch.store import RunDirError, read_jsonl

HERE = Path(__file__).resolve().parent
DPO = "01-external-reward-dpo"


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock's (each run that takes the lock records itself)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".srlm-lock"
    }


def foreign_folder(path: Path) -> dict[str, bytes]:
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "data" / "train.jsonl").write_text('{"prompt": "x"}\n')
    return files_of(path)


def test_overwrite_of_a_folder_not_made_by_the_library(tmp_path):
    folder = tmp_path / "mine"
    before = foreign_folder(folder)
    with pytest.raises(RunDirError) as info:
        make_trainer(str(folder), num_pairs=2).run(overwrite=True)
    msg = str(info.value)
    assert "is not a run directory made by this library" in msg
    assert "nothing in it is deleted" in msg and "data/, notes.txt" in msg
    assert "Choose another --out" in msg
    assert files_of(folder) == before  # intact, and no file of ours was added

    # a run folder holding a file of the user's is not cleared either
    run = tmp_path / "run"
    make_trainer(str(run), num_pairs=2).run()
    (run / "keep-me.txt").write_text("mine")
    kept = files_of(run)
    with pytest.raises(RunDirError, match=r"did not write \(keep-me.txt\).*move them elsewhere"):
        make_trainer(str(run), num_pairs=2).run(overwrite=True)
    assert files_of(run) == kept


def test_out_names_a_file(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("precious")
    with pytest.raises(
        RunDirError, match=r"results.txt is a file, not a folder; choose another --out"
    ):
        make_trainer(str(target), num_pairs=2).run()
    with pytest.raises(RunDirError, match=r"--overwrite: .*results.txt is a file, not a run dir"):
        make_trainer(str(target), num_pairs=2).run(overwrite=True)
    assert target.read_text() == "precious"


_HOLD = """
import sys, time
from self_rewarding_lm_pytorch.store import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_second_run_on_a_busy_folder(tmp_path, monkeypatch, capsys):
    """A real second process holds the run's lock: this run is refused at once (no
    waiting), naming the holder, and writes nothing; once the holder is gone the run goes.
    ``srlm run`` is refused before it loads the model."""
    from fault_job import write_job

    from self_rewarding_lm_pytorch import cli
    from self_rewarding_lm_pytorch.cli import build

    config = write_job(tmp_path / "job")
    run = tmp_path / "run"
    make_trainer(str(run), num_pairs=2).run()
    finished = files_of(run)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(RunDirError) as info:
            make_trainer(str(run), num_pairs=2).run()
        assert time.monotonic() - start < 5  # refused at once, not after waiting
        msg = str(info.value)
        assert f"is in use by another run (pid {holder.pid} on " in msg
        assert "one process (one launch) writes a run directory at a time" in msg
        assert "choose another --out" in msg
        # --overwrite of a busy run folder is refused too: nothing is deleted or written
        with pytest.raises(RunDirError, match=r"is in use by another run"):
            make_trainer(str(run), num_pairs=2).run(overwrite=True)
        assert files_of(run) == finished

        def no_build(cfg, **kwargs):
            raise AssertionError("the model was loaded for a run that cannot start")

        monkeypatch.setattr(build, "build_trainer", no_build)
        assert cli.main(["-q", "run", str(config), "--out", str(run)]) == 1
        err = capsys.readouterr().err
        assert f"RunDirError: {run} is in use by another run (pid {holder.pid} on " in err
        monkeypatch.undo()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    make_trainer(str(run), num_pairs=3).run(overwrite=True)  # the lock died with its process
    assert len(read_jsonl(run / DPO / "pairs.jsonl")) == 3


def test_changed_settings_of_a_finished_stage(tmp_path):
    make_trainer(str(tmp_path), num_pairs=6).run()
    before = files_of(tmp_path)
    with pytest.raises(RunDirError) as info:
        make_trainer(str(tmp_path), num_pairs=8).run()
    msg = str(info.value)
    assert f"stage {DPO} finished with other settings" in msg
    assert "num_preference_pairs: 6 -> 8" in msg
    assert "restore those settings" in msg and "--overwrite" in msg and "another --out" in msg
    assert files_of(tmp_path) == before  # refused before any work
    # changes that cannot affect results are allowed: progress, logging
    again = make_trainer(str(tmp_path), num_pairs=6)
    again.progress = True
    again.stages[0].trainer["log_every"] = 5
    again.run()
    # the seed and the data are part of what a stage was made from
    with pytest.raises(RunDirError, match=r"seed: 0 -> 1"):
        make_trainer(str(tmp_path), num_pairs=6, seed=1).run()
    other_data = make_trainer(str(tmp_path), num_pairs=6)
    other_data.datasets["prompts"] = other_data.datasets["prompts"][::-1]
    with pytest.raises(RunDirError, match=r"data.prompts: \"60 items, sha256:\w+\" -> "):
        other_data.run()
    # so is the numeric precision training ran in (accelerate keeps one state per process:
    # reset it around the bf16 launch)
    from accelerate.state import AcceleratorState

    bf16 = make_trainer(str(tmp_path), num_pairs=6)
    bf16.accelerate_kwargs["mixed_precision"] = "bf16"
    before = files_of(tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.raises(RunDirError, match=r'mixed_precision: "no" -> "bf16"'):
            bf16.run()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert files_of(tmp_path) == before


def _interrupted_run(run_dir: Path, **stage_kw) -> SelfRewardingTrainer:
    """A run stopped after its second chunk of candidates (a crash of the process)."""
    trainer = make_trainer(str(run_dir), num_pairs=12)
    for k, v in stage_kw.items():
        setattr(trainer.stages[0], k, v)
    return trainer


def test_changed_sampling_of_an_interrupted_stage(tmp_path, monkeypatch):
    from self_rewarding_lm_pytorch.pipeline.preference import PairBuilder

    class Crash(BaseException):
        pass

    real, calls = PairBuilder.judge_chunk, []

    def crash_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PairBuilder, "judge_chunk", crash_on_third)
    with pytest.raises(Crash):
        _interrupted_run(tmp_path).run()
    monkeypatch.undo()
    before = files_of(tmp_path)
    assert len(read_jsonl(tmp_path / DPO / "candidates.jsonl")) == 8
    with pytest.raises(RunDirError) as info:
        _interrupted_run(tmp_path, temperature=0.5, max_new_tokens=5).run()
    msg = str(info.value)
    assert f"stage {DPO} was interrupted after writing records" in msg
    assert "max_new_tokens: 6 -> 5" in msg and "temperature: 1.0 -> 0.5" in msg
    assert files_of(tmp_path) == before  # no record of the other settings mixed in
    _interrupted_run(tmp_path).run()  # the same settings resume
    ids = [r["id"] for r in read_jsonl(tmp_path / DPO / "candidates.jsonl")]
    assert len(ids) == len(set(ids)) >= 8


class DigitLM(nn.Module):
    """A tiny random LM that writes mostly digits: its answers and its judgements are
    numbers, so the regex ``{{ reward }}`` reads a score and ``Score: {{ reward }}`` none."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(128, 16)
        self.head = nn.Linear(16, 128)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.emb(ids))
        bonus = torch.zeros(128)
        bonus[ord("0") : ord("9") + 1] = 8.0
        return logits + bonus


def test_judge_fixed_after_parse_error_is_judged_again(tmp_path):
    """After a JudgeParseError the user fixes the reward regex and reruns in the same
    folder: the stale judgements are set aside (never reused) and the same candidates are
    judged again, giving exactly what a fresh run with the fixed judge gives."""
    from tiny import PROMPTS, char_tokenizer

    def trainer(run_dir: Path, regex: str) -> SelfRewardingTrainer:
        stage = PreferenceStage(
            num_preference_pairs=2,
            max_new_tokens=4,
            chunk_size=4,
            judge_settings=JudgeConfig(num_samples=1, max_new_tokens=4),
            trainer=dict(batch_size=2, num_train_steps=1),
        )
        return SelfRewardingTrainer(
            DigitLM(),
            tokenizer=char_tokenizer(),
            prompt_dataset=PROMPTS,
            stages=[stage],
            reward_prompt_config=RewardConfig(
                prompt_template="Rate {{ prompt }} / {{ response }}:",
                reward_regex_template=regex,
            ),
            checkpoints_folder=str(run_dir),
            accelerate_kwargs=dict(cpu=True),
            progress=False,
        )

    run = tmp_path / "run"
    with pytest.raises(JudgeParseError) as info:
        trainer(run, "Score: {{ reward }}").run()
    assert "rerunning in the same run folder sets these judgements aside" in str(info.value)
    stale = read_jsonl(run / "01-self-reward-dpo" / "candidates.jsonl")
    assert stale and all(s is None for r in stale for s in r["scores"])

    trainer(run, "{{ reward }}").run()  # the fixed regex accepts any number
    trainer(tmp_path / "fresh", "{{ reward }}").run()
    stage = "01-self-reward-dpo"
    aside = read_jsonl(run / stage / "stale-judge-1" / "candidates.jsonl")
    assert aside == stale  # kept, set aside
    for name in ("candidates.jsonl", "pairs.jsonl"):
        assert (run / stage / name).read_bytes() == (tmp_path / "fresh" / stage / name).read_bytes()
    now = read_jsonl(run / stage / "candidates.jsonl")
    assert [r["responses"] for r in now[: len(stale)]] == [r["responses"] for r in stale]
    state = json.loads((run / "state.json").read_text())
    assert state["fingerprints"][stage]["judge"]["reward_config.reward_regex_template"] == (
        "{{ reward }}"
    )
