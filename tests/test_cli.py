"""The ``srlm`` CLI end to end on a tiny random Llama with a locally trained tokenizer:
``srlm run`` through SFT and one self-rewarding DPO iteration (in-process and as a real
subprocess, with LoRA and bf16 autocast), config validation, ``generate`` / ``judge`` /
``eval``, trackers and ``--help`` on every command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from self_rewarding_lm_pytorch.cli import build_model, build_tokenizer, main
from self_rewarding_lm_pytorch.config import (
    ConfigError,
    load_run_config,
    load_yaml,
    parse_run_config,
)
from self_rewarding_lm_pytorch.hf import build_tiny_model
from self_rewarding_lm_pytorch.metrics import kendall_tau, spearman

REPO = Path(__file__).resolve().parents[1]

# the random model writes random words; a judge template whose regex takes any number
# found in its output makes it a (poor but parsable) self-judge
REWARD_CONFIG = {
    "prompt_template": "score the answer {{ response }} to {{ prompt }} : score",
    "reward_regex_template": "{{ reward }}",
}
JUDGE_MODULE = '''
from self_rewarding_lm_pytorch.judge import JudgeResult


def words(prompt, response):
    """Scripted judge: longer answers are better."""
    return float(len(response.split()))


CALLS = []


def interrupted_on_third_call(prompt, response):
    """Scores 1.0, but the third call is interrupted as by Ctrl-C."""
    CALLS.append(response)
    if len(CALLS) == 3:
        raise KeyboardInterrupt
    return 1.0


class Echo:
    """A judge class: scores a response by the number it is."""

    def score(self, prompts, responses, *, generator=None):
        return [JudgeResult(score=float(r)) for r in responses]
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    (tmp_path / "srlm_test_judges.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sft = [
        {"prompt": "tell me a story", "response": "the cat sat on the mat ."},
        {
            "messages": [
                {"role": "user", "content": "what is a dog ?"},
                {"role": "assistant", "content": "a dog is a fast animal ."},
            ]
        },
        {"prompt": "why is the sky blue ?", "response": "the sun and the sea ."},
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    prompts = ["name a red fish", "write a poem", "tell me about the moon", "what is snow ?"]
    (tmp_path / "prompts.csv").write_text("instruction\n" + "\n".join(prompts) + "\n")
    return tmp_path


def write_config(workdir: Path, tiny: Path, name: str = "run.yaml", **overrides) -> Path:
    cfg = {
        "model": {"path": str(tiny)},
        "data": {
            "sft": {"path": "sft.jsonl"},
            "prompts": {"path": "prompts.csv", "prompt_field": "instruction"},
        },
        "reward_config": REWARD_CONFIG,
        "stages": [
            {"kind": "sft", "trainer": {"batch_size": 3, "num_train_steps": 1}},
            {
                "kind": "self_reward_dpo",
                "num_preference_pairs": 2,
                "num_candidates": 3,
                "max_new_tokens": 6,
                "judge_settings": {"num_samples": 2, "max_new_tokens": 6},
                "trainer": {"batch_size": 2, "start_learning_rate": 1e-3},
            },
        ],
        "accelerate": {"cpu": True},
        "out": "runs/test",
        "progress": False,
    }
    cfg.update(overrides)
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _state(out: Path) -> list[str]:
    return [r["stage"] for r in json.loads((out / "state.json").read_text())["finished"]]


def _check_pairs(out: Path, n: int) -> list[dict]:
    pairs = [json.loads(line) for line in (out / "02-self-reward-dpo" / "pairs.jsonl").open()]
    assert len(pairs) == n
    for p in pairs:
        assert p["score_chosen"] > p["score_rejected"]
    return pairs


def _generates(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "tell me a story"}], tokenize=False, add_generation_prompt=True
    )
    x = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    y = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert y.shape[1] > x.shape[1]
    return model


# ====================================================================== srlm run


def test_run_in_process_sft_then_self_reward_dpo_then_resume(workdir, tiny):
    from transformers import AutoModelForCausalLM

    cfg = write_config(workdir, tiny, accelerate={"cpu": True, "log_with": "jsonl"})
    assert main(["-q", "run", str(cfg)]) == 0
    out = workdir / "runs" / "test"
    assert _state(out) == ["01-sft", "02-self-reward-dpo"]
    pairs = _check_pairs(out, 2)
    cands = [json.loads(x) for x in (out / "02-self-reward-dpo" / "candidates.jsonl").open()]
    assert all(len(c["responses"]) == 3 for c in cands)
    # the model judged itself: every score is the mean of the numbers parsed from its outputs
    for c in cands:
        for j in c["judgements"]:
            parsed = [s for s in j["sample_scores"] if s is not None]
            assert j["score"] == (pytest.approx(sum(parsed) / len(parsed)) if parsed else None)
    # the final checkpoint is a Hugging Face folder that loads and generates, and it trained
    final = out / "02-self-reward-dpo" / "checkpoint"
    trained = _generates(final)
    start = AutoModelForCausalLM.from_pretrained(tiny)
    diff = [n for n, p in trained.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert diff
    # trackers: the built-in jsonl tracker got the trainers' metrics and the config
    log_dir = out / "logs" / "self-rewarding-lm"
    metrics = [json.loads(x) for x in (log_dir / "metrics.jsonl").open()]
    assert any("pref_loss" in m for m in metrics) and any("loss" in m for m in metrics)
    assert json.loads((log_dir / "config.json").read_text())["model.path"] == str(tiny)
    # the resolved config (absolute paths) is itself a valid config
    resolved = load_run_config(out / "run_config.yaml")
    assert resolved.model.path == str(tiny) and resolved.out == str(out)
    assert [s.kind for s in resolved.stage_objects] == ["sft", "self_reward_dpo"]
    # the same command again resumes: nothing re-run, records unchanged
    before = (out / "02-self-reward-dpo" / "pairs.jsonl").read_bytes()
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    assert main(["-q", "run", str(cfg)]) == 0
    assert (out / "02-self-reward-dpo" / "pairs.jsonl").read_bytes() == before
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime
    assert _check_pairs(out, 2) == pairs


def test_run_overrides_reach_the_config_and_the_run_folder(workdir, tiny):
    judges = {"big": {"kind": "llm", "path": str(tiny), "num_samples": 3}}
    data = {
        "sft": {"path": "sft.jsonl", "limit": 2},
        "prompts": {"path": "prompts.csv", "prompt_field": "instruction"},
    }
    path = write_config(workdir, tiny, judges=judges, data=data)
    original = path.read_text()
    overrides = [
        "seed=3",
        "stages.1.trainer.beta=0.2",
        "stages.1.num_candidates=4",
        "judges.big.num_samples=5",
        "judges.big.top_p=0.5",
        "data.sft.limit=null",
        "accelerate.log_with=[jsonl]",
    ]
    cfg = load_run_config(path, overrides=overrides)
    assert cfg.seed == 3
    assert cfg.stage_objects[1].trainer["beta"] == 0.2
    assert cfg.stage_objects[1].num_candidates == 4
    assert cfg.judges["big"].num_samples == 5 and cfg.judges["big"].top_p == 0.5
    assert cfg.judges["big"].judge_config().num_samples == 5
    assert cfg.data["sft"].limit is None
    assert cfg.accelerate.log_with == ["jsonl"]
    assert path.read_text() == original  # the file itself is not changed
    plain = load_run_config(path)
    assert plain.seed == 0 and plain.judges["big"].num_samples == 3
    # srlm run: overrides before or after the flags; the resolved config shows what ran
    out = workdir / "over"
    only_sft = "stages=[{kind: sft, trainer: {batch_size: 3, num_train_steps: 1}}]"
    args = ["-q", "run", str(path), "seed=3", only_sft, "--out", str(out)]
    assert main([*args, "stages.0.trainer.num_train_steps=2"]) == 0
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["seed"] == 3
    sft = {"kind": "sft", "trainer": {"batch_size": 3, "num_train_steps": 2}}
    assert resolved["stages"] == [sft]
    assert _state(out) == ["01-sft"]


def test_run_as_subprocess_with_lora_and_bf16(workdir, tiny):
    from transformers import AutoModelForCausalLM

    cfg = write_config(
        workdir,
        tiny,
        model={
            "path": str(tiny),
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
        accelerate={"cpu": True, "mixed_precision": "bf16"},
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(workdir)])}
    proc = subprocess.run(
        [sys.executable, "-m", "self_rewarding_lm_pytorch.cli", "-q", "run", str(cfg)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    out = workdir / "runs" / "test"
    assert summary["final_model"] == str(out / "final")
    assert _state(out) == ["01-sft", "02-self-reward-dpo"]
    _check_pairs(out, 2)
    merged = _generates(out / "final")  # LoRA merged into a plain Llama
    base = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    for name, p in merged.state_dict().items():
        if "q_proj" in name or "v_proj" in name:
            assert not torch.equal(p, base[name]), name  # the adapters trained and merged
        else:
            assert torch.equal(p, base[name]), name  # everything else is the base model


def test_external_judge_stage_with_python_function(workdir, tiny):
    cfg = write_config(
        workdir,
        tiny,
        judges={"words": {"kind": "python", "function": "srlm_test_judges:words"}},
        stages=[
            {
                "kind": "external_reward_dpo",
                "judge": "words",
                "num_preference_pairs": 2,
                "num_candidates": 2,
                "max_new_tokens": 6,
                "trainer": {"batch_size": 2},
            }
        ],
    )
    assert main(["-q", "run", str(cfg)]) == 0
    pairs = [
        json.loads(x) for x in (workdir / "runs/test/01-external-reward-dpo/pairs.jsonl").open()
    ]
    assert len(pairs) == 2
    for p in pairs:  # the scripted judge's scores, and its preference
        assert p["score_chosen"] == len(p["chosen"].split())
        assert len(p["chosen"].split()) > len(p["rejected"].split())


def test_python_judge_specs_take_functions_objects_and_classes(workdir):
    from self_rewarding_lm_pytorch.cli import build_judge
    from self_rewarding_lm_pytorch.config import JudgeSpec

    fn = build_judge(JudgeSpec(kind="python", function="srlm_test_judges:words"))
    assert [r.score for r in fn.score(["p", "p"], ["a b c", ""])] == [3.0, 0.0]
    cls = build_judge(JudgeSpec(kind="python", function="srlm_test_judges:Echo"))
    assert [r.score for r in cls.score(["p"], ["2.5"])] == [2.5]


# ====================================================================== validation


def test_config_errors_name_the_key_the_type_and_the_fix(workdir, tiny, capsys):
    def err(**overrides) -> str:
        path = write_config(workdir, tiny, name="bad.yaml", **overrides)
        with pytest.raises(ConfigError) as e:
            load_run_config(path)
        return str(e.value)

    good = yaml.safe_load(write_config(workdir, tiny, name="good.yaml").read_text())
    # an unknown key names the key and the closest valid key, through main() too
    raw = dict(good)
    raw["modle"] = raw.pop("model")
    bad = workdir / "typo.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["run", str(bad)]) == 2
    msg = capsys.readouterr().err
    assert "unknown key 'modle'" in msg and "did you mean 'model'" in msg
    assert not (workdir / "runs").exists()  # rejected before any work
    stages = good["stages"]
    typo = [stages[0], {**stages[1], "trainer": {"batch_sise": 2}}]
    m = err(stages=typo)
    assert "batch_sise" in m and "did you mean 'batch_size'" in m and "stages[1]" in m
    m = err(stages=[{**stages[0], "kind": "self_reward_dp0"}])
    assert "did you mean 'self_reward_dpo'" in m
    m = err(stages=[stages[0], {**stages[1], "num_candidate": 3}])
    assert "unknown key 'stages[1].num_candidate'" in m and "'num_candidates'" in m
    # wrong types name the expected type
    assert "expected an integer" in err(seed="zero") and "seed" in err(seed="zero")
    m = err(stages=[stages[0], {**stages[1], "num_preference_pairs": "many"}])
    assert "stages[1].num_preference_pairs: expected an integer" in m
    m = err(data={"sft": {"path": "sft.jsonl", "limit": 1.5}})
    assert "data.sft.limit: expected int | null, got float 1.5" in m
    # names a stage uses must exist
    m = err(stages=[stages[0], {**stages[1], "prompts": "promts"}])
    assert "'promts' is not defined" in m and "did you mean 'prompts'" in m
    m = err(stages=[{"kind": "external_reward_dpo", "judge": "gpt"}])
    assert "judge 'gpt' is not defined under judges" in m
    # files, templates, trackers and precision are checked up front as well
    assert "does not exist" in err(model={"path": "no/such/model"})
    m = err(reward_config={"prompt_template": "{{ prompt }}", "reward_regex_template": "x"})
    assert "reward_config" in m and "{{ response }}" in m
    m = err(accelerate={"cpu": True, "log_with": "tensorbaord"})
    assert "did you mean 'tensorboard'" in m
    assert "needs a CUDA GPU" in err(accelerate={"cpu": True, "mixed_precision": "fp16"})
    m = err(judges={"j": {"kind": "python", "function": "srlm_test_judges:nope"}})
    assert "judges.j.function" in m and "no attribute 'nope'" in m
    m = err(judges={"j": {"kind": "python", "function": "a:b", "num_samples": 2}})
    assert "'num_samples' does not apply to a judge of kind 'python'" in m
    # --check validates and does no work
    assert main(["run", str(workdir / "good.yaml"), "--check"]) == 0
    assert "OK (2 stages: sft, self_reward_dpo" in capsys.readouterr().out
    assert not (workdir / "runs").exists()


def test_missing_tracker_package_is_a_config_error(workdir, tiny):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - available)
    if not missing:
        pytest.skip("every accelerate tracker package is installed")
    path = write_config(workdir, tiny, accelerate={"cpu": True, "log_with": [missing[0]]})
    with pytest.raises(ConfigError, match=f"pip install {missing[0]}"):
        load_run_config(path)


def test_tensorboard_tracker_writes_events(workdir, tiny):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    cfg = write_config(
        workdir,
        tiny,
        stages=[{"kind": "sft", "trainer": {"batch_size": 3, "num_train_steps": 1}}],
        accelerate={"cpu": True, "log_with": ["tensorboard"]},
    )
    assert main(["-q", "run", str(cfg)]) == 0
    assert list((workdir / "runs/test/logs").rglob("events.out.tfevents*"))


def test_xtransformers_model_with_bytes_tokenizer_from_config(workdir):
    cfg = parse_run_config(
        {
            "model": {
                "xtransformers": {
                    "num_tokens": 256,
                    "max_seq_len": 64,
                    "attn_layers": {"dim": 16, "depth": 1, "heads": 2},
                }
            },
            "tokenizer": {"kind": "bytes", "eos_id": 0},
            "data": {"sft": {"path": str(workdir / "sft.jsonl")}},
            "stages": [{"kind": "sft"}],
        }
    )
    tok = build_tokenizer(cfg)
    assert tok.encode("hé") == list("hé".encode()) and tok.decode(tok.encode("hé")) == "hé"
    model = build_model(cfg, tok)
    assert type(model).__name__ == "TransformerWrapper"
    # random initialisation follows the config's seed, not the global RNG
    torch.manual_seed(123)
    again = build_model(cfg, tok)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    cfg.seed = 1
    other = build_model(cfg, tok)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert model(torch.tensor([tok.encode("cat")])).shape == (1, 3, 256)
    with pytest.raises(ConfigError, match="num_tokens >= 256"):
        parse_run_config(
            {
                "model": {
                    "xtransformers": {
                        "num_tokens": 100,
                        "max_seq_len": 8,
                        "attn_layers": {"dim": 8, "depth": 1, "heads": 1},
                    }
                },
                "tokenizer": {"kind": "bytes"},
                "data": {"sft": {"path": str(workdir / "sft.jsonl")}},
                "stages": [{"kind": "sft"}],
            }
        )


# ====================================================================== other commands


@pytest.mark.parametrize("command", [[], ["run"], ["generate"], ["judge"], ["eval"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: srlm {command[0]}" if command else "usage: srlm")


def _flag_groups(command: str) -> dict[str, dict[str, argparse.Action]]:
    from self_rewarding_lm_pytorch.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return {
        g.title: {a.dest: a for a in g._group_actions} for g in parser._action_groups if g.title
    }


@pytest.mark.parametrize("command", ["judge", "eval", "generate"])
def test_sampling_flags_are_the_fields_of_their_dataclass(command):
    """Each generated flag is a field of the dataclass (same name, type, choices) and each
    field is a flag, except the fields a command names as excluded."""
    from self_rewarding_lm_pytorch.cli import dataclass_from_args, parser
    from self_rewarding_lm_pytorch.generation import GenerationConfig
    from self_rewarding_lm_pytorch.judge import JudgeConfig

    if command == "generate":
        cls, title = GenerationConfig, "sampling (generation.GenerationConfig)"
        excluded = set(parser.GENERATE_EXCLUDED)
    else:
        cls, title, excluded = JudgeConfig, "LLM judge sampling (judge.JudgeConfig)", set()
    actions = _flag_groups(command)[title]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(actions) == set(fields) - excluded and excluded <= set(fields)
    for name, action in actions.items():
        assert "--" + name.replace("_", "-") in action.option_strings
        if fields[name].type.startswith("Literal"):
            assert action.choices and all(repr(c) in fields[name].type for c in action.choices)
    # the aliases kept from earlier versions parse into the same fields
    args = ["--input", "x", "--out", "y"] if command != "generate" else []
    if command == "generate":
        args = ["--model", "m", "--prompts", "p", "--out", "o", "--num-candidates", "2"]
        ns = _parse([command, *args, "--top-k", "5"])
        config = dataclass_from_args(cls, ns, exclude=excluded)
        assert config.num_return_sequences == 2 and config.top_k == 5
        assert config.temperature == 0.7 and config.max_new_tokens == 256  # the paper's
    else:
        ns = _parse([command, *args, "--samples", "5", "--token-budget", "64", "--mode=expected"])
        config = dataclass_from_args(cls, ns)
        assert config == JudgeConfig(num_samples=5, token_budget=64, mode="expected")
        assert dataclass_from_args(cls, _parse([command, *args])) == JudgeConfig()


@dataclasses.dataclass
class Settings:
    steps: int = dataclasses.field(default=3, metadata={"help": "how many steps"})
    rate: float = 0.5
    kind: Literal["a", "b"] = "a"
    fast: bool = False
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    limit: int | None = None
    skipped: str = "x"


def test_add_dataclass_args_types_defaults_and_round_trip():
    """Flags from a dataclass: types, Literal choices, --x/--no-x, lists, None, a prefix."""
    from self_rewarding_lm_pytorch.cli import add_dataclass_args, dataclass_from_args

    parser = argparse.ArgumentParser()
    dests = add_dataclass_args(parser, Settings, prefix="s-", exclude=("skipped",))
    assert dests == ["s_steps", "s_rate", "s_kind", "s_fast", "s_sizes", "s_limit"]
    assert "how many steps" in parser.format_help()
    assert dataclass_from_args(Settings, parser.parse_args([]), prefix="s-") == Settings()
    argv = ["--s-steps", "7", "--s-rate", "0.25", "--s-kind", "b", "--s-fast"]
    argv += ["--s-sizes", "4", "5", "6", "--s-limit", "9"]
    got = dataclass_from_args(Settings, parser.parse_args(argv), prefix="s-")
    assert got == Settings(steps=7, rate=0.25, kind="b", fast=True, sizes=[4, 5, 6], limit=9)
    ns = parser.parse_args(["--s-limit", "none", "--no-s-fast"])
    assert (ns.s_limit, ns.s_fast) == (None, False)
    for bad in (["--s-kind", "c"], ["--s-steps", "many"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_run_config_sections_document_every_field():
    from self_rewarding_lm_pytorch import config

    sections = [config.LoRAConfig, config.ModelConfig, config.TokenizerConfig, config.DataSource]
    sections += [config.RewardConfigSpec, config.JudgeSpec, config.AccelerateConfig]
    for cls in [*sections, config.RunConfig]:
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            assert text and "\n" not in text, f"{cls.__name__}.{f.name} has no one-line help"


def _parse(argv: list[str]) -> argparse.Namespace:
    from self_rewarding_lm_pytorch.cli import build_parser

    return build_parser().parse_args(argv)


def test_demo_hands_its_arguments_to_the_demo_runner(monkeypatch):
    seen = []
    fake = types.ModuleType("self_rewarding_lm_pytorch.demo.run")
    fake.main = lambda argv: seen.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "self_rewarding_lm_pytorch.demo.run", fake)
    assert main(["demo", "--quick", "--seed", "3", "--out", "x"]) == 7
    assert main(["--debug", "demo", "--help"]) == 7
    assert seen == [["--quick", "--seed", "3", "--out", "x"], ["--help"]]


def test_generate_judge_eval_commands(workdir, tiny, capsys):
    out = workdir / "cands.jsonl"
    args = [
        "-q", "generate", "--model", str(tiny), "--prompts", str(workdir / "prompts.csv"),
        "--prompt-field", "instruction", "--out", str(out), "--num-candidates", "2",
        "--max-new-tokens", "5", "--chunk-size", "3", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in out.open()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert all(len(r["responses"]) == 2 for r in rows)
    assert rows[2]["prompt"] == "tell me about the moon"
    capsys.readouterr()
    assert main(args) == 0  # resumes: everything is there already
    assert json.loads(capsys.readouterr().out)["generated"] == 0
    assert [json.loads(x) for x in out.open()] == rows

    # judge the candidates with a Python function: scores are the function's
    judged = workdir / "judged.jsonl"
    assert main(["-q", "judge", "--input", str(out), "--out", str(judged),
                 "--function", "srlm_test_judges:words"]) == 0  # fmt: skip
    for r in (json.loads(x) for x in judged.open()):
        assert r["scores"] == [float(len(x.split())) for x in r["responses"]]

    # an LLM judge: the tiny model itself, scores parsed from what it writes
    llm = workdir / "llm.jsonl"
    tpl = workdir / "judge.jinja"
    tpl.write_text(REWARD_CONFIG["prompt_template"])
    assert main(["-q", "judge", "--input", str(out), "--out", str(llm), "--model", str(tiny),
                 "--prompt-template-file", str(tpl), "--regex-template", "{{ reward }}",
                 "--samples", "2", "--max-new-tokens", "6", "--limit", "2",
                 "--device", "cpu"]) == 0  # fmt: skip
    llm_rows = [json.loads(x) for x in llm.open()]
    assert len(llm_rows) == 2
    for r in llm_rows:
        for j in r["judgements"]:
            assert len(j["samples"]) == 2
            for text, s in zip(j["samples"], j["sample_scores"]):
                assert (s is None) == (not any(ch.isdigit() for ch in text))

    # eval: labelled scores vs predictions already in the file
    labelled = workdir / "labelled.jsonl"
    gold = [1, 2, 3, 4, 5, 2]
    items = [
        {"prompt": f"p{i // 3}", "response": "the cat " * (g + 1), "gold_score": g, "pred": g}
        for i, g in enumerate(gold)
    ]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in items))
    capsys.readouterr()
    assert main(["eval", "--input", str(labelled), "--pred-field", "pred"]) == 0
    perfect = json.loads(capsys.readouterr().out)
    assert perfect["pairwise_accuracy"] == perfect["exact_match"] == perfect["spearman"] == 1.0
    assert perfect["parse_rate"] == 1.0 and perfect["n"] == 6
    # the scripted judge's word counts rank like the gold scores but never match exactly
    metrics_file = workdir / "metrics.json"
    assert main(["eval", "--input", str(labelled), "--function", "srlm_test_judges:words",
                 "--out", str(metrics_file)]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert json.loads(metrics_file.read_text()) == got
    words = [2 * (g + 1) for g in gold]
    assert got["exact_match"] == 0.0 and got["pairwise_accuracy"] == 1.0
    assert got["spearman"] == pytest.approx(spearman(words, gold))
    assert got["kendall_tau"] == pytest.approx(kendall_tau(words, gold))
    # reversed predictions: every within-prompt pair wrong
    rev = workdir / "rev.jsonl"
    rev.write_text("".join(json.dumps({**r, "pred": -r["pred"]}) + "\n" for r in items))
    assert main(["eval", "--input", str(rev), "--pred-field", "pred"]) == 0
    worst = json.loads(capsys.readouterr().out)
    assert worst["pairwise_accuracy"] == 0.0 and worst["spearman"] == -1.0
    # a missing gold column is named
    assert main(["eval", "--input", str(rev), "--pred-field", "pred", "--gold-field", "g"]) == 1
    assert "no gold score field 'g'" in capsys.readouterr().err


def test_generate_resumes_by_content_as_an_uninterrupted_run(workdir, tiny, capsys):
    prompts = workdir / "prompts.csv"  # four prompts
    base = ["-q", "generate", "--model", str(tiny), "--prompts", str(prompts), "--prompt-field",
            "instruction", "--num-candidates", "2", "--max-new-tokens", "4", "--chunk-size", "3",
            "--device", "cpu"]  # fmt: skip
    fresh = workdir / "fresh.jsonl"
    assert main([*base, "--out", str(fresh)]) == 0
    # a first run on two prompts, then all four: the two rows are reused, the others are
    # sampled in the same chunks as in the uninterrupted run (so they are its rows)
    out = workdir / "out.jsonl"
    assert main([*base, "--out", str(out), "--limit", "2"]) == 0
    first = [json.loads(x) for x in out.open()]
    capsys.readouterr()
    assert main([*base, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "out": str(out), "prompts": 4, "generated": 2, "reused": 2
    }  # fmt: skip
    rows = [json.loads(x) for x in out.open()]
    assert rows[:2] == first
    assert rows[2:] == [json.loads(x) for x in fresh.open()][2:]
    # a crash mid-line: the torn line is dropped and its row made again, as before
    data = fresh.read_bytes()
    torn = workdir / "torn.jsonl"
    torn.write_bytes(data[: data.index(b"\n") + 1 + 25])
    assert main([*base, "--out", str(torn)]) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 3
    assert torn.read_bytes() == data
    # the prompts reordered: every row is reused, written in the new order
    lines = prompts.read_text().splitlines()
    prompts.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert main([*base, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 0
    before = {r["prompt"]: r["responses"] for r in rows}
    rows = [json.loads(x) for x in out.open()]
    assert [r["prompt"] for r in rows] == list(reversed(lines[1:]))
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["responses"] == before[r["prompt"]] for r in rows)


def test_judge_resumes_by_content_and_keeps_duplicate_rows(workdir, capsys):
    rows = [{"prompt": "p", "response": "a b"}, {"prompt": "p", "response": "a b"}]
    rows += [{"prompt": f"q{i}", "responses": ["x " * i, "y"]} for i in range(4)]
    data = workdir / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["-q", "judge", "--input", str(data), "--function", "srlm_test_judges:words",
            "--chunk-size", "4"]  # fmt: skip
    fresh = workdir / "fresh.jsonl"
    assert main([*base, "--out", str(fresh)]) == 0
    got = [json.loads(x) for x in fresh.open()]
    assert len(got) == 6 and got[0]["score"] == got[1]["score"] == 2.0  # duplicates both kept
    assert len({r["judge_key"] for r in got}) == 6
    out = workdir / "out.jsonl"
    assert main([*base, "--out", str(out), "--limit", "3"]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["judged"], summary["reused"]) == (3, 3)
    assert out.read_bytes() == fresh.read_bytes()
    # nothing left to do: the judge is not even built (an unimportable one would fail)
    assert main([*base, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["judged"] == 0
    # srlm eval --scored-out resumes the same way
    labelled = workdir / "labelled.jsonl"
    items = [{"prompt": "p", "response": "a " * g, "gold_score": g} for g in (1, 2, 3)]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in items))
    scored = workdir / "scored.jsonl"
    ev = ["eval", "--input", str(labelled), "--scored-out", str(scored)]
    assert main([*ev, "--function", "srlm_test_judges:words"]) == 0
    made = scored.read_bytes()
    assert main([*ev, "--function", "srlm_test_judges:words"]) == 0
    assert scored.read_bytes() == made
    capsys.readouterr()
    assert main([*ev, "--function", "srlm_test_judges:Echo"]) == 2
    err = capsys.readouterr().err
    assert "--scored-out" in err and 'function: "srlm_test_judges:words" -> ' in err


def test_ctrl_c_in_judge_keeps_the_rows_and_names_the_rerun(workdir, capsys):
    data = workdir / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(4))
    )
    out = workdir / "out.jsonl"
    args = ["-q", "judge", "--input", str(data), "--out", str(out), "--chunk-size", "1",
            "--function", "srlm_test_judges:interrupted_on_third_call"]  # fmt: skip
    assert main([*args, "--overwrite"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "srlm judge: interrupted; rerun the same command without --overwrite to resume"
    assert [json.loads(x)["id"] for x in out.open()] == ["0", "1"]  # saved as they were made
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["judged"], summary["reused"]) == (2, 2)


@pytest.mark.parametrize(
    "path",
    sorted(
        p.name for p in (REPO / "examples").glob("*.yaml") if not p.name.startswith("accelerate_")
    ),
)
def test_example_run_configs_are_valid(path):
    cfg = load_run_config(REPO / "examples" / path, check_files=False)  # schema and names
    assert cfg.stage_objects and Path(cfg.out).is_absolute()


def test_accelerate_example_configs_name_their_backend():
    found = {}
    for p in (REPO / "examples").glob("accelerate_*.yaml"):
        found[load_yaml(p)["distributed_type"]] = p.name  # no key given twice
    assert {"DEEPSPEED", "FSDP"} <= set(found)
