"""Temporal anchoring (``rejected_from``), a frozen judge (``judge_model``) and judge health
(``judge_health``) of preference stages, on tiny models with scripted judges and oracles."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from tiny import (
    EOS,
    PROMPTS,
    DelegatingBackend,
    char_tokenizer,
    quick_preference,
    scripted_score,
    tiny_model,
)

from self_rewarding_lm_pytorch import PreferenceStage, SelfRewardingTrainer
from self_rewarding_lm_pytorch.config import ConfigError
from self_rewarding_lm_pytorch.generation import TorchBackend, generate_text
from self_rewarding_lm_pytorch.judge import JudgeConfig, LLMJudge, RewardConfig
from self_rewarding_lm_pytorch.pipeline import PromptGenerationStage, check_plan
from self_rewarding_lm_pytorch.pipeline.health import JudgeHealthError, check_health
from self_rewarding_lm_pytorch.pipeline.preference import candidate_config
from self_rewarding_lm_pytorch.pipeline.rundir import (
    check_fingerprints,
    stage_defaults,
    stage_fingerprint,
)
from self_rewarding_lm_pytorch.store import RunDirError, read_jsonl
from self_rewarding_lm_pytorch.trainers.checkpoint import load_checkpoint
from self_rewarding_lm_pytorch.utils import derive_seed, make_generator

TRAIN = dict(batch_size=4, num_train_steps=2, start_learning_rate=5e-2)
# rows with human ranks; the scripted judge below orders them right on 3 of the 5 pairs
# with different ranks, wrong on 1 and ties 1: accuracy (3 + 0 + 0.5) / 5 = 0.7
RANKED = [
    {"prompt": "q1", "responses": ["a1", "b1", "c1"], "human_ranks": [0, 1, 2]},
    {"prompt": "q2", "responses": ["d2", "e2"], "human_ranks": [0, 1]},
    {"prompt": "q3", "responses": ["f3", "g3"], "human_ranks": [0, 1]},
]
ROW_SCORES = {"a1": 3.0, "b1": 2.0, "c1": 1.0, "d2": 1.0, "e2": 2.0, "f3": 1.0, "g3": 1.0}


def _trainer(tmp_path, stages, **kw):
    args = dict(
        tokenizer=char_tokenizer(),
        datasets={"prompts": PROMPTS, "ranked": RANKED},
        judges={"scripted": scripted_score},
        stages=stages,
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )
    return SelfRewardingTrainer(tiny_model(max_seq_len=kw.pop("max_seq_len", 96)), **{**args, **kw})


def _weights(tmp_path, stage_name, max_seq_len=96):
    """A fresh model holding the checkpoint of a finished stage."""
    state = json.loads((tmp_path / "state.json").read_text())
    ckpt = next(r["checkpoint"] for r in state["finished"] if r["stage"] == stage_name)
    model = tiny_model(max_seq_len=max_seq_len)
    load_checkpoint(model, tmp_path / ckpt)
    return model


def _regenerate(model, records, stage, index):
    """The candidates ``model`` samples for ``records`` with the anchor streams of stage
    ``index`` (one stream per chunk)."""
    out = []
    for chunk in sorted({r["chunk"] for r in records}):
        prompts = [r["prompt"] for r in records if r["chunk"] == chunk]
        generator = make_generator(derive_seed(0, index, chunk, "anchor"), "cpu")
        out += generate_text(
            TorchBackend(model),
            char_tokenizer(),
            prompts,
            candidate_config(stage, EOS),
            generator=generator,
            max_new_tokens_per_prompt=[stage.max_new_tokens] * len(prompts),
        )
    return [list(rs) for rs in out]


def _check_anchored_pairs(records, pairs, stage):
    """Every pair is the best policy candidate vs the worst anchor candidate, kept exactly
    when its gap exceeds pair_margin (until the stage's target is reached)."""
    by_prompt = {p["prompt_id"]: p for p in pairs}
    made = 0
    for r in records:
        if made == stage.num_preference_pairs:
            break
        mine = [(s, -i) for i, s in enumerate(r["scores"]) if s is not None]
        theirs = [(s, j) for j, s in enumerate(r["anchor_scores"]) if s is not None]
        expect = mine and theirs and max(mine)[0] > min(theirs)[0] + stage.pair_margin
        assert (r["id"] in by_prompt) == bool(expect), r
        if expect:
            made += 1
            p = by_prompt[r["id"]]
            assert p["chosen_index"] == -max(mine)[1] and p["rejected_index"] == min(theirs)[1]
            assert p["chosen"] == r["responses"][p["chosen_index"]]
            assert p["rejected"] == r["anchor_responses"][p["rejected_index"]]
            assert (p["chosen_from"], p["rejected_from"]) == ("policy", stage.rejected_from)
            assert p["score_chosen"] > p["score_rejected"] + stage.pair_margin
    assert made == len(pairs) == stage.num_preference_pairs


def test_anchored_rejection_samples_the_frozen_model_and_pairs_best_vs_worst(tmp_path):
    stages = [
        quick_preference(trainer=TRAIN),
        quick_preference(trainer=TRAIN, rejected_from="initial", pair_margin=0.5),
        quick_preference(trainer=TRAIN, rejected_from="01-external-reward-dpo"),
    ]
    trainer = _trainer(tmp_path, stages, oracle=lambda p, r: float(len(r)))
    trainer.run()
    assert trainer.snapshots._loaded == {}  # no later stage needs one: every frozen model freed
    anchors = {2: tiny_model(), 3: _weights(tmp_path, "01-external-reward-dpo")}
    for index, anchor in anchors.items():
        folder = tmp_path / f"0{index}-external-reward-dpo"
        stage = stages[index - 1]
        records = read_jsonl(folder / "candidates.jsonl")
        assert [r["anchor_responses"] for r in records] == _regenerate(
            anchor, records, stage, index - 1
        )
        for r in records:  # the same judge (and oracle) scored them
            assert r["anchor_scores"] == [
                scripted_score(r["prompt"], x) for x in r["anchor_responses"]
            ]
            assert r["anchor_oracle_scores"] == [float(len(x)) for x in r["anchor_responses"]]
            assert len(r["anchor_judgements"]) == stage.num_candidates
        _check_anchored_pairs(records, read_jsonl(folder / "pairs.jsonl"), stage)
    # the anchors are not the policy's samples: the policy at stage 2 (stage 1's weights)
    # draws other responses from the same streams
    records = read_jsonl(tmp_path / "02-external-reward-dpo" / "candidates.jsonl")
    policy = _regenerate(anchors[3], records, stages[1], 1)
    assert policy != [r["anchor_responses"] for r in records]


REWARD = RewardConfig(
    prompt_template="Rate {{ prompt }} / {{ response }}:",
    parse_reward=lambda text: float(sum(map(ord, text)) % 4),
)
GREEDY = JudgeConfig(num_samples=1, temperature=0.0, max_new_tokens=3)


def _self_stage(**kw) -> PreferenceStage:
    return PreferenceStage(
        num_preference_pairs=2,
        max_new_tokens=4,
        chunk_size=4,
        temperature=1.0,
        top_p=1.0,
        min_parse_rate=0.0,
        judge_settings=GREEDY,
        trainer=TRAIN,
        **kw,
    )


def _judge_texts(model, records):
    judge = LLMJudge(model, char_tokenizer(), REWARD, **dataclasses.asdict(GREEDY))
    prompts = [r["prompt"] for r in records for _ in r["responses"]]
    results = judge.score(prompts, [x for r in records for x in r["responses"]])
    return [r.to_dict()["samples"] for r in results]


def _record_texts(records):
    return [j["samples"] for r in records for j in r["judgements"]]


def test_judge_model_samples_the_frozen_weights(tmp_path):
    stages = [quick_preference(trainer=TRAIN), _self_stage(judge_model="initial")]
    report = _trainer(tmp_path, stages, reward_prompt_config=REWARD, max_seq_len=256).run()
    records = read_jsonl(tmp_path / "02-self-reward-dpo" / "candidates.jsonl")
    assert _record_texts(records) == _judge_texts(tiny_model(max_seq_len=256), records)
    policy = _weights(tmp_path, "01-external-reward-dpo", 256)  # the live policy's weights
    assert _record_texts(records) != _judge_texts(policy, records)
    assert report["stages"][1]["judge_model"] == "initial"
    assert report["stages"][1]["judge_reason"] == "judge_model: initial"


def test_freeze_judges_with_the_last_healthy_stages_model(tmp_path):
    def health(min_accuracy):
        return {"rows": "ranked", "min_accuracy": min_accuracy, "action": "freeze"}

    stages = [_self_stage(judge_health=health(m)) for m in (0.0, 1.0, 0.0)]
    report = _trainer(tmp_path, stages, reward_prompt_config=REWARD, max_seq_len=256).run()
    first, second, third = report["stages"]
    assert first["judge_model"] == "initial" and first["judge_health"]["decision"] == "ok"
    assert second["judge_health"]["decision"] == "freeze"
    assert second["judge_health"]["accuracy"] < 1.0
    # its own judge would be the policy (stage 1's weights); frozen: the initial model's
    assert second["judge_model"] == "initial"
    assert (
        "last healthy" in second["judge_reason"] and "01-self-reward-dpo" in second["judge_reason"]
    )
    saved = json.loads((tmp_path / "02-self-reward-dpo" / "judge_health.json").read_text())
    assert saved["measured_model"] == "01-self-reward-dpo" and saved["frozen"] is True
    stats = json.loads((tmp_path / "02-self-reward-dpo" / "stats.json").read_text())
    assert stats["judge_health"]["judge_model"] == "initial"
    records = read_jsonl(tmp_path / "02-self-reward-dpo" / "candidates.jsonl")
    assert _record_texts(records) == _judge_texts(tiny_model(max_seq_len=256), records)
    # a later stage with health settings keeps the frozen judge (measured healthy with it)
    assert third["judge_model"] == "initial" and third["judge_health"]["decision"] == "ok"
    assert "frozen by stage 02-self-reward-dpo" in third["judge_reason"]


def _row_judge(calls):
    def judge(prompt, response):
        calls.append(response)
        return ROW_SCORES.get(response, scripted_score(prompt, response))

    return judge


def test_stop_raises_with_the_known_accuracy_before_judging_and_resume_reads_it_back(tmp_path):
    stage = quick_preference(judge_health={"rows": "ranked", "min_accuracy": 0.8})
    for attempt in range(2):
        calls: list[str] = []
        trainer = _trainer(tmp_path, [stage], judges={"scripted": _row_judge(calls)})
        with pytest.raises(JudgeHealthError) as err:
            trainer.run()
        assert "stage 01-external-reward-dpo" in str(err.value)
        assert "accuracy 0.700 is below min_accuracy=0.8, over 5 pairs" in str(err.value)
        assert "Nothing was judged" in str(err.value)
        assert not (tmp_path / "01-external-reward-dpo" / "candidates.jsonl").exists()
        saved = json.loads((tmp_path / "01-external-reward-dpo" / "judge_health.json").read_text())
        assert (saved["accuracy"], saved["pairs"], saved["decision"]) == (0.7, 5, "stop")
        # the first launch measured (7 responses); the second read the measurement back
        assert len(calls) == (7 if attempt == 0 else 0)


def test_prompts_measure_the_policys_candidates_against_the_oracle(tmp_path):
    stage = quick_preference(judge_health={"prompts": "prompts", "min_accuracy": 0.5})
    reverse = {"scripted": lambda p, r: -float(len(r))}  # orders every pair wrong
    trainer = _trainer(tmp_path, [stage], judges=reverse, oracle=lambda p, r: float(len(r)))
    with pytest.raises(JudgeHealthError, match="accuracy 0.000 is below min_accuracy=0.5"):
        trainer.run()
    saved = json.loads((tmp_path / "01-external-reward-dpo" / "judge_health.json").read_text())
    assert saved["accuracy"] == 0.0 and saved["pairs"] > 0


def test_max_drop_compares_with_the_best_earlier_accuracy(tmp_path):
    from self_rewarding_lm_pytorch.pipeline.health import JudgeHealthConfig

    config = JudgeHealthConfig(rows="ranked", max_drop=0.05)
    earlier = [
        {"stage": "a", "accuracy": 0.9, "healthy": True, "judge_model": "initial"},
        {"stage": "b", "accuracy": 0.7, "healthy": True, "judge_model": "a"},
    ]
    measured = {"accuracy": 0.8, "pairs": 10}  # above the last (0.7), below best - drop
    with pytest.raises(JudgeHealthError, match=r"best earlier accuracy 0.900 \(stage a\)"):
        check_health("c", config, tmp_path, earlier, "b", lambda: measured)
    record = check_health("c", config, tmp_path, earlier[1:], "b", lambda: measured)
    assert record["healthy"] and record["judge_model"] == "b"
    freeze = JudgeHealthConfig(rows="ranked", min_accuracy=0.9, action="freeze")
    with pytest.raises(JudgeHealthError, match="no earlier stage measured healthy"):
        check_health("c", freeze, tmp_path / "c", [], "initial", lambda: measured)


def test_plan_refuses_bad_references():
    def plan(**kw):
        stages = [
            PromptGenerationStage(num_prompts=2),
            quick_preference(),
            quick_preference(**kw),
            quick_preference(),
        ]
        check_plan(stages, datasets={"prompts"}, judges={"scripted"}, models=set())

    plan(rejected_from="02-external-reward-dpo")  # an earlier training stage: fine
    plan(rejected_from="initial")
    cases = {
        "04-external-reward-dpo": "is this stage or a later one",
        "03-external-reward-dpo": "is this stage or a later one",
        "01-prompt-generation": "trains nothing, so it has no checkpoint",
        "02-sft": "is not a stage of this plan",
    }
    for ref, problem in cases.items():
        with pytest.raises(ConfigError) as err:
            plan(rejected_from=ref)
        assert f"stage 03-external-reward-dpo, rejected_from: {ref!r} {problem}" in str(err.value)
        assert "'02-external-reward-dpo'" in str(err.value)  # the valid choices
    with pytest.raises(ConfigError, match="judge_model: 'initial' chooses the weights the self"):
        plan(judge_model="initial")
    with pytest.raises(ConfigError, match=r"judge_health.rows: dataset 'ranked' is not given"):
        plan(judge_health={"rows": "ranked", "min_accuracy": 0.5})


def test_unsupported_setups_are_refused_before_any_work(tmp_path):
    stage = quick_preference(rejected_from="initial")
    with pytest.raises(ConfigError, match="sample frozen models with the torch engine"):
        _trainer(tmp_path, [stage], backend=DelegatingBackend(tiny_model()))
    with pytest.raises(ConfigError, match="which a sharded run"):
        _trainer(tmp_path, [stage], shard_parameters=True)
    health = quick_preference(judge_health={"prompts": "prompts", "min_accuracy": 0.5})
    with pytest.raises(ConfigError, match="judge_health.prompts: measuring the judge"):
        _trainer(tmp_path, [health])
    with pytest.raises(ConfigError, match="give exactly one of prompts"):
        quick_preference(judge_health={"min_accuracy": 0.5})
    with pytest.raises(ConfigError, match="judge_health.action"):
        freeze = {"rows": "ranked", "max_drop": 0.1, "action": "freeze"}
        quick_preference(judge_health=freeze).validate()
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def _fingerprint(stage):
    return stage_fingerprint(
        stage,
        run={"seed": 0},
        datasets={"prompts": PROMPTS},
        models={},
        judges={"scripted": scripted_score},
        reward_config=None,
        oracle=None,
        early_stopper_eval_module=None,
        preference_max_seq_len=64,
    )


def test_a_run_from_before_these_keys_resumes(tmp_path):
    name = "01-external-reward-dpo"
    old = copy.deepcopy(_fingerprint(quick_preference()))
    for group, key in [("settings", "rejected_from"), ("settings", "judge_health")]:
        del old[group][key]
    del old["judge"]["judge_model"]

    def resume(stage):
        state = {"plan": [name], "finished": [{"stage": name}], "fingerprints": {name: old}}
        check_fingerprints(state, [_fingerprint(stage)], [tmp_path / name], [stage_defaults(stage)])

    resume(quick_preference())  # the keys at their defaults: what the earlier run did
    with pytest.raises(RunDirError, match='rejected_from: <unset> -> "initial"'):
        resume(quick_preference(rejected_from="initial"))
