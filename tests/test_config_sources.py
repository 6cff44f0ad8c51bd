"""Every stage key has one source: its dataclass field.

For each stage kind, the keys accepted by the Python dataclass, by a YAML stage mapping and
by ``srlm run CONFIG stages.N.KEY=VALUE`` are exactly the dataclass's fields (each with its
value reaching the stage object); the same for a stage's ``trainer:`` against its trainer's
config class, for the judge sampling keys against ``JudgeConfig``, and for the sampling
flags of ``srlm judge`` / ``srlm generate`` (the flag names themselves are checked against
the fields by ``test_cli.py::test_sampling_flags_are_the_fields_of_their_dataclass``).
The non-default value each field gets is derived from its type and default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml

from self_rewarding_lm_pytorch.config import (
    ConfigError,
    load_run_config,
    parse_run_config,
    to_dict,
)
from self_rewarding_lm_pytorch.generation import GenerationConfig
from self_rewarding_lm_pytorch.judge import JudgeConfig
from self_rewarding_lm_pytorch.pairs import PAIR_STRATEGIES
from self_rewarding_lm_pytorch.pipeline import STAGE_TRAINERS, STAGE_TYPES, check_plan
from self_rewarding_lm_pytorch.pipeline.health import JudgeHealthConfig
from self_rewarding_lm_pytorch.pipeline.plan import YAML_PLAN
from self_rewarding_lm_pytorch.pipeline.stages import check_trainer_kwargs
from self_rewarding_lm_pytorch.trainers import build_config

NOT_A_KEY = "not_a_setting"
#: names the test configs define, so a changed name field still names something
DATASETS = {"sft", "sft2", "prompts", "prompts2"}
JUDGES = {"rm", "rm2"}
#: the base mapping of each kind (an external judge needs a judge name)
BASE = {kind: {"kind": kind} for kind in STAGE_TYPES} | {
    "external_reward_dpo": {"kind": "external_reward_dpo", "judge": "rm"},
    "eft_build": {"kind": "eft_build", "inputs": "sft"},
    "head_to_head": {"kind": "head_to_head", "prompts": "prompts"},
}
#: stage fields whose value the kind itself fixes, with the rule that says so
FIXED = {
    "kind": "selects the stage dataclass (each case is one kind)",
    "self_reward_dpo.judge": "a self_reward_dpo stage judges with the model itself",
    "external_reward_dpo.judge_model": "only the self judge samples a frozen model",
    "meta_reward_dpo.judge": "the meta-judge is the policy: it judges with the model itself",
}
#: a value to try for a field whose type says too little (a partial mapping)
SAMPLES: dict[str, Any] = {
    "generation": {"backend": "vllm"},
    "judge_health": JudgeHealthConfig(rows="sft", min_accuracy=0.5),
    "baseline": "prompts",
    "judge": "rm2",
}
#: YAML-only refusals: a srlm run file has no models: section
YAML_ONLY_REFUSED = {"prompt_generation.generator_model"}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _words(help_text: str) -> list[str]:
    """The values a field's help names: quoted ('linear') or listed after "one of"."""
    quoted = re.findall(r"'([A-Za-z_]+)'", help_text)
    listed = re.findall(r"one of ([\w, ]+)", help_text)
    return quoted + [w.strip() for part in listed for w in part.split(",") if w.strip()]


def _candidates(tp: Any, default: Any, help_text: str = "") -> list[Any]:
    """Values of type ``tp`` other than ``default``, most plain first."""
    if get_origin(tp) in (Union, types.UnionType):
        out = []
        for arg in get_args(tp):
            if arg is not type(None):
                out += _candidates(arg, None if default is None else default, help_text)
        return [v for v in out if v != default]
    if get_origin(tp) is Literal:
        return [c for c in get_args(tp) if c != default]
    if tp is bool:
        return [not default]
    if tp is int:
        return [2 if default is None else default + 1]
    if tp is float:
        return [0.5, 0.1] if not default else [default / 2, default * 2]
    if tp is str:
        base = [f"{default}2"] if default else ["sft"]
        return [*base, *(w for w in _words(help_text) if w != default)]
    if tp is Any:  # a registry name (pair_strategy) or anything else
        return [s for s in PAIR_STRATEGIES if s != default]
    if get_origin(tp) is list:
        (inner,) = get_args(tp)
        return [[*(default or []), v] for v in _candidates(inner, None)]
    if get_origin(tp) is dict or tp is dict:
        return [{}] if default is None else []
    if dataclasses.is_dataclass(tp):  # a nested config, with one field changed
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            for v in _candidates(hints[f.name], _default(f), f.metadata.get("help", "")):
                return [tp(**{f.name: v})]
    return []


