"""End-to-end tests of the staged pipeline on tiny models."""

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
from tiny import (
    PROMPTS,
    SFT_DATA,
    DelegatingBackend,
    char_tokenizer,
    make_trainer,
    scripted_score,
    tiny_model,
)

from self_rewarding_lm_pytorch import (
    JudgeParseError,
    NotEnoughPairsError,
    PreferenceStage,
    RewardConfig,
    SelfRewardingTrainer,
    SFTStage,
    SPINStage,
)
from self_rewarding_lm_pytorch.judge import JudgeConfig
from self_rewarding_lm_pytorch.store import read_jsonl

HERE = Path(__file__).parent


def _expected_best_worst(scores):
    """Independent statement of the paper's rule: max vs min, ties and None skipped."""
    valid = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len({s for s, _ in valid}) < 2:
        return None
    best = max(s for s, _ in valid)
    worst = min(s for s, _ in valid)
    return (
        next(i for s, i in valid if s == best),
        next(i for s, i in valid if s == worst),
    )


def test_scripted_judge_exact_pairs(tmp_path):
    report = make_trainer(str(tmp_path), num_pairs=12).run()
    stage_dir = tmp_path / "01-external-reward-dpo"
    candidates = read_jsonl(stage_dir / "candidates.jsonl")
    pairs = read_jsonl(stage_dir / "pairs.jsonl")
    assert len(pairs) == 12

    expected = []
    saw_tie = saw_unparsable = False
    for rec in candidates:
        # the recorded scores are the judge's scores of the recorded responses
        assert rec["scores"] == [scripted_score(rec["prompt"], r) for r in rec["responses"]]
        assert len(rec["responses"]) == 4
        saw_unparsable |= None in rec["scores"]
        pick = _expected_best_worst(rec["scores"])
        saw_tie |= pick is None and any(s is not None for s in rec["scores"])
        if pick is not None:
            c, r = pick
            expected.append(
                (
                    rec["id"],
                    rec["responses"][c],
                    rec["responses"][r],
                    rec["scores"][c],
                    rec["scores"][r],
                )
            )
    assert saw_tie and saw_unparsable, "the scripted data must exercise ties and unparsable scores"
    got = [
        (p["prompt_id"], p["chosen"], p["rejected"], p["score_chosen"], p["score_rejected"])
        for p in pairs
    ]
    assert got == expected[:12]
    stats = report["stages"][0]["stats"]
    assert stats["pairs"] == 12 and 0 < stats["tie_rate"] < 1 and 0 < stats["parse_rate"] < 1


def test_rerun_resumes_without_repeating_a_stage(tmp_path):
    make_trainer(str(tmp_path), num_pairs=4, sft=True).run()
    state = json.loads((tmp_path / "state.json").read_text())
    assert [s["stage"] for s in state["finished"]] == ["01-sft", "02-external-reward-dpo"]
    ckpt = tmp_path / "02-external-reward-dpo" / "checkpoint" / "model.safetensors"
    mtime = ckpt.stat().st_mtime_ns
    lines = (tmp_path / "02-external-reward-dpo" / "candidates.jsonl").read_text()

    again = make_trainer(str(tmp_path), num_pairs=4, sft=True)
    again.run()
    assert ckpt.stat().st_mtime_ns == mtime
    assert (tmp_path / "02-external-reward-dpo" / "candidates.jsonl").read_text() == lines
    # the resumed trainer loaded the last checkpoint: same weights as the finished run's
    from safetensors.torch import load_file

    saved = load_file(str(ckpt))
    own = again.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())


def test_different_plan_in_same_folder_is_refused(tmp_path):
    make_trainer(str(tmp_path), num_pairs=2).run()
    with pytest.raises(RuntimeError, match="holds a run with stages"):
        make_trainer(str(tmp_path), num_pairs=2, sft=True).run()


