"""The head_to_head stage: the policy's greedy outputs on held-out prompts, judged against
a baseline (the run's first head_to_head stage, a named earlier one, reference rows);
exact win rates from a scripted policy and a judge preferring longer responses; resume
after a crash; the plan rules; the report's table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny import EOS, char_tokenizer, tiny_model

from self_rewarding_lm_pytorch.config import ConfigError, parse_run_config
from self_rewarding_lm_pytorch.generation import GenerationConfig, GenerationOutput, generate_text
from self_rewarding_lm_pytorch.pipeline import HeadToHeadStage, SelfRewardingTrainer, SFTStage
from self_rewarding_lm_pytorch.pipeline.plan import check_plan
from self_rewarding_lm_pytorch.store import RunDirError
from self_rewarding_lm_pytorch.trainers.checkpoint import load_checkpoint

#: evaluation prompts; the scripted policy answers "question n" with n * (version + 1) y's
HELDOUT = [f"question {n}" for n in range(1, 7)]
#: reference outputs: three characters for every prompt
REFERENCE = [{"prompt": p, "response": "zzz"} for p in HELDOUT]
FILES = ("outputs.jsonl", "judgements.jsonl", "head_to_head.json")
FILES += ("alpaca_eval/model_outputs.json", "alpaca_eval/reference_outputs.json")


class ScriptedPolicy:
    """A generation backend with known answers: the policy writes ``n * (version + 1)``
    y's for "question n", ``version`` counting the checkpoints it was given; as a pairwise
    judge (a prompt with ``<response_a>``) it prefers the longer response. ``fail_after``
    generate calls, it raises (a crash)."""

    max_seq_len = None

    def __init__(self, fail_after: int | None = None) -> None:
        self.tok = char_tokenizer()
        self.version = self.calls = 0
        self.fail_after = fail_after

    def answer(self, text: str) -> str:
        tags = r"<response_a>(.*)</response_a>.*<response_b>(.*)</response_b>"
        pair = re.search(tags, text, re.S)
        if pair:
            a, b = (len(x) for x in pair.groups())
            return f"Verdict: {'A' if a > b else 'B' if a < b else 'tie'}"
        n = int(re.search(r"question (\d+)", text).group(1))
        return "y" * (n * (self.version + 1))

    def generate(self, prompts, config, *, generator=None, **kw) -> GenerationOutput:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("scripted crash")
        self.calls += 1
        seqs = [
            self.tok.encode(self.answer(self.tok.decode(ids)))
            for ids in prompts
            for _ in range(config.num_return_sequences)
        ]
        return GenerationOutput(sequences=seqs, finish_reasons=["eos"] * len(seqs))

    def next_token_logprobs(self, sequences, token_ids):
        raise NotImplementedError

    def load_weights(self, checkpoint) -> None:
        self.version += 1

    def close(self) -> None:
        pass


#: the judge's crash switch and call count, kept outside it (they are not its identity)
JUDGE = {"fail_after": None, "calls": 0}


def longer(prompt: str, response: str) -> float:
    """A pointwise judge: longer is better; it raises after ``JUDGE["fail_after"]`` calls."""
    if JUDGE["fail_after"] is not None and JUDGE["calls"] >= JUDGE["fail_after"]:
        raise RuntimeError("judge crash")
    JUDGE["calls"] += 1
    return float(len(response))


def shorter(prompt: str, response: str) -> float:
    """Another judge: shorter is better."""
    JUDGE["calls"] += 1
    return -float(len(response))


SMALL_SFT = dict(batch_size=2, num_train_steps=1)


def trainer(run_dir: Path, stages, *, backend=None, judge=None) -> SelfRewardingTrainer:
    return SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        datasets={
            "sft": [{"prompt": p, "response": "ok"} for p in HELDOUT],
            "heldout": HELDOUT,
            "ref": REFERENCE,
        },
        judges={"longer": judge or longer},
        stages=stages,
        checkpoints_folder=run_dir,
        accelerate_kwargs=dict(cpu=True),
        backend=backend if backend is not None else "torch",
        progress=False,
    )


def h2h(**kw) -> HeadToHeadStage:
    return HeadToHeadStage(**{"judge": "longer", "max_new_tokens": 8, "chunk_size": 2, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_outputs_are_the_policys_greedy_responses(tmp_path):
    run = tmp_path / "run"
    report = trainer(run, [SFTStage(trainer=SMALL_SFT), h2h(max_prompts=5)]).run()
    rows = read(run / "02-head-to-head" / "outputs.jsonl")
    model = tiny_model()
    load_checkpoint(model, run / "01-sft" / "checkpoint")
    config = GenerationConfig(max_new_tokens=8, temperature=0.0, eos_token_id=EOS)
    expected = generate_text(model, char_tokenizer(), HELDOUT[:5], config)
    assert [r["prompt"] for r in rows] == HELDOUT[:5]  # max_prompts: the first five
    assert [r["response"] for r in rows] == [e[0] for e in expected]
    record = report["stages"][1]
    assert record["baseline"] is None and "head_to_head" not in record  # nothing to judge
    assert not (run / "02-head-to-head" / "judgements.jsonl").exists()
    assert not (run / "02-head-to-head" / "checkpoint").exists()


def test_win_rates_against_the_first_a_named_stage_and_reference_rows(tmp_path):
    run = tmp_path / "run"
    stages = [
        h2h(),  # version 0: n y's; it records the baseline
        SFTStage(trainer=SMALL_SFT),  # the scripted policy's version 1: 2n y's
        h2h(bootstrap=20),  # vs 01: 2n > n on every prompt
        h2h(baseline="ref"),  # vs "zzz": 2n > 3 for n >= 2, below for n = 1
        h2h(baseline="03-head-to-head"),  # the same outputs: all ties
        h2h(baseline="ref", judge="self", pairwise=True),  # the policy compares both orders
    ]
    report = trainer(run, stages, backend=ScriptedPolicy()).run()
    got = {r["stage"]: r for r in report["stages"]}
    assert got["01-head-to-head"]["baseline"] is None
    expected = {  # stage: (baseline, win rate, tie rate, mean chars B)
        "03-head-to-head": ("01-head-to-head", 1.0, 0.0, 3.5),
        "04-head-to-head": ("ref", 5 / 6, 0.0, 3.0),
        "05-head-to-head": ("03-head-to-head", 0.5, 1.0, 7.0),
        "06-head-to-head": ("ref", 5 / 6, 0.0, 3.0),
    }
    for name, (baseline, rate, ties, chars_b) in expected.items():
        h = got[name]["head_to_head"]
        assert got[name]["baseline"] == baseline, name
        assert (h["win_rate"], h["tie_rate"], h["judged"]) == (pytest.approx(rate), ties, 6)
        assert (h["mean_chars_a"], h["mean_chars_b"]) == (7.0, chars_b)  # 2 * mean(1..6)
    assert got["03-head-to-head"]["head_to_head"]["bootstrap_ci95"] == [1.0, 1.0]  # all wins
    assert got["04-head-to-head"]["head_to_head"]["bootstrap_ci95"] is None  # bootstrap: 0
    full = json.loads((run / "06-head-to-head" / "head_to_head.json").read_text())
    assert (full["judge"], full["position_consistency"]) == ("pairwise", 1.0)
    assert full["name_a"] == "06-head-to-head" and full["name_b"] == "ref"
    exported = run / "04-head-to-head" / "alpaca_eval" / "model_outputs.json"
    first = {"instruction": "question 1", "output": "yy", "generator": "04-head-to-head"}
    assert json.loads(exported.read_text())[0] == first
    table = (run / "report.md").read_text().split("## Head-to-head", 1)[1]
    assert "| 04-head-to-head | ref | 6 | 83.3% [" in table
    assert "| 05-head-to-head | 03-head-to-head | 6 | 50.0% [50.0%, 50.0%] |" in table
    assert "01-head-to-head" not in table.replace("| 03-head-to-head | 01-head-to-head", "")
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["stages"][3]["head_to_head"] == got["04-head-to-head"]["head_to_head"]


def test_a_crash_in_sampling_or_judging_resumes_to_the_same_files(tmp_path):
    stages = [h2h(baseline="ref")]
    trainer(tmp_path / "whole", stages, backend=ScriptedPolicy()).run()
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="scripted crash"):  # in the second of 3 chunks
        trainer(crashed, stages, backend=ScriptedPolicy(fail_after=1)).run()
    stage_dir = crashed / "01-head-to-head"
    assert len(read(stage_dir / "outputs.jsonl")) == 2
    JUDGE.update(fail_after=5, calls=0)
    with pytest.raises(RuntimeError, match="judge crash"):  # in the second judged chunk
        trainer(crashed, stages, backend=ScriptedPolicy()).run()
    assert len(read(stage_dir / "outputs.jsonl")) == 6
    assert len(read(stage_dir / "judgements.jsonl")) == 2
    JUDGE.update(fail_after=None, calls=0)
    policy = ScriptedPolicy()
    trainer(crashed, stages, backend=policy).run()
    assert (policy.calls, JUDGE["calls"]) == (0, 8)  # only the two chunks not yet judged
    for name in FILES:
        whole = (tmp_path / "whole" / "01-head-to-head" / name).read_bytes()
        assert (stage_dir / name).read_bytes() == whole, name


def test_the_plan_rules_name_the_stage_the_key_and_the_fix():
    names = dict(datasets={"heldout", "ref"}, judges={"longer"}, models=set())
    with pytest.raises(ConfigError, match=r"stage 01-head-to-head, baseline: '02-head-to-head' "
                       r"is neither 'first', an earlier head_to_head stage \(earlier ones: "
                       r"none\) nor a dataset"):  # fmt: skip
        check_plan([h2h(baseline="02-head-to-head"), h2h()], **names)
    with pytest.raises(ConfigError, match=r"stage 02-head-to-head, baseline: 'refs' is neither .* "
                       r"given in datasets= \(known: heldout, ref\); did you mean 'ref'\?; use "
                       r"baseline='first'"):  # fmt: skip
        check_plan([h2h(), h2h(baseline="refs")], **names)
    with pytest.raises(ConfigError, match=r"stage 01-head-to-head, judge: judge 'gpt4' is not "
                       r"given in judges= \(known: longer\)"):  # fmt: skip
        check_plan([h2h(judge="gpt4")], **names)
    with pytest.raises(ConfigError, match=r"prompts: dataset 'eval' is not given in datasets="):
        check_plan([h2h(prompts="eval")], **names)
    check_plan([h2h(), h2h(baseline="01-head-to-head"), h2h(baseline="ref", judge="self")], **names)
    yaml = {
        "model": {"path": "tiny-llama"},
        "data": {"heldout": {"rows": [{"prompt": "a", "response": "b"}]}},
        "stages": [{"kind": "head_to_head"}, {"kind": "head_to_head", "baseline": "03-sft"}],
    }
    with pytest.raises(ConfigError, match=r"stages\[1\]\.baseline: '03-sft' is neither 'first', "
                       r"an earlier head_to_head stage \(earlier ones: stages\[0\] "
                       r"\(01-head-to-head\)\) nor a dataset defined under data:.*use baseline: "
                       r"first"):  # fmt: skip
        parse_run_config(yaml, check_files=False)
    with pytest.raises(ConfigError, match=r"temperature must be a finite number >= 0"):
        HeadToHeadStage(temperature=-1.0).validate()


def test_pairwise_needs_an_llm_judge(tmp_path):
    with pytest.raises(ValueError, match=r"stage 01-head-to-head: pairwise: true needs an LLM "
                       r"judge .* set pairwise: false"):  # fmt: skip
        trainer(tmp_path, [h2h(baseline="ref", pairwise=True)]).run()


def test_a_changed_judge_of_an_unfinished_stage_judges_its_outputs_again(tmp_path):
    stages = [h2h(baseline="ref")]
    JUDGE.update(fail_after=5, calls=0)
    with pytest.raises(RuntimeError, match="judge crash"):
        trainer(tmp_path, stages, backend=ScriptedPolicy()).run()
    JUDGE.update(fail_after=None, calls=0)
    policy = ScriptedPolicy()
    report = trainer(tmp_path, stages, backend=policy, judge=shorter).run()
    stage_dir = tmp_path / "01-head-to-head"
    assert len(read(stage_dir / "stale-judge-1" / "judgements.jsonl")) == 2
    assert (policy.calls, JUDGE["calls"]) == (0, 12)  # the same outputs, all judged anew
    assert report["stages"][0]["head_to_head"]["win_rate"] == pytest.approx(
        2.5 / 6
    )  # n y's vs 3 z's
    with pytest.raises(RunDirError, match=r"stage 01-head-to-head finished with other settings"):
        trainer(tmp_path, stages, backend=ScriptedPolicy()).run()  # finished: kept


def test_two_sharded_ranks_write_the_files_of_one_process(tmp_path):
    """The chunks dealt to two real ranks (parameters sharded, gathered to sample), the
    self judge's too: the same files as one process (nothing trains between the stages)."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    from self_rewarding_lm_pytorch.cli import main
    from self_rewarding_lm_pytorch.hf import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    judge = {"num_samples": 1, "max_new_tokens": 4, "temperature": 1.0}
    config = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"heldout": {"rows": [{"prompt": p} for p in HELDOUT[:3]]}},  # 3 chunks, 2 ranks
        "reward_config": {
            "prompt_template": "rate {{ response }} for {{ prompt }} : ",
            "reward_regex_template": "{{ reward }}",
        },
        "stages": [
            {"kind": "head_to_head", "max_new_tokens": 4, "chunk_size": 1},
            {"kind": "head_to_head", "max_new_tokens": 4, "chunk_size": 1, "judge_settings": judge},
        ],
        "accelerate": {"cpu": True},
        "seed": 0,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["-q", "run", str(path), f"out={tmp_path / 'one'}"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={port}", "-m", "self_rewarding_lm_pytorch.cli", "-q", "run",
           str(path), f"out={tmp_path / 'two'}", "accelerate.shard_parameters=true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gathered whole" in done.stderr  # it sampled with the gathered weights
    for name in FILES:
        one = (tmp_path / "one" / "02-head-to-head" / name).read_bytes()
        assert (tmp_path / "two" / "02-head-to-head" / name).read_bytes() == one, name
    rows = read(tmp_path / "two" / "02-head-to-head" / "judgements.jsonl")
    assert len(rows) == 3 and all(r["response_a"] == r["response_b"] for r in rows)
