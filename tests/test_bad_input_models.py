"""The bad-input catalogue, area "Models, tokenizers, judges and prompts" (see
``docs/bad-input.md``): one test per row of that table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import PROMPTS, SFT_DATA, char_tokenizer, quick_preference, tiny_model
from torch import nn

from self_rewarding_lm_pytorch.judge import JudgeResult, RewardModelJudge
from self_rewarding_lm_pytorch.pipeline import (
    JudgeParseError,
    SelfRewardingTrainer,
)
from self_rewarding_lm_pytorch.store import read_jsonl
from self_rewarding_lm_pytorch.trainers.checkpoint import load_checkpoint, save_checkpoint

DPO = "01-external-reward-dpo"


def _preference_run(run_dir, judge) -> SelfRewardingTrainer:
    stage = quick_preference(judge="external")
    return SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        datasets={"sft": SFT_DATA, "prompts": PROMPTS},
        judges={"external": judge},
        stages=[stage],
        checkpoints_folder=str(run_dir),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )


class _NoScoreJudge:
    """A Judge object that reports only ``score=None`` (no samples, no reasons)."""

    def score(self, prompts, responses, *, generator=None):
        return [JudgeResult(score=None) for _ in prompts]


class _NaNReward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), math.nan)


@pytest.mark.parametrize("kind", ["callable", "judge_object", "reward_model"])
def test_external_judge_that_never_scores(tmp_path, kind):
    """Every judge kind reports its outputs, so the parse-rate stop sees an external judge
    that gives no score, instead of running on until the prompts run out."""
    judge = {
        "callable": lambda prompt, response: None,
        "judge_object": _NoScoreJudge(),
        "reward_model": RewardModelJudge(_NaNReward(), char_tokenizer()),
    }[kind]
    with pytest.raises(JudgeParseError) as info:
        _preference_run(tmp_path, judge).run()
    msg = str(info.value)
    assert msg.startswith("stage 01-external-reward-dpo: the judge produced a parsable score")
    assert "parsable score for only 0.0%" in msg and "The most common failure:" in msg
    # the fixes are those of an external judge (it already is one)
    assert "check the external judge 'external'" in msg and "use an external judge" not in msg
    kept = read_jsonl(tmp_path / DPO / "candidates.jsonl")  # the judged candidates are kept
    assert kept and all(s is None for r in kept for s in r["scores"])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from self_rewarding_lm_pytorch.hf import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _lora(folder: Path, targets: list[str]):
    from self_rewarding_lm_pytorch.config import LoRAConfig
    from self_rewarding_lm_pytorch.hf import apply_lora, load_model

    return apply_lora(load_model(folder), LoRAConfig(r=4, alpha=8, target_modules=targets))


def test_lora_checkpoint_into_a_model_without_lora(tiny_llama, tmp_path):
    from self_rewarding_lm_pytorch.hf import load_model

    ckpt = save_checkpoint(_lora(tiny_llama, ["q_proj"]), tmp_path / "checkpoint")
    plain = load_model(tiny_llama)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_checkpoint(plain, ckpt)
    msg = str(info.value)
    assert "holds LoRA adapter weights" in msg and "model has no LoRA adapters" in msg
    assert "apply the same LoRA first" in msg and "hf.load_model" in msg
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())  # untouched


def test_lora_checkpoint_with_other_lora_settings(tiny_llama, tmp_path):
    ckpt = save_checkpoint(_lora(tiny_llama, ["q_proj"]), tmp_path / "checkpoint")
    with pytest.raises(ValueError) as info:
        load_checkpoint(_lora(tiny_llama, ["q_proj", "v_proj"]), ckpt)
    msg = str(info.value)
    assert "does not match the model's adapter 'default'" in msg and "v_proj" in msg
    assert "LoRA settings (target modules) it was saved with" in msg


def test_llm_judge_unknown_setting():
    from self_rewarding_lm_pytorch.judge import DEFAULT_REWARD_CONFIG, LLMJudge

    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['samples'\]") as info:
        LLMJudge(tiny_model(), char_tokenizer(), DEFAULT_REWARD_CONFIG, samples=3)
    assert "'num_samples'" in str(info.value)  # the valid names are listed


def test_llm_judge_engine_option_with_a_backend():
    from self_rewarding_lm_pytorch.generation import TorchBackend
    from self_rewarding_lm_pytorch.judge import DEFAULT_REWARD_CONFIG, LLMJudge

    backend = TorchBackend(tiny_model())
    with pytest.raises(ValueError, match=r"generation_kwargs \['share_prefix'\] are options"):
        LLMJudge(
            backend, char_tokenizer(), DEFAULT_REWARD_CONFIG, generation_kwargs={"share_prefix": 0}
        )