def _pick(cls: type, name: str, default: Any, ok: Any) -> Any:
    """The first candidate value of field ``name`` of ``cls`` that ``ok(value)`` accepts."""
    if name in SAMPLES:
        return SAMPLES[name]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    tp = typing.get_type_hints(cls)[name]
    tried = []
    for value in _candidates(tp, default, f.metadata.get("help", "")):
        try:
            ok(value)
            return value
        except (ConfigError, TypeError, ValueError) as exc:
            tried.append(f"{value!r}: {exc}")
    pytest.fail(f"{cls.__name__}.{name}: no non-default value of {tp} accepted ({tried})")


def _yaml_value(value: Any) -> str:
    """``value`` as the right side of a ``KEY=VALUE`` override (YAML flow style)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _config(stage: dict[str, Any], judge: dict[str, Any] | None = None) -> dict[str, Any]:
    rm = {"kind": "llm", "path": "judge", **(judge or {})}
    return {
        "model": {"path": "model"},
        "data": {name: {"path": f"{name}.jsonl"} for name in sorted(DATASETS)},
        "judges": {name: rm for name in sorted(JUDGES)},
        "stages": [stage],
    }


def _yaml_stage(stage: dict[str, Any]) -> Any:
    return parse_run_config(_config(stage), check_files=False).stage_objects[0]


def _override(tmp_path, config: dict[str, Any], overrides: list[str]) -> Any:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_run_config(path, check_files=False, overrides=overrides)


def _python_stage(kind: str, **values: Any) -> Any:
    stage = STAGE_TYPES[kind](**{**BASE[kind], **values})
    check_trainer_kwargs(stage)
    check_plan([stage], datasets=DATASETS, judges=JUDGES, models={"self2"})
    return stage


def _stage_fields(kind: str) -> list[str]:
    return [f.name for f in dataclasses.fields(STAGE_TYPES[kind]) if f.init]


@pytest.mark.parametrize("kind", list(STAGE_TYPES))
def test_stage_keys_are_the_dataclass_fields_in_python_yaml_and_overrides(kind, tmp_path):
    cls, base = STAGE_TYPES[kind], BASE[kind]
    default_stage = _python_stage(kind)
    checked = []
    for name in _stage_fields(kind):
        if name in FIXED or f"{kind}.{name}" in FIXED or name == "trainer":
            continue  # trainer: the next test, key by key
        default = getattr(default_stage, name)
        value = _pick(cls, name, default, lambda v, n=name: _python_stage(kind, **{n: v}))
        expected = _python_stage(kind, **{name: value})
        assert getattr(expected, name) == value != default, name
        if f"{kind}.{name}" in YAML_ONLY_REFUSED:
            with pytest.raises(ConfigError, match=rf"stages\[0\]\.{name}: srlm run supports"):
                _yaml_stage({**base, name: value})
            with pytest.raises(ConfigError, match=rf"stages\[0\]\.{name}: srlm run supports"):
                _override(tmp_path, _config(base), [f"stages.0.{name}={_yaml_value(value)}"])
            continue
        plain = to_dict(value)  # a nested config (judge_settings) as a YAML mapping
        assert _yaml_stage({**base, name: plain}) == expected, name
        cfg = _override(tmp_path, _config(base), [f"stages.0.{name}={_yaml_value(plain)}"])
        assert cfg.stage_objects[0] == expected, name
        checked.append(name)
    assert checked, kind
    with pytest.raises(ConfigError, match=rf"unknown key 'stages\[0\]\.{NOT_A_KEY}'"):
        _yaml_stage({**base, NOT_A_KEY: 1})
    with pytest.raises(ConfigError, match=rf"^override 'stages.0.{NOT_A_KEY}=1': a stage of"):
        _override(tmp_path, _config(base), [f"stages.0.{NOT_A_KEY}=1"])
    with pytest.raises(TypeError):
        cls(**{NOT_A_KEY: 1})


TRAINER_KINDS = [k for k in STAGE_TYPES if STAGE_TYPES[k] in STAGE_TRAINERS]


@pytest.mark.parametrize("kind", TRAINER_KINDS)
def test_trainer_keys_are_the_trainer_config_fields(kind, tmp_path):
    trainer = STAGE_TRAINERS[STAGE_TYPES[kind]]
    config_class, base = trainer.config_class, BASE[kind]
    defaults = config_class()
    for f in dataclasses.fields(config_class):
        default = getattr(defaults, f.name)

        def accepted(v: Any, n: str = f.name) -> None:
            assert getattr(build_config(trainer, {n: v}, "trainer"), n) == v

        value = _pick(config_class, f.name, default, accepted)
        kwargs = {f.name: value}
        python = _python_stage(kind, trainer=kwargs)
        assert python.trainer == kwargs
        assert _yaml_stage({**base, "trainer": kwargs}) == python, f.name
        override = f"stages.0.trainer.{f.name}={_yaml_value(value)}"
        assert _override(tmp_path, _config(base), [override]).stage_objects[0] == python
    with pytest.raises(ConfigError, match=r"stages\[0\]: trainer: unknown \w+ argument"):
        _yaml_stage({**base, "trainer": {NOT_A_KEY: 1}})
    text = f"stages.0.trainer.{NOT_A_KEY}=1"
    with pytest.raises(ConfigError) as info:
        _override(tmp_path, _config(base), [text])
    assert str(info.value).startswith(
        f"override {text!r}: the trainer: of a stage of kind {kind!r} ({config_class.__name__}) "
        f"has no key {NOT_A_KEY!r}"
    )


def _judge_values() -> dict[str, Any]:
    defaults = JudgeConfig()
    return {
        f.name: _pick(
            JudgeConfig,
            f.name,
            getattr(defaults, f.name),
            lambda v, n=f.name: JudgeConfig(**{n: v}).validate(),
        )
        for f in dataclasses.fields(JudgeConfig)
    }


def test_judge_sampling_keys_are_the_judge_config_fields(tmp_path):
    """A judge spec's sampling keys and a stage's judge_settings are JudgeConfig's fields."""
    stage = BASE["self_reward_dpo"]
    for name, value in _judge_values().items():
        expected = JudgeConfig(**{name: value})
        cfg = parse_run_config(_config(stage, judge={name: value}), check_files=False)
        assert cfg.judges["rm"].judge_config() == expected, name
        cfg = _override(tmp_path, _config(stage), [f"judges.rm.{name}={_yaml_value(value)}"])
        assert cfg.judges["rm"].judge_config() == expected, name
        python = _python_stage("self_reward_dpo", judge_settings={name: value})
        assert python.judge_settings == expected, name
        assert _yaml_stage({**stage, "judge_settings": {name: value}}) == python, name
        text = f"stages.0.judge_settings.{name}={_yaml_value(value)}"
        assert _override(tmp_path, _config(stage), [text]).stage_objects[0] == python, name
    with pytest.raises(ConfigError, match=rf"unknown key 'judges\.rm\.{NOT_A_KEY}'"):
        parse_run_config(_config(stage, judge={NOT_A_KEY: 1}), check_files=False)
    with pytest.raises(ConfigError, match=rf"^override 'judges.rm.{NOT_A_KEY}=1': JudgeSpec"):
        _override(tmp_path, _config(stage), [f"judges.rm.{NOT_A_KEY}=1"])
    with pytest.raises(ConfigError, match=rf"judge_settings\.{NOT_A_KEY}"):
        _yaml_stage({**stage, "judge_settings": {NOT_A_KEY: 1}})
    with pytest.raises(ConfigError, match=rf"^override 'stages.0.judge_settings.{NOT_A_KEY}=1'"):
        _override(tmp_path, _config(stage), [f"stages.0.judge_settings.{NOT_A_KEY}=1"])


