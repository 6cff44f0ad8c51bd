"""Trainer configs: every setting reaches every trainer, config= and keywords agree."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from x_transformers import Decoder, TransformerWrapper

from self_rewarding_lm_pytorch.config import ConfigError
from self_rewarding_lm_pytorch.data import PreferenceExample, SFTExample
from self_rewarding_lm_pytorch.trainers import (
    DPOConfig,
    DPOTrainer,
    SFTConfig,
    SFTTrainer,
    SPINConfig,
    SPINTrainer,
    TrainingConfig,
    build_config,
)

CPU = dict(cpu=True)

# a valid value differing from every trainer's default, for each TrainingConfig field
CHANGED = dict(
    batch_size=3,
    grad_accum_steps=3,
    num_epochs=4,
    num_train_steps=5,
    start_learning_rate=2e-3,
    end_learning_rate=1e-4,
    warmup_steps=2,
    num_decay_steps=7,
    weight_decay=0.01,
    adam_kwargs={"betas": (0.8, 0.9)},
    max_grad_norm=0.5,
    dropout=0.2,
    max_seq_len=12,
    group_by_length=True,
    early_stop_mode="max",
    check_early_stop_every=3,
    early_stop_patience=2,
    eval_every=2,
    checkpoint_every=4,
    keep_last_checkpoints=2,
    save_final_checkpoint=False,
    log_every=2,
    progress=False,
    project_name="another-project",
    seed=3,
    pad_id=0,
    gradient_checkpointing=True,
)


def tiny_lm(seed: int = 0) -> TransformerWrapper:
    torch.manual_seed(seed)
    return TransformerWrapper(
        num_tokens=32, max_seq_len=32, attn_layers=Decoder(dim=16, depth=1, heads=2)
    )


def pairs(n: int = 4) -> list[PreferenceExample]:
    g = torch.Generator().manual_seed(1)
    ids = lambda k: (torch.randint(1, 32, (k,), generator=g)).tolist()  # noqa: E731
    return [PreferenceExample(ids(3), ids(4), ids(5)) for _ in range(n)]


def sft(n: int = 4) -> list[SFTExample]:
    return [SFTExample([1 + i, 2, 3, 4, 5, 6], 2) for i in range(n)]


def build(cls: type, tmp_path, **kw):
    data = {
        SFTTrainer: dict(train_dataset=sft()),
        DPOTrainer: dict(train_dataset=pairs()),
        SPINTrainer: dict(sft_dataset=sft(), max_seq_len=10),
    }[cls]
    return cls(tiny_lm(), accelerate_kwargs=CPU, output_dir=tmp_path, **{**data, **kw})


@pytest.mark.parametrize("cls", [SFTTrainer, DPOTrainer, SPINTrainer])
def test_every_training_setting_reaches_every_trainer(cls, tmp_path):
    # optimizer "adamw8bit" needs bitsandbytes: tests/test_memory_options.py covers it
    # length_buckets excludes group_by_length: checked on its own below
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert {*CHANGED, "lr_schedule", "optimizer", "length_buckets"} == fields
    bucketed = build(cls, tmp_path, length_buckets=(4, 9))
    assert bucketed.config.length_buckets == bucketed.length_buckets == [4, 9]
    default = cls.config_class()
    schedule = "linear" if default.lr_schedule == "cosine" else "cosine"
    changed = {**CHANGED, "lr_schedule": schedule}
    for name, value in changed.items():
        assert getattr(default, name) != value, name  # each value is really a change
    trainer = build(cls, tmp_path, **changed)
    for name, value in changed.items():
        assert getattr(trainer.config, name) == value, name
        assert getattr(trainer, name) == value, name
    # ... and is used: the optimizer was built from them
    group = trainer._raw_optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.01
    assert group["lr"] == 2e-3


@pytest.mark.parametrize(
    ("cls", "config_class"),
    [(SFTTrainer, SFTConfig), (DPOTrainer, DPOConfig), (SPINTrainer, SPINConfig)],
)
def test_constructor_overrides_are_the_config_fields(cls, config_class, tmp_path):
    assert cls.config_class is config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    accepted = set(config_class.accepted_keys())
    seed_spellings = {"epochs", "learning_rate_num_decay_steps", "valid_every", "spin_λ"}
    bundles = {"spin_kwargs", "filter_kwargs"}
    assert accepted == (fields | seed_spellings | bundles if cls is SPINTrainer else fields)
    # every field is taken as a keyword (here: each at its default value)
    values = dataclasses.asdict(config_class())
    if cls is SPINTrainer:
        values["max_seq_len"] = 10
    trainer = build(cls, tmp_path, **values)
    assert trainer.config == dataclasses.replace(config_class(), **values)
    # a name that is no field (here another trainer's) is refused, naming the valid ones
    foreign = "beta" if cls is not DPOTrainer else "temperature"
    with pytest.raises(
        TypeError, match=rf"unknown argument '{foreign}'.*valid names: .*batch_size"
    ):
        build(cls, tmp_path, **{foreign: 1.0})


def test_config_object_and_keywords_train_the_same(tmp_path):
    settings = dict(beta=0.3, batch_size=2, num_train_steps=2, start_learning_rate=1e-2,
                    loss_type="ipo", progress=False, seed=0)  # fmt: skip
    start = tiny_lm(seed=5)
    a = DPOTrainer(copy.deepcopy(start), train_dataset=pairs(), accelerate_kwargs=CPU,
                   config=DPOConfig(**settings))  # fmt: skip
    b = DPOTrainer(copy.deepcopy(start), train_dataset=pairs(), accelerate_kwargs=CPU,
                   **settings)  # fmt: skip
    assert a.config == b.config
    ma, mb = a.train(), b.train()
    assert ma["loss"] == mb["loss"] and ma["step"] == mb["step"] == 2
    sa, sb = a.unwrapped_model().state_dict(), b.unwrapped_model().state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], v) for k, v in start.state_dict().items())
    # keywords override a given config; the given config itself is left as it was
    config = DPOConfig(**settings)
    c = DPOTrainer(copy.deepcopy(start), train_dataset=pairs(), accelerate_kwargs=CPU,
                   config=config, beta=0.5)  # fmt: skip
    assert (c.beta, c.config.beta, config.beta) == (0.5, 0.5, 0.3)


def test_seed_spellings_of_spin_settings(tmp_path):
    t = build(SPINTrainer, tmp_path, spin_λ=0.3, learning_rate_num_decay_steps=9, valid_every=2,
              epochs=3, filter_kwargs=dict(thres=0.5), spin_kwargs=dict(loss_type="hinge"))  # fmt: skip
    assert (t.lam, t.num_decay_steps, t.eval_every, t.num_epochs) == (0.3, 9, 2, 3)
    assert (t.top_p, t.loss_type) == (0.5, "hinge")
    with pytest.raises(ConfigError, match="pass num_decay_steps or learning_rate_num_decay_steps"):
        build(SPINTrainer, tmp_path, num_decay_steps=3, learning_rate_num_decay_steps=9)


def test_build_config_checks_a_trainer_mapping():
    config = build_config(DPOTrainer, {"beta": 0.2, "batch_size": 2}, "trainer")
    assert isinstance(config, DPOConfig) and (config.beta, config.batch_size) == (0.2, 2)
    with pytest.raises(ConfigError, match=r"trainer: unknown DPOTrainer argument 'bta'; did you "
                       r"mean 'beta'\? \(valid keys: .*batch_size"):  # fmt: skip
        build_config(DPOTrainer, {"bta": 1}, "trainer")
    with pytest.raises(ConfigError, match=r"trainer: batch_size must be >= 1, got 0; "):
        build_config(SFTTrainer, {"batch_size": 0}, "trainer")
    with pytest.raises(ConfigError, match=r"trainer\.lam: expected a number, got str 'x'; "
                       r"SPINTrainer's lam takes float"):  # fmt: skip
        build_config(SPINTrainer, {"spin_λ": "x"}, "trainer")


def test_wrong_type_is_a_type_error_naming_the_expected_type(tmp_path):
    with pytest.raises(TypeError, match=r"^batch_size: expected an integer, got str 'ten'; "
                       r"SFTTrainer's batch_size takes int$") as info:  # fmt: skip
        build(SFTTrainer, tmp_path, batch_size="ten")
    assert isinstance(info.value, ConfigError)  # a ValueError too, as every config error
    with pytest.raises(TypeError, match="SPINTrainer needs max_seq_len"):
        SPINTrainer(tiny_lm(), sft_dataset=sft(), accelerate_kwargs=CPU)
