"""Choosing the sampling backend (Python, YAML, CLI), its checks before any work, the
fingerprint of a stage's backend, and one backend per run following the policy's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import (
    PROMPTS,
    SFT_DATA,
    DelegatingBackend,
    char_tokenizer,
    quick_preference,
    scripted_score,
    tiny_model,
)

from self_rewarding_lm_pytorch import PreferenceStage, SelfRewardingTrainer, SFTStage, SPINStage
from self_rewarding_lm_pytorch.config import ConfigError, apply_overrides, parse_run_config
from self_rewarding_lm_pytorch.generation import BackendConfig, VLLMConfig
from self_rewarding_lm_pytorch.generation.selection import merge_generation
from self_rewarding_lm_pytorch.store import RunDirError, read_jsonl

SERVER = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
DATA = {
    "sft": {"rows": [{"prompt": "p", "response": "r"}]},
    "prompts": {"rows": [{"prompt": "p"}]},
}


def _dpo(**kw) -> PreferenceStage:
    return quick_preference(num_preference_pairs=2, **kw)


def _trainer(run_dir: Path, stages, model=None, **kw) -> SelfRewardingTrainer:
    return SelfRewardingTrainer(
        model if model is not None else tiny_model(),
        tokenizer=char_tokenizer(),
        datasets={"sft": SFT_DATA[:4], "prompts": PROMPTS[:8]},
        judges={"scripted": scripted_score},
        stages=stages,
        checkpoints_folder=run_dir,
        accelerate_kwargs=dict(cpu=True),
        progress=False,
        **kw,
    )


# ---------------------------------------------------------------- the config and its refusals


def test_unknown_backend_names_the_closest():
    with pytest.raises(ConfigError, match=r"'vlm' is not a backend; did you mean 'vllm'\?"):
        BackendConfig(backend="vlm")  # type: ignore[arg-type]
    yaml_like = {
        "model": {"path": "x"},
        "stages": [{"kind": "sft"}],
        "generation": {"backend": "vlm"},
    }
    with pytest.raises(ConfigError, match=r"generation\.backend.*did you mean 'vllm'"):
        parse_run_config(yaml_like, check_files=False)


def test_openai_needs_its_section_and_other_sections_need_their_backend():
    with pytest.raises(ConfigError, match=r"'openai' needs the server's settings.*base_url"):
        BackendConfig(backend="openai")
    with pytest.raises(
        ConfigError, match=r"generation\.vllm is set but generation\.backend is 'torch'"
    ):
        BackendConfig(vllm={"dtype": "float32"})  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"generation\.openai is set but generation\.backend is 'vllm'"
    ):
        BackendConfig(backend="vllm", openai=SERVER)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"engine_kwargs\.dtype is its own key; set vllm\.dtype"):
        VLLMConfig(engine_kwargs={"dtype": "half"})
    ok = BackendConfig(backend="openai", openai=SERVER)  # type: ignore[arg-type]
    assert ok.openai.base_url == SERVER["base_url"]


def test_vllm_refuses_an_x_transformers_policy_before_any_work(tmp_path):
    with pytest.raises(ConfigError) as err:
        _trainer(tmp_path / "run", [SFTStage(), _dpo()], backend="vllm")
    text = str(err.value)
    assert "x-transformers TransformerWrapper" in text and "backend: torch" in text
    assert "stage 2-external_reward_dpo" in text or "stage " in text
    assert not (tmp_path / "run").exists()  # refused at construction: nothing written
    # a stage that only trains never samples: its backend is not checked
    _trainer(tmp_path / "run2", [SFTStage()], backend="vllm")


def test_vllm_under_several_processes_is_refused_before_any_work(tmp_path, monkeypatch):
    """vLLM's data-parallel engines step together, and the ranks' sampling rounds differ
    (a rank without a chunk, judge calls of other sizes): refused, never a wait."""
    pytest.importorskip("transformers")
    from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model

    model = load_model(build_tiny_model(tmp_path / "m", hidden_size=32, num_heads=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"several processes \(WORLD_SIZE=2\).*backend: torch"):
        _trainer(tmp_path / "run", [_dpo()], model=model, backend="vllm")
    assert not (tmp_path / "run").exists()


def test_vllm_not_installed_names_the_install_command(tmp_path):
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401

        pytest.fail("this test runs in the main environment, which has no vLLM")
    except ImportError:
        pass
    from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model

    model = load_model(build_tiny_model(tmp_path / "m", hidden_size=32, num_heads=2))
    with pytest.raises(ConfigError, match=r"vllm is not installed.*pip install vllm"):
        _trainer(tmp_path / "run", [_dpo()], model=model, backend="vllm")


def test_stage_override_merges_over_the_run_section():
    base = BackendConfig(backend="vllm", vllm={"dtype": "float32"})  # type: ignore[arg-type]
    merged = merge_generation(base, {"vllm": {"max_model_len": 64}})
    assert (merged.backend, merged.vllm.dtype, merged.vllm.max_model_len) == ("vllm", "float32", 64)
    assert merge_generation(base, {"backend": "torch"}) == BackendConfig()  # vllm keys dropped
    remote = merge_generation(base, {"backend": "openai", "openai": SERVER})
    assert remote.backend == "openai" and remote.vllm == VLLMConfig()
    with pytest.raises(ConfigError, match=r"unknown key 'generation\.backnd'"):
        _dpo(generation={"backnd": "vllm"}).validate()
    with pytest.raises(ConfigError, match=r"did you mean 'vllm'"):
        _dpo(generation={"backend": "vlm"}).validate()


def test_overrides_reach_the_generation_sections_and_are_checked():
    data = {
        "model": {"path": "m"},
        "data": DATA,
        "stages": [{"kind": "sft"}, {"kind": "self_reward_dpo"}],
    }
    out = apply_overrides(
        data,
        [
            "generation.backend=vllm",
            "generation.vllm.max_model_len=64",
            "stages.1.generation.backend=torch",
        ],
    )
    cfg = parse_run_config(out, check_files=False)
    assert cfg.generation.backend == "vllm" and cfg.generation.vllm.max_model_len == 64
    assert cfg.stage_objects[1].generation == {"backend": "torch"}
    with pytest.raises(ConfigError, match=r"no key 'backnd'.*did you mean 'backend'"):
        apply_overrides(data, ["stages.1.generation.backnd=vllm"])
    with pytest.raises(ConfigError, match=r"no key 'dtyp'.*did you mean 'dtype'"):
        apply_overrides(data, ["generation.vllm.dtyp=float32"])


def test_cli_flags_parse_into_a_backend_config():
    from self_rewarding_lm_pytorch.cli.generate import backend_from_args
    from self_rewarding_lm_pytorch.cli.judge import _judge_spec_from_args
    from self_rewarding_lm_pytorch.cli.parser import build_parser

    parser = build_parser()
    common = ["--prompts", "p.jsonl", "--out", "o.jsonl"]
    args = parser.parse_args(
        [
            "generate",
            "--model",
            "m",
            *common,
            "--backend",
            "vllm",
            "--vllm.max-model-len",
            "64",
            "--vllm.dtype",
            "bfloat16",
            "--vllm.engine-kwargs",
            "{max_num_seqs: 8}",
        ]
    )
    assert backend_from_args(args) == BackendConfig(
        backend="vllm",
        vllm=VLLMConfig(dtype="bfloat16", max_model_len=64, engine_kwargs={"max_num_seqs": 8}),
    )
    args = parser.parse_args(["generate", "--model", "m", *common])
    assert backend_from_args(args) == BackendConfig()
    args = parser.parse_args(["generate", "--model", "m", *common, "--vllm.dtype", "float32"])
    with pytest.raises(ConfigError, match=r"--backend.*generation\.vllm is set"):
        backend_from_args(args)
    args = parser.parse_args(
        [
            "judge",
            "--input",
            "i.jsonl",
            "--out",
            "o.jsonl",
            "--backend",
            "openai",
            "--openai.base-url",
            "http://h:1/v1",
            "--openai.api",
            "chat",
            "--openai.max-concurrency",
            "2",
        ]
    )
    spec = _judge_spec_from_args(args)  # no --model: the server's model judges
    assert spec.kind == "llm" and spec.path is None
    assert spec.generation.openai.base_url == "http://h:1/v1"
    assert (spec.generation.openai.api, spec.generation.openai.max_concurrency) == ("chat", 2)
    args = parser.parse_args(
        ["eval", "--input", "i.jsonl", "--function", "m:f", "--backend", "vllm"]
    )
    with pytest.raises(ConfigError, match=r"--backend vllm serves an LLM judge"):
        _judge_spec_from_args(args)


def test_a_yaml_judge_on_a_server_needs_a_tokenizer_for_completions(tmp_path):
    base = {"model": {"path": "m"}, "data": DATA, "stages": [{"kind": "sft"}]}
    judge = {"kind": "llm", "generation": {"backend": "openai", "openai": SERVER}}
    with pytest.raises(ConfigError, match=r"api 'completions' sends token ids: give tokenizer"):
        parse_run_config({**base, "judges": {"big": judge}}, check_files=False)
    chat = {**judge, "generation": {"backend": "openai", "openai": {**SERVER, "api": "chat"}}}
    cfg = parse_run_config({**base, "judges": {"big": chat}}, check_files=False)
    assert cfg.judges["big"].path is None
    with pytest.raises(
        ConfigError, match=r"'generation' does not apply to a judge of kind 'python'"
    ):
        parse_run_config(
            {**base, "judges": {"f": {"kind": "python", "function": "m:f", "generation": {}}}},
            check_files=False,
        )


# ---------------------------------------------------------------- fingerprints on resume


def _remote(**openai) -> BackendConfig:
    return BackendConfig(backend="openai", openai={**SERVER, **openai})  # type: ignore[arg-type]


def test_a_changed_backend_is_refused_on_resume_but_not_a_changed_concurrency(tmp_path):
    run = tmp_path / "run"
    first = _trainer(run, [_dpo()], backend=_remote(max_concurrency=8))
    first.open_run_dir()  # records the stage's fingerprint; no server is contacted
    first.close_run_dir()
    stage_dir = run / "01-external-reward-dpo"
    stage_dir.mkdir()
    (stage_dir / "candidates.jsonl").write_text('{"id": "1-0"}\n')  # interrupted with records

    same = _trainer(run, [_dpo()], backend=_remote(max_concurrency=2, timeout_s=5.0))
    same.open_run_dir()  # concurrency and timeouts do not change samples
    same.close_run_dir()
    moved = _trainer(run, [_dpo()], backend=_remote(base_url="http://127.0.0.1:7/v1"))
    moved.open_run_dir()  # the same served model at another address: where, not what
    moved.close_run_dir()
    with pytest.raises(RunDirError, match=r"generation\.backend: \"openai\" -> <unset>"):
        _trainer(run, [_dpo()]).open_run_dir()
    # a stage's own generation: override is its backend too
    with pytest.raises(RunDirError, match=r"generation\.model: \"m\" -> \"other\""):
        stage = _dpo(generation={"openai": {"model": "other"}})
        _trainer(run, [stage], backend=_remote()).open_run_dir()


# ---------------------------------------------------------------- one backend, following weights


class RecordingBackend(DelegatingBackend):
    """A ready backend (not built by the run) that records which weights it was given."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.loaded: list[Path] = []
        self.closed = 0

    def load_weights(self, checkpoint) -> None:
        self.loaded.append(Path(checkpoint))
        super().load_weights(checkpoint)

    def close(self) -> None:
        self.closed += 1


