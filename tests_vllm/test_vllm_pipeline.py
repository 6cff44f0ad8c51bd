"""``srlm run`` with ``generation.backend=vllm``: examples/tiny_smoke.yaml end to end on a
vLLM-servable tiny Llama, checked against the torch engine (greedy judging), and resumed
after a kill with the same candidates as an uninterrupted run.

Candidate sampling differs between the backends by design (each has its own random
streams), so the checks compare what is deterministic: greedy judgements, pairs, and one
backend's outputs across launches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_folder

from self_rewarding_lm_pytorch.store import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_smoke.yaml"
TRAPS = ROOT / "tests" / "fault_inject"
SRLM = [sys.executable, "-m", "self_rewarding_lm_pytorch.cli"]
OVERRIDES = [
    "generation.backend=vllm",
    "generation.vllm.dtype=float32",
    "accelerate.log_with=null",
    "stages.1.judge_settings.temperature=0",  # greedy judging: comparable across backends
    "stages.1.judge_settings.num_samples=1",
    "stages.1.chunk_size=2",
]


def _srlm_run(
    out: Path, model: Path, fault: str | None = None, config: Path = EXAMPLE, ranks: int = 1
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRLM_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TRAPS)] * (fault is not None) + [str(ROOT), env.get("PYTHONPATH", "")]
    )
    if fault is not None:
        env.update(SRLM_FAULT=fault, SRLM_FAULT_RUN=str(out))
    launch = SRLM
    if ranks > 1:  # torchrun: each rank samples its chunks with its own engine
        env["OMP_NUM_THREADS"] = "1"
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                  "--master_port=29533", "-m", "self_rewarding_lm_pytorch.cli"]  # fmt: skip
    quiet = ["-q"] if ranks == 1 else []  # several ranks: vLLM's log shows its launcher
    cmd = [*launch, *quiet, "run", str(config), f"model.path={model}", f"out={out}", *OVERRIDES]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


#: a vocabulary of mostly digits: the random model's judgements hold numbers to parse
WORDS = [*"0123456789", *"score the answer to : . tell me a story what is".split()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("digits") / "model", words=WORDS)


@pytest.fixture(scope="module")
def runs(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted run of the example with a second DPO iteration (its engine loads
    the first one's checkpoint), and a run of the example killed in the DPO stage's first
    sampling, then resumed."""
    base = tmp_path_factory.mktemp("pipeline")
    data = yaml.safe_load(EXAMPLE.read_text())
    data["stages"][1]["trainer"]["start_learning_rate"] = 1e-3  # DPO that changes the judge
    data["stages"].append({**data["stages"][1], "num_candidates": 4, "num_preference_pairs": 1})
    three = base / "three_stages.yaml"
    three.write_text(yaml.safe_dump(data))
    whole = base / "whole"
    done = _srlm_run(whole, tiny, config=three)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = base / "killed"
    first = _srlm_run(killed, tiny, fault="gen:02:1")
    assert first.returncode == -9, first.stderr[-3000:]  # SIGKILL, after SFT finished
    assert (killed / "01-sft" / "checkpoint").is_dir()
    assert not (killed / "02-self-reward-dpo" / "pairs.jsonl").exists()
    resumed = _srlm_run(killed, tiny)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"whole": whole, "killed": killed, "config": three}


def _config(tiny: Path, out: Path, config: Path = EXAMPLE):
    from self_rewarding_lm_pytorch.config import load_run_config

    return load_run_config(config, overrides=[f"model.path={tiny}", f"out={out}", *OVERRIDES])


def _torch_judge(cfg, folder: Path):
    """The run's self judge on the torch engine, over the weights in ``folder``."""
    import dataclasses

    from self_rewarding_lm_pytorch.cli.build import build_reward_config, build_tokenizer
    from self_rewarding_lm_pytorch.generation import TorchBackend
    from self_rewarding_lm_pytorch.hf import load_model
    from self_rewarding_lm_pytorch.judge import LLMJudge

    stage = cfg.stage_objects[1]
    return LLMJudge(
        TorchBackend(load_model(folder).eval()),
        build_tokenizer(cfg),
        build_reward_config(cfg.reward_config),
        **dataclasses.asdict(stage.judge_settings),
    )