def test_kill_during_candidate_generation_then_resume(tmp_path):
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cand = run_dir / "01-external-reward-dpo" / "candidates.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "tiny.py"), str(run_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if cand.exists() and len(read_jsonl(cand)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the job finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = len(read_jsonl(cand))
    assert (
        not (run_dir / "01-external-reward-dpo" / "pairs.jsonl").exists()
        or len(read_jsonl(run_dir / "01-external-reward-dpo" / "pairs.jsonl")) < 40
    )

    done = subprocess.run(
        [sys.executable, str(HERE / "tiny.py"), str(run_dir)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    records = read_jsonl(cand)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) and len(ids) > killed_at
    pairs = read_jsonl(run_dir / "01-external-reward-dpo" / "pairs.jsonl")
    assert len(pairs) == 40 and len({p["id"] for p in pairs}) == 40

    # an uninterrupted run with the same seed produces exactly the same records
    reference = subprocess.run(
        [sys.executable, str(HERE / "tiny.py"), str(tmp_path / "clean")],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr.decode()[-3000:]
    clean = read_jsonl(tmp_path / "clean" / "01-external-reward-dpo" / "candidates.jsonl")
    assert sorted(records, key=lambda r: r["id"]) == sorted(clean, key=lambda r: r["id"])


def test_pairs_file_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    make_trainer(str(tmp_path), num_pairs=5).run()
    ds = datasets.load_dataset(
        "json", data_files=str(tmp_path / "01-external-reward-dpo" / "pairs.jsonl"), split="train"
    )
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert len(ds) == 5 and all(isinstance(x, str) for x in ds["chosen"])


def test_self_judge_that_never_parses_stops_with_explanation(tmp_path):
    config = RewardConfig(
        prompt_template="Rate {{ prompt }} / {{ response }}:",
        reward_regex_template="Score: {{ reward }}",
    )
    trainer = SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        prompt_dataset=PROMPTS,
        reward_prompt_config=config,
        stages=[
            PreferenceStage(
                num_preference_pairs=3,
                max_new_tokens=4,
                judge_settings=JudgeConfig(max_new_tokens=6),
                chunk_size=4,
            )
        ],
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )
    start = time.monotonic()
    with pytest.raises(JudgeParseError) as info:
        trainer.run()
    msg = str(info.value)
    assert "0.0%" in msg and "[3]" in msg and "EFT" in msg and "external judge" in msg
    assert time.monotonic() - start < 120
    # what was generated and judged before the stop is kept
    kept = read_jsonl(tmp_path / "01-self-reward-dpo" / "candidates.jsonl")
    assert len(kept) == 4 and all(s is None for r in kept for s in r["scores"])


def test_running_out_of_prompts_keeps_records(tmp_path):
    trainer = SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        prompt_dataset=PROMPTS[:3],
        judges={"scripted": scripted_score},
        stages=[
            PreferenceStage(
                kind="external_reward_dpo",
                judge="scripted",
                num_preference_pairs=50,
                max_new_tokens=4,
            )
        ],
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )
    with pytest.raises(NotEnoughPairsError, match="after trying 3 prompts"):
        trainer.run()
    assert len(read_jsonl(tmp_path / "01-external-reward-dpo" / "candidates.jsonl")) == 3


def test_stages_run_in_the_order_listed(tmp_path):
    stages = [
        PreferenceStage(
            kind="external_reward_dpo",
            judge="scripted",
            num_preference_pairs=2,
            max_new_tokens=4,
            trainer=dict(batch_size=2),
        ),
        SFTStage(trainer=dict(batch_size=4, num_train_steps=2)),
        SPINStage(cycles=1, trainer=dict(batch_size=4, max_seq_len=24)),
    ]
    trainer = SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        datasets={"sft": SFT_DATA[:8], "prompts": PROMPTS},
        judges={"scripted": scripted_score},
        stages=stages,
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )
    report = trainer.run()
    assert [s["stage"] for s in report["stages"]] == ["01-external-reward-dpo", "02-sft", "03-spin"]
    from safetensors.torch import load_file

    weights = [
        load_file(str(tmp_path / s["checkpoint"] / "model.safetensors")) for s in report["stages"]
    ]
    for a, b in zip(weights, weights[1:]):  # every stage trained the model further
        assert any(not torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "report.md").read_text().count("## ") == 3