def test_a_given_backend_loads_each_new_checkpoint_before_it_samples(tmp_path):
    model = tiny_model()
    backend = RecordingBackend(model)
    spin = SPINStage(cycles=2, trainer=dict(batch_size=2, num_train_steps=4, max_seq_len=24))
    trainer = _trainer(
        tmp_path, [SFTStage(trainer=dict(batch_size=2)), _dpo(), spin], model=model, backend=backend
    )
    trainer.run()
    assert backend.calls.count("generate") >= 2  # the DPO candidates and SPIN's opponents
    rel = [p.relative_to(tmp_path).as_posix() for p in backend.loaded]
    assert rel == [
        "01-sft/checkpoint",
        "02-external-reward-dpo/checkpoint",
        "03-spin/spin-checkpoints/cycle-1",  # SPIN's second cycle samples the new policy
    ]  # nothing samples after the last stage: its checkpoint is not loaded
    assert backend.closed == 0  # the caller owns it


def test_on_resume_the_engine_starts_from_the_last_finished_checkpoint(tmp_path):
    class Failing:
        def score(self, prompts, responses, generator=None):
            raise RuntimeError("judge down")

    stages = [SFTStage(trainer=dict(batch_size=2)), _dpo()]
    first = _trainer(tmp_path, stages)
    first.judges["scripted"] = Failing()
    with pytest.raises(RuntimeError, match="judge down"):
        first.run()  # the SFT stage finished, the DPO stage did not

    seen: list[Path] = []

    class Probe(RecordingBackend):
        def generate(self, prompts, config, **kw):
            seen.append(resumed.samplers.current_weights())  # where a vLLM engine would start now
            return super().generate(prompts, config, **kw)

    model = tiny_model()
    resumed = _trainer(tmp_path, stages, model=model, backend=Probe(model))
    resumed.run()
    assert seen and set(seen) == {tmp_path / "01-sft" / "checkpoint"}
    assert not (tmp_path / "policy-initial").exists()