def _flag_args(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        return [flag, _yaml_value(value)]
    return [flag, "none" if value is None else str(value)]


@pytest.mark.parametrize("command", ["judge", "generate"])
def test_sampling_flag_values_reach_their_config(command):
    """Each sampling flag of ``srlm judge`` / ``generate`` sets its config field."""
    from self_rewarding_lm_pytorch.cli import build_parser, dataclass_from_args, parser

    if command == "judge":
        cls, excluded, values = JudgeConfig, set(), _judge_values()
        argv = ["judge", "--input", "x", "--out", "y"]
    else:
        cls, excluded = GenerationConfig, set(parser.GENERATE_EXCLUDED)
        argv = ["generate", "--model", "m", "--prompts", "p", "--out", "o"]
        base = dataclass_from_args(cls, build_parser().parse_args(argv), exclude=excluded)
        values = {
            f.name: _pick(
                cls,
                f.name,
                getattr(base, f.name),
                lambda v, n=f.name: dataclasses.replace(base, **{n: v}),
            )
            for f in dataclasses.fields(cls)
            if f.name not in excluded
        }
    for name, value in values.items():
        ns = build_parser().parse_args([*argv, *_flag_args(name, value)])
        config = dataclass_from_args(cls, ns, exclude=excluded)
        assert getattr(config, name) == value, name
        if isinstance(config, JudgeConfig):
            config.validate()


def test_trainer_config_object_is_stored_as_its_non_default_fields():
    """``SFTStage(trainer=SFTConfig(batch_size=8))`` is ``SFTStage(trainer={"batch_size": 8})``
    (so its fingerprint and config.yaml are those of the dict); another class is refused."""
    for stage_cls, trainer in STAGE_TRAINERS.items():
        config_class = trainer.config_class
        kind = next(k for k, c in STAGE_TYPES.items() if c is stage_cls)
        defaults = config_class()
        name, value = "batch_size", defaults.batch_size + 4
        from_object = stage_cls(**BASE[kind], trainer=config_class(**{name: value}))
        assert from_object == stage_cls(**BASE[kind], trainer={name: value})
        assert to_dict(from_object)["trainer"] == {name: value}  # as config.yaml writes it
        check_trainer_kwargs(from_object)
        assert stage_cls(**BASE[kind], trainer=config_class()).trainer == {}
        other = next(t.config_class for t in STAGE_TRAINERS.values() if t is not trainer)
        with pytest.raises(ConfigError, match=rf"trainer must be {config_class.__name__}\("):
            stage_cls(**BASE[kind], trainer=other())


def test_yaml_plan_messages_name_the_stage_key_and_section():
    """srlm run checks names with pipeline.check_plan, worded for a YAML file."""
    stages = [
        ({"kind": "sft", "datasets": ["sft", "promts"]}, "stages[0].datasets: dataset 'promts' "
         "is not defined under data:; did you mean 'prompts'?"),
        ({"kind": "sft", "datasets": []}, "stages[0].datasets: the list is empty; name the "
         'SFT data, e.g. datasets: ["sft"]'),
        ({"kind": "spin", "dataset": "sfx"}, "stages[0].dataset: dataset 'sfx' is not defined "
         "under data:; did you mean 'sft'?"),
        ({"kind": "self_reward_dpo", "replay": "eft"}, "stages[0].replay: dataset 'eft' is not "
         "defined under data:"),
        ({"kind": "self_reward_dpo", "judge": "rm"}, "stages[0]: a self_reward_dpo stage judges "
         "with the model itself (judge: self), not 'rm'; use kind: external_reward_dpo"),
        ({"kind": "external_reward_dpo", "judge": "rn2"}, "stages[0].judge: judge 'rn2' is not "
         "defined under judges:; did you mean 'rm2'?"),
        ({"kind": "external_reward_dpo"}, "stages[0].judge: an external_reward_dpo stage needs "
         "an external judge, not 'self'; name one defined under judges: (known: rm, rm2)"),
        ({"kind": "self_reward_dpo", "prompts": "generated"}, "stages[0]: prompts: generated "
         "needs a prompt_generation stage before this stage; add one or name a prompt dataset"),
        ({"kind": "self_reward_dpo", "pair_strategy": "best_wrst"}, "stages[0]: pair_strategy "
         "must be one of"),
    ]  # fmt: skip
    for stage, message in stages:
        with pytest.raises(ConfigError) as info:
            parse_run_config(_config(stage), check_files=False)
        assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(ConfigError, match=r"did you mean 'best_worst'\?"):
        parse_run_config(_config(stages[-1][0]), check_files=False)
    assert YAML_PLAN.yaml
