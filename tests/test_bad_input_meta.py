"""Bad-input catalogue, "Meta-Rewarding" (``docs/bad-input.md``): the values a
``meta_reward_dpo`` stage refuses before any work, and a meta-judge whose verdicts never
parse."""

from __future__ import annotations

import copy
import logging

import pytest
import yaml
from test_meta_reward import EXAMPLE, ScriptedPolicy, read, run_meta
from tiny import PROMPTS, char_tokenizer, tiny_model

from self_rewarding_lm_pytorch.config import ConfigError, parse_run_config
from self_rewarding_lm_pytorch.judge import JudgeConfig
from self_rewarding_lm_pytorch.pipeline import MetaRewardStage, SelfRewardingTrainer


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"judge": "rm"}, "stages[0]: judge must be 'self' (the meta-judge is the policy"),
        (
            {"judge_settings": {"num_samples": 1}},
            "stages[0]: judge_settings.num_samples must be at least 2",
        ),
        ({"max_judge_pair_share": 1.0}, "stages[0]: max_judge_pair_share must lie in [0, 1)"),
        (
            {"meta_template": {"prompt_template": "{{ prompt }}{{ response }}{{ judgement_a }}"}},
            "stages[0].meta_template: prompt_template is missing the variable {{ judgement_b }}",
        ),
    ],
)
def test_meta_stage_values_out_of_range(values, message, tmp_path):
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["stages"][0].update(copy.deepcopy(values))
    with pytest.raises(ConfigError) as e:
        parse_run_config(cfg, check_files=False)
    assert str(e.value).startswith(message) and "; " in str(e.value)  # the problem and a fix
    # the Python API: refused when the trainer is built, naming the stage
    with pytest.raises(ConfigError, match=r"stage 01-meta-reward-dpo: judge_settings\.num"):
        SelfRewardingTrainer(
            tiny_model(),
            tokenizer=char_tokenizer(),
            prompt_dataset=PROMPTS,
            stages=[MetaRewardStage(judge_settings=JudgeConfig(num_samples=1))],
            checkpoints_folder=tmp_path / "run",
            accelerate_kwargs=dict(cpu=True),
        )
    assert not (tmp_path / "run").exists()


def test_meta_judge_verdicts_that_never_parse(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="self_rewarding_lm_pytorch.pipeline.meta"):
        report = run_meta(tmp_path, ScriptedPolicy(meta="mute"))
    stats = report["stages"][0]["stats"]
    assert stats["meta_parse_rate"] == 0.0 and stats["meta_outputs"] > 0
    assert stats["judge_pairs"] == 0 and stats["pairs"] == 6  # DPO on the actor pairs alone
    assert read(tmp_path / "01-meta-reward-dpo" / "judge_pairs.jsonl") == []
    assert "the meta-judge's verdicts parsed for only 0.0% of its outputs" in caplog.text


def test_meta_judge_prompt_too_long_for_the_context(tmp_path):
    policy = ScriptedPolicy()
    policy.max_seq_len = 40  # judge prompts fit (about 20 + 16), meta-judge prompts do not
    with pytest.raises(ValueError) as e:
        run_meta(tmp_path, policy)
    msg = str(e.value)
    assert msg.startswith("stage 01-meta-reward-dpo: the meta-judge: item 0:"), msg
    assert "meta_judge_settings.on_too_long: truncate_response" in msg
    assert read(tmp_path / "01-meta-reward-dpo" / "pairs.jsonl")  # the actor pairs are kept