def test_bad_configuration_is_rejected_before_work(tmp_path):
    common = dict(
        tokenizer=char_tokenizer(),
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
    )
    with pytest.raises(ValueError, match="prompts: dataset 'prompts' is not given in datasets="):
        SelfRewardingTrainer(tiny_model(), stages=[PreferenceStage()], **common)
    with pytest.raises(ValueError, match="is empty"):
        SelfRewardingTrainer(tiny_model(), prompt_dataset=[], stages=[PreferenceStage()], **common)
    with pytest.raises(ValueError, match="unknown DPOTrainer argument 'bta'; did you mean 'beta'"):
        SelfRewardingTrainer(
            tiny_model(),
            prompt_dataset=PROMPTS,
            stages=[PreferenceStage(trainer={"bta": 1})],
            **common,
        )
    with pytest.raises(ValueError, match="judge: judge 'gpt' is not given in judges="):
        SelfRewardingTrainer(
            tiny_model(),
            prompt_dataset=PROMPTS,
            stages=[PreferenceStage(kind="external_reward_dpo", judge="gpt")],
            **common,
        )
    assert not (tmp_path / "state.json").exists()


def test_generated_prompts_feed_the_next_iteration(tmp_path):
    from test_prompts import WORDS, TaskBigramLM, WordTokenizer

    from self_rewarding_lm_pytorch import PromptGenerationStage

    model = TaskBigramLM()
    model.table.requires_grad_(True)  # DPO needs something to train
    seeds = [" ".join(WORDS[i : i + 6]) for i in range(0, 30, 3)]
    trainer = SelfRewardingTrainer(
        model,
        tokenizer=WordTokenizer(),
        prompt_dataset=seeds,
        judges={"length": lambda prompt, response: float(len(response.split()))},
        stages=[
            PromptGenerationStage(num_prompts=5, max_new_tokens=8, temperature=1.0),
            PreferenceStage(
                kind="external_reward_dpo",
                judge="length",
                prompts="generated",
                num_preference_pairs=3,
                max_new_tokens=8,
                chunk_size=2,
                trainer=dict(batch_size=3),
            ),
        ],
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )
    trainer.run()
    generated = [
        r["prompt"] for r in read_jsonl(tmp_path / "01-prompt-generation" / "prompts.jsonl")
    ]
    assert len(generated) == 5 and not set(generated) & set(seeds)
    used = [
        r["prompt"] for r in read_jsonl(tmp_path / "02-external-reward-dpo" / "candidates.jsonl")
    ]
    assert used and used == generated[: len(used)]
    assert len(read_jsonl(tmp_path / "02-external-reward-dpo" / "pairs.jsonl")) == 3


def test_check_plan_checks_names_and_order_without_data():
    from self_rewarding_lm_pytorch.config import ConfigError
    from self_rewarding_lm_pytorch.pipeline import PromptGenerationStage, check_plan

    names = dict(datasets={"sft", "prompts"}, judges={"rm"}, models={"gen"})
    ok = [
        SFTStage(datasets=["sft"]),
        PromptGenerationStage(seed_dataset="prompts", generator_model="gen"),
        PreferenceStage(kind="external_reward_dpo", judge="rm", prompts="generated"),
    ]
    check_plan(ok, **names)  # names only: no dataset, judge or model object is needed
    bad = [
        (
            [SFTStage(datasets=["sft", "eft"])],
            "stage 01-sft, datasets: dataset 'eft' is not given in datasets=; did you mean "
            "'sft'? (known: prompts, sft); pass datasets={'eft': ...}",
        ),
        ([SFTStage(datasets=[])], "stage 01-sft, datasets: the list is empty"),
        ([SPINStage(dataset="ift")], "stage 01-spin, dataset: dataset 'ift' is not given in"),
        (
            [PromptGenerationStage(generator_model="big")],
            "stage 01-prompt-generation, generator_model: model 'big' is not given in models= "
            "(known: gen); pass models={'big': ...}",
        ),
        ([PreferenceStage(replay="eft")], "replay: dataset 'eft' is not given in datasets="),
        (
            [PreferenceStage(kind="external_reward_dpo", judge="gpt")],
            "stage 01-external-reward-dpo, judge: judge 'gpt' is not given in judges= "
            "(known: rm); pass judges={'gpt': ...}",
        ),
        (
            [PreferenceStage(kind="external_reward_dpo")],
            "stage 01-external-reward-dpo, judge: an external_reward_dpo stage needs an "
            "external judge, not 'self'; name one given in judges= (known: rm)",
        ),
        (
            [PreferenceStage(judge="rm")],
            "stage 01-self-reward-dpo: a self_reward_dpo stage judges with the model itself "
            "(judge='self'), not 'rm'; use kind='external_reward_dpo'",
        ),
        (
            [PreferenceStage(prompts="generated"), PromptGenerationStage()],
            "stage 01-self-reward-dpo: prompts='generated' needs a prompt_generation stage "
            "before this stage",
        ),
    ]
    for stages, message in bad:
        with pytest.raises(ConfigError) as info:
            check_plan(stages, **names, where="run.yaml")
        assert str(info.value).startswith("run.yaml: ") and message in str(info.value)