def test_an_untrained_policy_is_written_once_for_an_engine(tmp_path):
    trainer = _trainer(tmp_path, [_dpo()])
    trainer.open_run_dir()
    try:
        folder = trainer.samplers.current_weights()
        assert folder == tmp_path / "policy-initial"
        assert (folder / "model.safetensors").is_file()
        stamp = (folder / "model.safetensors").stat().st_mtime_ns
        assert trainer.samplers.current_weights() == folder
        assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    finally:
        trainer.close_run_dir()
    given = _trainer(tmp_path / "b", [_dpo()], model_path=tmp_path / "hf")
    assert given.samplers.current_weights() == tmp_path / "hf"  # the folder the model came from


def test_stats_record_what_the_stage_used_of_a_counting_backend(tmp_path):
    import json

    class Counting(RecordingBackend):
        def __init__(self, model) -> None:
            super().__init__(model)
            self.usage = {"requests": 0, "completion_tokens": 0}

        def generate(self, prompts, config, **kw):
            out = super().generate(prompts, config, **kw)
            self.usage["requests"] += 1
            self.usage["completion_tokens"] += sum(len(s) for s in out.sequences)
            return out

    model = tiny_model()
    backend = Counting(model)
    backend.usage["requests"] = 5  # used before this run: not the stage's
    trainer = _trainer(tmp_path, [_dpo(), _dpo()], model=model, backend=backend)
    trainer.run()
    used = []
    for stage in ("01-external-reward-dpo", "02-external-reward-dpo"):
        stats = json.loads((tmp_path / stage / "stats.json").read_text())
        assert set(stats["usage"]) == {"candidates"}  # the scripted judge keeps no counters
        chunks = {r["chunk"] for r in read_jsonl(tmp_path / stage / "candidates.jsonl")}
        assert stats["usage"]["candidates"]["requests"] == len(chunks)  # one call per chunk
        used.append(stats["usage"]["candidates"])
    # each stage's difference of the counters: together, all this run used
    assert sum(u["requests"] for u in used) == backend.usage["requests"] - 5
    assert sum(u["completion_tokens"] for u in used) == backend.usage["completion_tokens"] > 0
