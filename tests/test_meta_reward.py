"""The Meta-Rewarding stage (Wu et al. 2024): Bradley–Terry strengths against a direct
maximisation of the likelihood, the meta-judge template and both orders, the judge pairs a
scripted policy (a real backend class answering candidate, judge and meta-judge prompts)
yields, their balancing and share cap, the judge-pair prompt as the judge's own tokens,
resume to the same bytes, validation, and ``srlm run`` of the example."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eft_stage import ScriptedJudgeBackend
from tiny import char_tokenizer, run_two_ranks, tiny_model

from self_rewarding_lm_pytorch.config import ConfigError, load_run_config
from self_rewarding_lm_pytorch.data import preference_example
from self_rewarding_lm_pytorch.generation import GenerationOutput
from self_rewarding_lm_pytorch.hf import build_tiny_model
from self_rewarding_lm_pytorch.judge import JudgeConfig, RewardConfig
from self_rewarding_lm_pytorch.judge.meta import (
    MetaJudge,
    MetaJudgeTemplate,
    battle_matrix,
    bradley_terry,
)
from self_rewarding_lm_pytorch.pipeline import MetaRewardStage, SelfRewardingTrainer
from self_rewarding_lm_pytorch.pipeline.meta import balance_by_score, cap_share, judge_pair_room

HERE = Path(__file__).parent
EXAMPLE = HERE.parent / "examples" / "meta_rewarding.yaml"
REWARD = RewardConfig(
    prompt_template="judge {{ prompt }} => {{ response }} :",
    reward_regex_template="Score: {{ reward }}",
)
META = MetaJudgeTemplate(
    prompt_template="meta {{ prompt }}{{ response }}|{{ judgement_a }}|{{ judgement_b }}>",
    verdict_template="{{ verdict }}",
    labels=("A", "B", "="),
)
PROMPTS = [f"q{i}" for i in range(8)]
#: the two-process run's pairs: one per prompt, so the target is reached by the third of the
#: four chunks, in the middle of the second round of two ranks (one process stops there)
DDP_STAGE = {"num_preference_pairs": 6}


def neg_log_likelihood(theta: torch.Tensor, battles: np.ndarray, prior: float) -> torch.Tensor:
    b = torch.tensor(battles, dtype=torch.float64) + prior * (1 - torch.eye(len(battles)))
    b.fill_diagonal_(0)
    diff = theta[:, None] - theta[None, :]
    return -(b * torch.nn.functional.logsigmoid(diff)).sum()


def test_bradley_terry_two_players_is_the_closed_form():
    theta = bradley_terry([[0, 3], [1, 0]], prior=0.01)
    # two players: p0 / p1 = (wins0 + prior) / (wins1 + prior), mean log-strength 0
    assert theta[0] - theta[1] == pytest.approx(np.log(3.01 / 1.01), abs=1e-9)
    assert theta.sum() == pytest.approx(0.0, abs=1e-12)


def test_bradley_terry_three_players_maximises_the_likelihood():
    battles = np.array([[0, 2, 1.5], [1, 0, 3], [0.5, 0, 0]])
    theta = bradley_terry(battles, prior=0.01)
    best = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # direct maximisation
    opt = torch.optim.LBFGS([best], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        loss = neg_log_likelihood(best, battles, 0.01)
        loss.backward()
        return loss

    opt.step(closure)
    got = best.detach().numpy()
    np.testing.assert_allclose(theta - theta.mean(), got - got.mean(), atol=1e-6)
    # a player that won everything: large but finite (the prior), ranked first
    sweep = bradley_terry([[0, 4, 4], [0, 0, 1], [0, 1, 0]])
    assert np.isfinite(sweep).all() and sweep.argmax() == 0 and sweep[1] == pytest.approx(sweep[2])


def test_meta_templates_parse_compact_and_default_verdicts():
    assert META.parse("xx A") == "a" and META.parse("B q") == "b" and META.parse("=") == "tie"
    assert META.parse("Apple") is None  # a label inside a word is no verdict
    assert META.render("p", "r", "ja", "jb") == "meta pr|ja|jb>"
    default = MetaJudgeTemplate()
    assert default.parse("A is thorough.\nWinner: Judgement B") == "b"
    assert "<judgement_a>x</judgement_a>" in default.render("p", "r", "x", "y")
    with pytest.raises(ValueError, match="judgement_b"):
        MetaJudgeTemplate(prompt_template="{{ prompt }}{{ response }}{{ judgement_a }}")


class ScriptedPolicy(ScriptedJudgeBackend):  # its other protocol methods: stubs
    """A generation backend playing the three roles by the prompt it gets: a candidate
    ``ans<d>``; a judgement ``n<d> Score: <d % 4>`` (``d`` drawn from the request's
    generator, so the files show its seeding); a meta-verdict naming the judgement with the
    larger ``n`` (``consistent``), always ``A`` (``biased``) or no verdict (``mute``). It records the judge prompts
    (token ids) and raises on meta call ``crash_at`` (a crash mid-stage)."""

    max_seq_len = None

    def __init__(self, meta: str = "consistent", crash_at: int | None = None) -> None:
        self.tok = char_tokenizer()
        self.meta, self.crash_at = meta, crash_at
        self.meta_calls = 0
        self.judge_inputs: list[list[int]] = []

    def _verdict(self, text: str) -> str:
        if self.meta == "biased":
            return "A"
        if self.meta == "mute":
            return "hmm"
        a, b = (int(re.search(r"n(\d+)", part).group(1)) for part in text.split("|")[1:3])
        return "A" if a > b else "B" if b > a else "="

    def generate(self, prompts, config, *, generator=None, **kw) -> GenerationOutput:
        out = []
        texts = [self.tok.decode(ids) for ids in prompts]
        if texts and texts[0].startswith("meta"):
            self.meta_calls += 1
            if self.crash_at is not None and self.meta_calls >= self.crash_at:
                raise RuntimeError("scripted crash")
        for ids, text in zip(prompts, texts):
            if text.startswith("judge"):
                self.judge_inputs.append(list(ids))
            for _ in range(config.num_return_sequences):
                d = int(torch.randint(0, 1000, (1,), generator=generator))
                if text.startswith("meta"):
                    reply = self._verdict(text)
                elif text.startswith("judge"):
                    reply = f"n{d} Score: {d % 4}"
                else:
                    reply = f"ans{d}"
                out.append(self.tok.encode(reply))
        return GenerationOutput(sequences=out, finish_reasons=["eos"] * len(out))


def meta_stage(**kw) -> MetaRewardStage:
    defaults = dict(
        num_preference_pairs=6,
        num_candidates=3,
        max_new_tokens=8,
        chunk_size=2,
        judge_settings=JudgeConfig(num_samples=4, max_new_tokens=16),
        meta_template=META,
        meta_judge_settings=JudgeConfig(num_samples=1, max_new_tokens=4),
        max_judge_pair_share=0.4,
        balance_judge_scores=False,
        trainer={"batch_size": 4, "num_train_steps": 1},
    )
    return MetaRewardStage(**{**defaults, **kw})


def run_meta(run_dir: Path, backend: ScriptedPolicy, **kw) -> dict:
    trainer = SelfRewardingTrainer(
        tiny_model(max_seq_len=256),
        tokenizer=char_tokenizer(),
        prompt_dataset=PROMPTS,
        stages=[meta_stage(**kw)],
        reward_prompt_config=REWARD,
        checkpoints_folder=run_dir,
        accelerate_kwargs=dict(cpu=True),
        backend=backend,
        preference_max_seq_len=200,
        progress=False,
    )
    return trainer.run()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_consistent_meta_judge_pairs_the_best_and_worst_judgement(tmp_path):
    policy = ScriptedPolicy()
    report = run_meta(tmp_path, policy)
    stage = tmp_path / "01-meta-reward-dpo"
    record = report["stages"][0]
    assert record["judge_pairs"] == "01-meta-reward-dpo/judge_pairs.jsonl"
    candidates = {r["id"]: r for r in read(stage / "candidates.jsonl")}
    actor = read(stage / "pairs.jsonl")
    metas = {m["id"]: m for m in read(stage / "meta_judgements.jsonl")}
    judge_pairs = read(stage / "judge_pairs.jsonl")
    # every judged prompt with varying scores has its highest-variance response meta-judged
    for rid, r in candidates.items():
        variances = [np.var(j["sample_scores"]) for j in r["judgements"]]
        if max(variances) > 0:
            assert f"{rid}/{int(np.argmax(variances))}" in metas
    # the share cap: floor(0.4 / 0.6 * 6) = 4 judge pairs of the metas that rank
    ranked = [m for m in metas.values() if max(m["strengths"]) - min(m["strengths"]) > 1e-9]
    assert len(judge_pairs) == min(4, len(ranked)) and len(judge_pairs) >= 1
    stats = record["stats"]
    assert stats["judge_pairs"] == len(judge_pairs) and stats["pairs"] == len(actor) == 6
    assert stats["judge_pair_share"] == pytest.approx(len(judge_pairs) / (len(judge_pairs) + 6))
    assert stats["meta_parse_rate"] == 1.0 and stats["meta_position_consistency"] == 1.0
    tok = char_tokenizer()
    for p in judge_pairs:
        r = candidates[p["prompt_id"]]
        texts = r["judgements"][p["candidate"]]["samples"]
        n = [int(re.match(r"n(\d+)", t).group(1)) for t in texts]
        assert p["chosen_index"] == int(np.argmax(n)) and p["rejected_index"] == int(np.argmin(n))
        assert (p["chosen"], p["rejected"]) == (
            texts[p["chosen_index"]],
            texts[p["rejected_index"]],
        )
        # the DPO prompt is token for token the judge prompt the judge generated from
        example = preference_example(p["prompt"], p["chosen"], p["rejected"], tok)
        assert example.prompt_ids in policy.judge_inputs
    assert sum(stats["judge_chosen_score_histogram"].values()) == len(judge_pairs)


def test_a_position_biased_meta_judge_yields_no_judge_pair():
    judge = MetaJudge(ScriptedPolicy(meta="biased"), char_tokenizer(), META, num_samples=2)
    texts = ["n1 Score: 1", "n5 Score: 2", "n9 Score: 3"]
    pairs = [(m, k) for m in range(3) for k in range(m + 1, 3)]
    results = judge.compare_judgements(
        ["q"] * 3, ["r"] * 3, [texts[m] for m, _ in pairs], [texts[k] for _, k in pairs]
    )
    assert all(r.consistent is False and r.preference == 0.5 for r in results)
    battles = battle_matrix(3, [(m, k, r) for (m, k), r in zip(pairs, results)])
    np.testing.assert_array_equal(battles, battles.T)  # "always A" cancels over both orders
    theta = bradley_terry(battles)
    assert theta.max() - theta.min() < 1e-9  # level: no chosen or rejected judgement
    consistent = MetaJudge(ScriptedPolicy(), char_tokenizer(), META).compare_judgements(
        ["q"], ["r"], [texts[0]], [texts[2]]
    )
    assert consistent[0].winner == "b" and consistent[0].consistent is True
    with pytest.raises(TypeError, match="compare_judgements"):
        judge.compare(["q"], ["a"], ["b"])


def test_a_position_following_meta_judge_is_warned_about(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="self_rewarding_lm_pytorch.pipeline.meta"):
        report = run_meta(tmp_path / "biased", ScriptedPolicy(meta="biased"))
    stats = report["stages"][0]["stats"]
    assert stats["meta_outputs"] > 0 and stats["meta_position_consistency"] == 0.0
    assert stats["judge_pairs"] == 0  # "always A" cancels: every judgement level
    warned = [r.getMessage() for r in caplog.records if "follow the position" in r.getMessage()]
    assert len(warned) == 1 and "in only 0.0% of its comparisons" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="self_rewarding_lm_pytorch.pipeline.meta"):
        run_meta(tmp_path / "consistent", ScriptedPolicy())
    assert not [r for r in caplog.records if "follow the position" in r.getMessage()]


def test_balance_and_share_cap_count_exactly():
    scores = [5, 5, 5, 4, 4, 3, 5, 4]
    pairs = [{"id": str(i), "score_chosen": s} for i, s in enumerate(scores)]
    # floor(0.15 / 0.85 * 20) = 3 of 8
    assert judge_pair_room(20, 0.15) == 3 and judge_pair_room(20, 0.0) == 0
    assert 3 / (3 + 20) <= 0.15 < 4 / (4 + 20)
    # room 3: one of each score (the old rule's rarest count: 1)
    balanced = balance_by_score(pairs, 3, random.Random(0))
    assert sorted(p["score_chosen"] for p in balanced) == [3, 4, 5]
    assert [p["id"] for p in balanced] == sorted((p["id"] for p in balanced), key=int)
    # room 6: the rare score keeps its one pair and the room is still filled, evenly:
    # level 2 (1 + 2 + 2 = 5), the sixth pair to a seeded score above the level
    six = Counter(p["score_chosen"] for p in balance_by_score(pairs, 6, random.Random(0)))
    assert six[3] == 1 and sorted([six[4], six[5]]) == [2, 3] and sum(six.values()) == 6
    # a skewed set: 40 pairs of score 5, 2 of score 1; room 10 keeps both rare ones
    skewed = [{"id": str(i), "score_chosen": 5 if i < 40 else 1} for i in range(42)]
    assert Counter(p["score_chosen"] for p in balance_by_score(skewed, 10, random.Random(1))) == {
        5: 8,
        1: 2,
    }
    assert balance_by_score(pairs, 8, random.Random(0)) == pairs  # room for all: all
    assert balance_by_score(pairs, 0, random.Random(0)) == []
    # seeded: the same choice again
    assert balance_by_score(skewed, 10, random.Random(1)) == balance_by_score(
        skewed, 10, random.Random(1)
    )
    capped = cap_share(pairs, 3, random.Random(0))
    assert len(capped) == 3 and all(p in pairs for p in capped)
    assert cap_share(pairs, 0, random.Random(0)) == []
    assert cap_share(pairs, 100, random.Random(0)) == pairs


def test_an_interrupted_meta_judging_resumes_to_the_same_bytes(tmp_path):
    run_meta(tmp_path / "whole", ScriptedPolicy())
    with pytest.raises(RuntimeError, match="scripted crash"):
        run_meta(tmp_path / "cut", ScriptedPolicy(crash_at=2))
    stage = tmp_path / "cut" / "01-meta-reward-dpo"
    metas = (stage / "meta_judgements.jsonl").read_bytes()
    assert metas.count(b"\n") >= 1 and not (stage / "judge_pairs.jsonl").exists()
    # as a kill mid-write would leave it: the last line torn
    (stage / "meta_judgements.jsonl").write_bytes(metas[: len(metas) - 40])
    run_meta(tmp_path / "cut", ScriptedPolicy())
    for name in ("candidates.jsonl", "pairs.jsonl", "meta_judgements.jsonl", "judge_pairs.jsonl"):
        whole = (tmp_path / "whole" / "01-meta-reward-dpo" / name).read_bytes()
        assert (stage / name).read_bytes() == whole, name


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"judge": "rm"}, "judge must be 'self'"),
        ({"judge_settings": JudgeConfig(num_samples=1)}, "judge_settings.num_samples"),
        ({"judge_settings": JudgeConfig(mode="expected")}, "judge_settings.mode"),
        ({"judge_settings": JudgeConfig(temperature=0.0)}, "judge_settings.temperature"),
        ({"max_judge_pair_share": 1.0}, "max_judge_pair_share"),
        ({"max_judge_pair_share": -0.1}, "max_judge_pair_share"),
        ({"judge_pairs_per_prompt": 0}, "judge_pairs_per_prompt"),
        ({"max_judgement_chars": 0}, "max_judgement_chars"),
        ({"meta_judge_settings": JudgeConfig(num_samples=0)}, "meta_judge_settings"),
        ({"meta_judge_settings": {"mode": "median"}}, "meta_judge_settings.mode"),
        ({"meta_template": {"labels": ["A", "A", "="]}}, "meta_template"),
    ],
)
def test_refused_values_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        MetaRewardStage(**kw).validate()


def _srlm_run(model: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """``srlm run`` of the example with chunks of 1 (one meta-judge chunk per response); ``env`` is added
    (``SRLM_FAULT`` arms the SIGKILL traps of ``tests/fault_inject``)."""
    cmd = [sys.executable, "-m", "self_rewarding_lm_pytorch.cli", "run", str(EXAMPLE)]
    cmd += [f"model.path={model}", f"out={out}", "accelerate.log_with=null"]
    cmd += ["stages.0.chunk_size=1"]
    path = os.pathsep.join([str(HERE / "fault_inject"), os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, "PYTHONPATH": path, **env}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def test_the_example_yaml_runs_end_to_end_and_resumes_after_a_sigkill(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    config = load_run_config(EXAMPLE, check_files=False)
    stage_config = config.stage_objects[0]
    assert stage_config.meta_template.labels == ("1", "2", "0")  # a YAML mapping, converted
    assert stage_config.meta_judge_settings.num_samples == 2
    done = _srlm_run(model, out)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = out / "01-meta-reward-dpo"
    stats = json.loads((stage / "stats.json").read_text())
    records = read(stage / "candidates.jsonl")
    metas = read(stage / "meta_judgements.jsonl")
    judge_pairs = read(stage / "judge_pairs.jsonl")
    assert len(read(stage / "pairs.jsonl")) == stats["pairs"] == 2
    assert stats["meta_judged_responses"] == len(metas) <= len(records)
    assert [m["chunk"] for m in metas] == [0, 1]
    assert stats["judge_pairs"] == len(judge_pairs) <= 2  # share <= 0.5 of the stage's pairs
    verdicts = [
        v for m in metas for c in m["comparisons"] for v in c["verdicts_ab"] + c["verdicts_ba"]
    ]
    assert stats["meta_outputs"] == len(verdicts)
    parsed = sum(v is not None for v in verdicts) / len(verdicts)
    assert stats["meta_parse_rate"] == pytest.approx(parsed)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["judge_pairs"] == "01-meta-reward-dpo/judge_pairs.jsonl"
    assert (stage / "checkpoint").is_dir()
    # SIGKILL in the middle of the second meta-judgements append (its line torn), then resume
    cut = tmp_path / "cut"
    trap = {"SRLM_FAULT": "torn-meta_judgements:01:2", "SRLM_FAULT_RUN": str(cut)}
    killed = _srlm_run(model, cut, **trap)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    torn = (cut / "01-meta-reward-dpo" / "meta_judgements.jsonl").read_bytes()
    assert not torn.endswith(b"\n") and not (cut / "01-meta-reward-dpo" / "checkpoint").exists()
    resumed = _srlm_run(model, cut)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    names = ("candidates.jsonl", "pairs.jsonl", "meta_judgements.jsonl", "judge_pairs.jsonl")
    for name in (*names, "stats.json"):
        assert (cut / "01-meta-reward-dpo" / name).read_bytes() == (stage / name).read_bytes()


def test_a_judge_change_sets_the_meta_files_aside(tmp_path):
    def verdicts_per_order(metas: list[dict]) -> set[int]:
        return {len(c["verdicts_ab"]) for m in metas for c in m["comparisons"]}

    with pytest.raises(RuntimeError, match="scripted crash"):
        run_meta(tmp_path, ScriptedPolicy(crash_at=2))  # 4 judgements, 1 verdict per order
    two = JudgeConfig(num_samples=2, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="scripted crash"):  # the meta-judge changed
        run_meta(tmp_path, ScriptedPolicy(crash_at=2), meta_judge_settings=two)
    three = JudgeConfig(num_samples=3, max_new_tokens=16)  # then the judge as well
    run_meta(tmp_path, ScriptedPolicy(), judge_settings=three, meta_judge_settings=two)
    stage = tmp_path / "01-meta-reward-dpo"
    first = read(stage / "stale-judge-1" / "meta_judgements.jsonl")
    assert first and verdicts_per_order(first) == {1}
    second = read(stage / "stale-judge-2" / "meta_judgements.jsonl")
    assert second and verdicts_per_order(second) == {2}
    assert max(i for m in second for i in m["judgement_indices"]) == 3  # 4 judgements
    new = read(stage / "meta_judgements.jsonl")
    assert new and verdicts_per_order(new) == {2}
    assert max(i for m in new for i in m["judgement_indices"]) <= 2
    assert all(p["chosen_index"] <= 2 for p in read(stage / "judge_pairs.jsonl"))


def test_two_processes_write_the_files_of_one(tmp_path):
    run_meta(tmp_path / "one", ScriptedPolicy(), **DDP_STAGE)
    done = run_two_ranks(HERE / "meta_ddp_job.py", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-4000:]
    calls = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(c["meta_calls"] > 0 for c in calls), calls  # both ranks meta-judged chunks
    for name in ("candidates.jsonl", "pairs.jsonl", "meta_judgements.jsonl", "judge_pairs.jsonl"):
        one = (tmp_path / "one" / "01-meta-reward-dpo" / name).read_bytes()
        assert (tmp_path / "two" / "run" / "01-meta-reward-dpo" / name).read_bytes() == one, name


def test_battle_matrix_counts_samples_ties_and_expected_mode_probabilities():
    sampled = {"verdicts_ab": ["a", "tie", None], "verdicts_ba": ["b", "a"]}
    expected = {
        "verdicts_ab": ["a"],
        "verdicts_ba": ["b"],
        "distribution_ab": {"a": 0.6, "b": 0.3, "tie": 0.1},
        "distribution_ba": {"a": 0.2, "b": 0.7, "tie": 0.1},
    }
    b = battle_matrix(3, [(0, 2, sampled), (1, 2, expected)])
    # sampled: a + a = 2 wins of 0 over 2, b = 1 of 2 over 0, the tie 1/2 each way
    assert b[0, 2] == 2.5 and b[2, 0] == 1.5
    # expected mode: each order adds p(a) + p(tie)/2 and p(b) + p(tie)/2
    assert b[1, 2] == pytest.approx(0.65 + 0.25) and b[2, 1] == pytest.approx(0.35 + 0.75)
    assert b.diagonal().sum() == 0 and b[0, 1] == b[1, 0] == 0