def test_every_sampling_call_of_the_pipeline_goes_through_its_backend(tmp_path, monkeypatch):
    """Prompt generation, candidates and the self judge all sample through the pipeline's
    one backend: the engine samples no row that the backend was not asked for."""
    import self_rewarding_lm_pytorch.generation.engine as engine
    from self_rewarding_lm_pytorch import PromptGenerationStage

    engine_rows: list[int] = []
    run_batch = engine._run_batch

    def counting_run_batch(backend, prompts, rows, *args, **kwargs):
        engine_rows.append(len(rows))
        return run_batch(backend, prompts, rows, *args, **kwargs)

    monkeypatch.setattr(engine, "_run_batch", counting_run_batch)
    config = RewardConfig(
        prompt_template="Rate {{ prompt }} / {{ response }}:",
        parse_reward=lambda text: float(len(text) % 3),
    )
    judge_settings = JudgeConfig(num_samples=2, max_new_tokens=3)
    stage = PreferenceStage(
        num_preference_pairs=2,
        num_candidates=3,
        max_new_tokens=5,
        chunk_size=2,
        temperature=1.0,
        top_p=1.0,
        min_parse_rate=0.0,
        judge_settings=judge_settings,
        trainer=dict(batch_size=2, num_train_steps=1),
    )
    trainer = SelfRewardingTrainer(
        tiny_model(max_seq_len=256),
        tokenizer=char_tokenizer(),
        prompt_dataset=PROMPTS,
        reward_prompt_config=config,
        stages=[PromptGenerationStage(num_prompts=2, max_new_tokens=6, max_attempts=3), stage],
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )
    recorder = DelegatingBackend(trainer.backend)
    trainer.backend = recorder
    with pytest.warns(UserWarning, match="generate_prompts made 0 of 2"):
        trainer.run()

    records = read_jsonl(tmp_path / "02-self-reward-dpo" / "candidates.jsonl")
    configs = [r["config"] for r in recorder.requests]
    kinds = [
        "prompts" if c.stop_strings else "candidates" if c.max_new_tokens == 5 else "judge"
        for c in configs
    ]
    chunks = len({r["chunk"] for r in records})
    assert kinds == ["prompts"] + ["candidates", "judge"] * chunks
    assert all(c.num_return_sequences == 3 for c, k in zip(configs, kinds) if k == "candidates")
    assert all(c.num_return_sequences == 2 for c, k in zip(configs, kinds) if k == "judge")
    # the judge continues the chunk's random stream: the generator the candidates used
    for cand, judge in zip(recorder.requests[1::2], recorder.requests[2::2]):
        assert judge["generator"] is cand["generator"] is not None
    # every candidate and judgement on record was sampled through the backend
    assert sum(len(r["responses"]) for r in records) == 3 * len(records)
    assert all(len(j["samples"]) == 2 for r in records for j in r["judgements"])
    asked = sum(len(r["prompts"]) * r["config"].num_return_sequences for r in recorder.requests)
    assert sum(engine_rows) == asked > 0

    # a self judge whose settings configure the torch engine samples the same live module
    # with an engine of its own; otherwise it shares the pipeline's backend
    assert trainer._judge_for(stage).backend is recorder
    budgeted = PreferenceStage(judge_settings=JudgeConfig(token_budget=64))
    judge = trainer._judge_for(budgeted)
    assert judge.backend is not recorder and judge.backend.engine_kwargs == {"token_budget": 64}
    assert judge.lm.module is trainer.model
