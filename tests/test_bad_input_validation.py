"""Bad-input catalogue, "Values checked before training" (``docs/bad-input.md``).

Every value, every data file and every prompt is checked before any stage runs: by the
stage configs themselves (``validate()``), against the trainers' configs, and by the
pipeline's pre-flight (``SelfRewardingTrainer.preflight``, run first by ``run()`` and by
``srlm run --check``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from tiny import PROMPTS, SFT_DATA, char_tokenizer, quick_preference, tiny_model
from torch import nn

from self_rewarding_lm_pytorch.config import ConfigError
from self_rewarding_lm_pytorch.judge import JudgeConfig
from self_rewarding_lm_pytorch.pipeline import (
    NotEnoughPairsError,
    PreferenceStage,
    SelfRewardingTrainer,
    SFTStage,
    SPINStage,
)
from self_rewarding_lm_pytorch.store import read_jsonl

CPU = dict(accelerate_kwargs=dict(cpu=True), progress=False)
SFT = SFTStage(trainer=dict(batch_size=4, num_train_steps=1))


preference = quick_preference


def trainer(run_dir: Path, stages, *, datasets=None, judges=None, **kw) -> SelfRewardingTrainer:
    return SelfRewardingTrainer(
        kw.pop("model", None) or tiny_model(),
        tokenizer=char_tokenizer(),
        datasets=datasets if datasets is not None else {"sft": SFT_DATA, "prompts": PROMPTS},
        judges=judges if judges is not None else {"scripted": lambda p, r: float(len(r) % 3)},
        stages=stages,
        checkpoints_folder=str(run_dir),
        **CPU,
        **kw,
    )


def nothing_written(run_dir: Path) -> bool:
    return not (run_dir / "state.json").exists() and not (run_dir / "01-sft").exists()


# ====================================================================== stage values


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("num_candidates", 1, "be at least 2"),
        ("temperature", -0.5, "be a finite number >= 0"),
        ("top_p", 1.5, r"lie in \(0, 1\]"),
        ("judge_settings.temperature", -0.1, "be a finite number >= 0"),
        ("judge_settings.num_samples", 0, "be at least 1"),
        ("max_new_tokens", 0, "be at least 1"),
        ("min_parse_rate", 1.5, r"lie in \[0, 1\]"),
    ],
)
def test_stage_value_out_of_range(tmp_path, key, value, rule):
    stage = PreferenceStage(kind="self_reward_dpo", num_preference_pairs=4, **_nested(key, value))
    # the Python API: refused when the trainer is built, naming the stage and the key
    with pytest.raises(ConfigError, match=rf"stage 02-self-reward-dpo: {key} must {rule}") as e:
        trainer(tmp_path, [SFT, stage])
    assert f"got {value!r}" in str(e.value) and "; " in str(e.value)  # the value and a fix
    assert nothing_written(tmp_path)
    # a config file: refused when it is read, naming the stage's position and the key
    from self_rewarding_lm_pytorch.config import parse_run_config

    cfg = _config_with_dpo(**_nested(key, value))
    with pytest.raises(ConfigError, match=rf"stages\[1\]: {key} must {rule}"):
        parse_run_config(cfg, check_files=False)


def test_old_judge_keys_name_their_new_place():
    import yaml

    from self_rewarding_lm_pytorch.config import parse_run_config

    # the Python API: refused when the stage is made, naming the new key and how to give it
    with pytest.raises(ConfigError) as e:
        PreferenceStage(num_preference_pairs=4, judge_samples=1)
    assert str(e.value) == (
        "PreferenceStage: judge_samples is now judge_settings.num_samples; "
        "pass judge_settings={'num_samples': 1}"
    )
    with pytest.raises(ConfigError, match=r"judge_on_too_long is now judge_settings.on_too_long"):
        PreferenceStage(judge_on_too_long="truncate_left")
    fixed = PreferenceStage(num_preference_pairs=4, judge_settings={"num_samples": 1})
    assert fixed.judge_settings == JudgeConfig(num_samples=1)  # the fix as written works
    # a config file: refused when it is read, naming the stage's position
    cfg = _config_with_dpo(judge_max_new_tokens=12)
    with pytest.raises(ConfigError) as e:
        parse_run_config(cfg, check_files=False)
    msg = str(e.value)
    assert msg.startswith(
        "stages[1].judge_max_new_tokens: judge_max_new_tokens is now "
        "judge_settings.max_new_tokens; write judge_settings: {max_new_tokens: 12}"
    ), msg
    fix = msg.split("; write ", 1)[1]
    cfg["stages"][1] = {"kind": "self_reward_dpo", **yaml.safe_load(fix)}
    stage = parse_run_config(cfg, check_files=False).stage_objects[1]
    assert stage.judge_settings.max_new_tokens == 12 and stage.judge_settings.num_samples == 3


def _config_with_dpo(**dpo) -> dict:
    """A ``srlm run`` config mapping: an SFT stage, then a self_reward_dpo stage of ``dpo``."""
    return {
        "model": {
            "xtransformers": {
                "num_tokens": 256,
                "max_seq_len": 64,
                "attn_layers": {"dim": 16, "depth": 1, "heads": 2},
            }
        },
        "tokenizer": {"kind": "bytes", "eos_id": 10},
        "data": {"sft": {"path": "sft.jsonl"}, "prompts": {"path": "prompts.jsonl"}},
        "stages": [{"kind": "sft"}, {"kind": "self_reward_dpo", **dpo}],
    }


def _nested(key: str, value):
    """``{"a.b": v}`` as ``{"a": {"b": v}}``: a key of a nested config (judge_settings)."""
    head, _, leaf = key.partition(".")
    return {head: {leaf: value}} if leaf else {key: value}


def test_stage_value_of_wrong_type(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"stage 01-external-reward-dpo: temperature: expected a number, got str 'hot'",
    ):
        trainer(tmp_path, [preference(temperature="hot")])
    assert nothing_written(tmp_path)


def test_trainer_argument_of_wrong_type(tmp_path):
    stage = SFTStage(trainer=dict(batch_size="ten"))
    with pytest.raises(ConfigError) as info:
        trainer(tmp_path, [stage])
    msg = str(info.value)
    assert msg.startswith("stage 01-sft: trainer.batch_size: expected an integer, got str 'ten'")
    assert "SFTTrainer" in msg
    # a value of the right type passes, an int is a float where a float is expected
    trainer(tmp_path, [SFTStage(trainer=dict(batch_size=3, start_learning_rate=1))])
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("stage", "excerpt"),
    [
        (SFTStage(trainer=dict(batch_size=0)), "batch_size must be >= 1, got 0; use e.g. 16"),
        (
            quick_preference(trainer=dict(beta=-1.0)),
            "beta must be a finite number > 0, got -1.0",
        ),
        (SPINStage(trainer=dict(top_p=1.5)), r"top_p must lie in \(0, 1\], got 1.5"),
    ],
)
def test_trainer_argument_out_of_range(tmp_path, stage, excerpt):
    # refused when the pipeline is built (not when the stage's trainer is, after SFT trained)
    with pytest.raises(ConfigError, match=rf"^stage 02-[a-z-]+: trainer: {excerpt}"):
        trainer(tmp_path, [SFT, stage])
    assert nothing_written(tmp_path)


def test_greedy_sampling_of_several_candidates(tmp_path):
    with pytest.raises(
        ConfigError, match=r"stage 01-external-reward-dpo: temperature must be above 0"
    ) as e:
        trainer(tmp_path, [preference(temperature=0.0, num_candidates=4)])
    assert "chosen == rejected" in str(e.value) and "temperature > 0" in str(e.value)


def test_greedy_judge_with_several_samples_warns(tmp_path):
    stage = PreferenceStage(
        kind="self_reward_dpo",
        num_preference_pairs=4,
        judge_settings=JudgeConfig(num_samples=3, temperature=0.0),
    )
    with pytest.warns(
        UserWarning,
        match=r"stage 01-self-reward-dpo: judge_settings.num_samples=3 with "
        r"judge_settings.temperature=0",
    ) as rec:
        trainer(tmp_path, [stage])
    assert "judge_settings.num_samples=1" in str(rec[0].message)
    with warnings.catch_warnings():  # one sample, or a sampling judge: no warning
        warnings.simplefilter("error")
        trainer(
            tmp_path,
            [
                PreferenceStage(
                    num_preference_pairs=4,
                    judge_settings=JudgeConfig(num_samples=1, temperature=0.0),
                )
            ],
        )
        trainer(
            tmp_path,
            [PreferenceStage(num_preference_pairs=4, judge_settings=JudgeConfig(num_samples=3))],
        )


def test_zero_self_reward_iterations(tmp_path):
    run = SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        train_sft_dataset=SFT_DATA,
        prompt_dataset=PROMPTS,
        self_reward_num_iterations=0,
        num_preference_pairs=8,
        checkpoints_folder=str(tmp_path),
        **CPU,
    )
    assert [s.kind for s in run.stages] == ["sft"]  # 0 iterations: no DPO stage


# ====================================================================== data and prompts


def test_prompt_too_long_for_its_response_fails_before_training(tmp_path):
    # 93 + max_new_tokens=4 > the context of 96; the prompt is item 9 (chunk 2, position 1)
    prompts = PROMPTS[:9] + ["x" * 93]
    run = trainer(tmp_path, [SFT, preference()], datasets={"sft": SFT_DATA, "prompts": prompts})
    with pytest.raises(ValueError) as info:
        run.run()
    msg = str(info.value)
    assert msg.startswith("stage 02-external-reward-dpo, dataset 'prompts': prompt 9 is 93 tokens")
    assert "max_new_tokens=4" in msg and "97 positions" in msg and "of 96" in msg
    assert "lower the stage's max_new_tokens" in msg
    assert nothing_written(tmp_path)  # refused before the SFT stage trained
    # a prompt that fits the model but not preference_max_seq_len is named with that key
    run = trainer(
        tmp_path, [preference()], datasets={"prompts": ["ok", "y" * 40]}, preference_max_seq_len=32
    )
    with pytest.raises(
        ValueError,
        match=r"prompt 1 is 40 tokens long, which leaves no room .* preference_max_seq_len of 32",
    ) as info:
        run.run()
    assert "raise preference_max_seq_len" in str(info.value)


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_blank_prompt(tmp_path, blank):
    run = trainer(
        tmp_path, [SFT, preference()], datasets={"sft": SFT_DATA, "prompts": ["fine", blank]}
    )
    with pytest.raises(ValueError, match=r"prompt dataset 'prompts' item 1 is (empty|blank)") as e:
        run.run()
    assert "remove the item or fill it in" in str(e.value)
    assert nothing_written(tmp_path)


def test_empty_sft_response_warns(tmp_path):
    data = SFT_DATA[:4] + [
        {"prompt": "say nothing", "response": ""},
        {"prompt": "x", "response": " "},
    ]
    run = trainer(tmp_path, [SFT], datasets={"sft": data})
    with pytest.warns(
        UserWarning,
        match=r"dataset 'sft' has 2 item\(s\) with an empty response \(items \[4, 5\]\)",
    ) as rec:
        run.run()
    msg = next(str(w.message) for w in rec if "empty response" in str(w.message))
    assert "stage 01-sft" in msg and "fill in or remove them" in msg
    # srlm run --check and the Python pre-flight warn the same way, without training
    with pytest.warns(UserWarning, match=r"empty response"):
        trainer(tmp_path / "again", [SFT], datasets={"sft": data}).preflight()
    assert nothing_written(tmp_path / "again")


def _write_config(tmp_path: Path, prompts_file: str, prompts_text: str) -> Path:
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_DATA[:4]))
    (tmp_path / prompts_file).write_text(prompts_text)
    cfg = {
        "model": {
            "xtransformers": {
                "num_tokens": 256,
                "max_seq_len": 64,
                "attn_layers": {"dim": 16, "depth": 1, "heads": 2},
            }
        },
        "tokenizer": {"kind": "bytes", "eos_id": 10},
        "data": {"sft": {"path": "sft.jsonl"}, "prompts": {"path": prompts_file}},
        "stages": [
            {"kind": "sft", "trainer": {"batch_size": 2, "num_train_steps": 1}},
            {
                "kind": "self_reward_dpo",
                "num_preference_pairs": 2,
                "max_new_tokens": 8,
                "judge_settings": {"max_new_tokens": 4},
                "trainer": {"batch_size": 2},
            },
        ],
        "accelerate": {"cpu": True},
        "out": "runs/x",
        "progress": False,
    }
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("name", "text", "expect"),
    [
        (
            "prompts.jsonl",
            '{"prompt": "hi"}\n{"prompt": "' + "z" * 60 + '"}\n',
            "stage 02-self-reward-dpo, dataset 'prompts': prompt 1 is 60 tokens long",
        ),
        ("prompts.jsonl", '{"prompt": "hi"}\n{"prompt": \n', "prompts.jsonl:2: not valid JSON"),
        ("prompts.jsonl", '{"prompt": "hi"}\n{"prompt": "  "}\n', "item 1 is blank"),
    ],
    ids=["prompt-too-long", "broken-jsonl-line", "blank-prompt"],
)
def test_check_runs_the_preflight(tmp_path, capsys, name, text, expect):
    from self_rewarding_lm_pytorch.cli import main

    config = _write_config(tmp_path, name, text)
    assert main(["run", str(config), "--check"]) == 1
    err = capsys.readouterr().err
    assert "srlm run: error: ValueError: " in err and expect in err, err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


# ====================================================================== the judge


def test_self_judge_settings_checked_before_training(tmp_path):
    from self_rewarding_lm_pytorch.judge import RewardConfig

    # expected-score judging needs the score values to weigh: refused before SFT trains
    config = RewardConfig(
        prompt_template="rate {{ prompt }} / {{ response }}",
        reward_regex_template="Score: {{ reward }}",
    )
    stage = PreferenceStage(
        num_preference_pairs=4, judge_settings=JudgeConfig(mode="expected"), max_new_tokens=4
    )
    run = trainer(tmp_path, [SFT, stage], reward_prompt_config=config)
    with pytest.raises(
        ValueError,
        match=r"stage 02-self-reward-dpo: the self judge: mode='expected' needs reward_config.score_values",
    ) as e:
        run.run()
    assert "use mode='mean'" in str(e.value)
    assert nothing_written(tmp_path)


def test_constant_judge_stops_early(tmp_path):
    run = trainer(
        tmp_path, [preference(num_preference_pairs=4)], judges={"scripted": lambda p, r: 3.0}
    )
    with pytest.raises(NotEnoughPairsError) as info:
        run.run()
    msg = str(info.value)
    assert msg.startswith("stage 01-external-reward-dpo: the judge gives no signal")
    assert "scores seen: 3" in msg and "an external judge must score different responses" in msg
    judged = read_jsonl(tmp_path / "01-external-reward-dpo" / "candidates.jsonl")
    assert 16 <= len(judged) < len(PROMPTS)  # stopped after the first chunks, records kept


# ====================================================================== the context rule


def test_spin_on_ragged_prompts(tmp_path):
    # prompts of 7 and 9 tokens in a 96-token context; preference_max_seq_len stays 1024
    data = [{"prompt": "a" * 7, "response": "xy"}, {"prompt": "b" * 9, "response": "zw"}]
    stage = SPINStage(cycles=1, trainer=dict(batch_size=2, temperature=1.0))
    run = trainer(tmp_path, [stage], datasets={"sft": data})
    spin = run.run()["stages"][0]
    assert spin["stage"] == "01-spin"
    # generate: each row stops at its own budget, and its result is the one it gets alone;
    # the x-transformers path and a plain model with learned positions (which would index
    # past its 40 positions if a finished row stayed in the batch)
    from self_rewarding_lm_pytorch.generation import generate

    prompts = [[5] * 3, [6] * 9, [7] * 3, [8] * 3, [9] * 3]
    limits = [40 - len(p) for p in prompts]  # the 9-token row stops first, alone
    for model in (tiny_model(max_seq_len=40), LearnedPositionsLM(context=40)):
        out = generate(model, prompts, max_new_tokens_per_prompt=limits, temperature=0)
        alone = [
            generate(model, [p], max_new_tokens=m, temperature=0).sequences[0]
            for p, m in zip(prompts, limits)
        ]
        assert out.sequences == alone and [len(s) for s in alone] == limits
    with pytest.raises(ValueError, match=r"prompt 1 is 9 tokens long; with max_new_tokens=32"):
        generate(tiny_model(max_seq_len=40), prompts, max_new_tokens_per_prompt=[37, 32, 4, 9, 1])


class LearnedPositionsLM(nn.Module):
    """A plain causal LM (running mean of token + learned position embeddings)."""

    def __init__(self, context: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = nn.Embedding(128, 16), nn.Embedding(context, 16)
        self.head = nn.Linear(16, 128)
        self.max_seq_len = context

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        h = torch.cumsum(self.emb(ids) + self.pos(pos)[None], 1) / (pos[None, :, None] + 1)
        return self.head(h)


@pytest.mark.parametrize("judge_kind", ["self", "external"])
def test_judge_prompt_that_cannot_fit_whatever_the_response(tmp_path, judge_kind):
    from self_rewarding_lm_pytorch.judge import LLMJudge, RewardConfig

    # template + prompt alone (60 + 15 tokens) and 32 new judge tokens exceed the 96 context
    config = RewardConfig(
        prompt_template="x" * 60 + " {{ prompt }} / {{ response }}",
        reward_regex_template="Score: {{ reward }}",
    )
    if judge_kind == "self":
        stage = PreferenceStage(
            num_preference_pairs=4, max_new_tokens=4, judge_settings=JudgeConfig(max_new_tokens=32)
        )
        run = trainer(tmp_path, [SFT, stage], reward_prompt_config=config)
        where = "stage 02-self-reward-dpo, dataset 'prompts': prompt 0: the judge prompt"
    else:
        judge = LLMJudge(tiny_model(seed=1), char_tokenizer(), config, max_new_tokens=32)
        run = trainer(tmp_path, [SFT, preference(judge="llm")], judges={"llm": judge})
        where = "stage 02-external-reward-dpo, dataset 'prompts': prompt 0: the judge prompt"
    with pytest.raises(ValueError) as info:
        run.run()
    msg = str(info.value)
    assert msg.startswith(where), msg
    assert "more than the judge model's context of 96" in msg and "truncate_left" in msg
    assert nothing_written(tmp_path)  # refused before SFT trained


def test_generated_prompts_need_an_earlier_prompt_generation_stage(tmp_path):
    from self_rewarding_lm_pytorch.pipeline import PromptGenerationStage

    stages = [SFT, PreferenceStage(num_preference_pairs=4, prompts="generated")]
    with pytest.raises(ValueError) as info:  # refused when built, before SFT trains
        trainer(tmp_path, [*stages, PromptGenerationStage(num_prompts=4)])
    assert str(info.value) == (
        "stage 02-self-reward-dpo: prompts='generated' needs a prompt_generation stage before "
        "this stage; add one or name a prompt dataset"
    )
    assert nothing_written(tmp_path)