def _judged(judge, records: list[dict]) -> list[list[dict]]:
    out = []
    for r in records:
        results = judge.score([r["prompt"]] * len(r["responses"]), r["responses"])
        out.append([res.to_dict() for res in results])
    return out


@pytest.mark.parametrize(
    ("stage", "weights"),
    [("02-self-reward-dpo", "01-sft"), ("03-self-reward-dpo", "02-self-reward-dpo")],
)
def test_vllm_run_is_judged_as_the_torch_engine_judges_on_the_stage_input(
    runs, tiny, stage, weights
):
    """Stage 02's engine started on the SFT checkpoint; stage 03's was given stage 02's
    checkpoint by ``load_weights``: each judged as the torch engine does on those weights,
    not on the weights before."""
    run = runs["whole"]
    cfg = _config(tiny, run, runs["config"])
    records = read_jsonl(run / stage / "candidates.jsonl")
    n = cfg.stage_objects[int(stage[:2]) - 1].num_candidates
    assert records and all(len(r["responses"]) == n for r in records)
    judged = _judged(_torch_judge(cfg, run / weights / "checkpoint"), records)
    assert judged == [r["judgements"] for r in records]
    assert [[j["score"] for j in js] for js in judged] == [r["scores"] for r in records]
    before = tiny if weights == "01-sft" else run / "01-sft" / "checkpoint"
    assert _judged(_torch_judge(cfg, before), records) != judged
    resolved = yaml.safe_load((run / "run_config.yaml").read_text())
    assert resolved["generation"]["backend"] == "vllm"
    assert resolved["generation"]["vllm"]["dtype"] == "float32"


def test_vllm_run_pairs_are_rebuilt_from_its_records(runs, tiny):
    from self_rewarding_lm_pytorch.pipeline.preference import pairs_of

    run = runs["whole"]
    stage = _config(tiny, run, runs["config"]).stage_objects[1]
    records = read_jsonl(run / "02-self-reward-dpo" / "candidates.jsonl")
    rebuilt: list[dict] = []
    for record in records:
        rebuilt += pairs_of(record, stage, stage.num_preference_pairs - len(rebuilt))
    assert rebuilt and read_jsonl(run / "02-self-reward-dpo" / "pairs.jsonl") == rebuilt


def test_a_resumed_vllm_run_writes_the_same_candidates(runs):
    name = "02-self-reward-dpo/candidates.jsonl"
    whole, killed = (runs[k] / name for k in ("whole", "killed"))
    assert killed.read_bytes() == whole.read_bytes()
    assert (runs["killed"] / "02-self-reward-dpo" / "checkpoint").is_dir()


def test_two_ranks_with_vllm_are_refused_before_any_work(runs, tiny, tmp_path):
    """One in-process engine per rank would form a data-parallel group whose engines step
    together while the ranks' sampling rounds differ: a real two-rank launch stops at once
    with the message (no wait), before anything is trained or written."""
    two = tmp_path / "two"
    done = _srlm_run(two, tiny, ranks=2, config=runs["config"])
    log = done.stderr + done.stdout
    assert done.returncode != 0, log[-3000:]
    assert "vllm under several processes (WORLD_SIZE=2) is not supported" in log, log[-3000:]
    assert not (two / "01-sft" / "checkpoint").exists()


def test_a_yaml_judge_served_by_vllm_scores_as_the_torch_engine(tiny):
    from self_rewarding_lm_pytorch.cli.build import build_judge, close_judges
    from self_rewarding_lm_pytorch.config import JudgeSpec, from_dict

    spec = {"kind": "llm", "path": str(tiny), "temperature": 0.0, "num_samples": 1}
    spec["max_new_tokens"] = 8
    spec["reward_config"] = {  # short enough for the tiny model's context
        "prompt_template": "score the answer {{ response }} to {{ prompt }} : score",
        "reward_regex_template": "{{ reward }}",
    }
    served = build_judge(from_dict(JudgeSpec, {**spec, "generation": {"backend": "vllm"}}))
    local = build_judge(from_dict(JudgeSpec, spec))
    assert type(served.backend).__name__ == "VLLMBackend"
    prompts, responses = ["tell me a story", "what is 3"], ["1 2 3", "the answer is 4"]
    try:
        got = [r.to_dict() for r in served.score(prompts, responses)]
    finally:
        close_judges({"served": served})
    assert served.backend.llm is None  # closed
    assert got == [r.to_dict() for r in local.score(prompts, responses)]
