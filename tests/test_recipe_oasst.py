"""The paper's OASST recipe end to end through ``srlm`` on a tiny random Llama: prepare ->
SFT(IFT) -> eft_build -> SFT(IFT + EFT, init base) = M1 -> head_to_head (M1's outputs on
held-out prompts) -> one self-rewarding iteration = M2 -> head_to_head (M2 vs M1); and the
example recipes load and pass ``srlm run --check`` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_head_to_head import _check_outputs

from self_rewarding_lm_pytorch.cli import main
from self_rewarding_lm_pytorch.config import load_run_config
from self_rewarding_lm_pytorch.hf import build_tiny_model

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "oasst_sample.jsonl"
EXAMPLES = HERE.parent / "examples"

#: a pointwise judge for the head-to-head: more words is better
JUDGES = "def words(prompt, response):\n    return float(len(response.split()))\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """The fixture prepared by ``srlm prepare oasst`` and a tiny model folder."""
    root = tmp_path_factory.mktemp("recipe")
    data = root / "data"
    args = ["-q", "prepare", "oasst", "--input", str(FIXTURE), "--out", str(data)]
    assert main([*args, "--heldout-fraction", "0.34"]) == 0
    return data, build_tiny_model(root / "tiny")


def _config(data: Path, model: Path, out: Path) -> dict:
    small = {"batch_size": 2, "num_train_steps": 2, "start_learning_rate": 1.0e-3}
    h2h = {"kind": "head_to_head", "prompts": "heldout", "max_new_tokens": 6, "judge": "words"}
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {
            "ift": {"path": str(data / "ift.jsonl")},
            "eft_inputs": {"path": str(data / "eft_inputs.jsonl")},
            "prompts": {"path": str(data / "eft_inputs.jsonl")},  # its prompt column
            "heldout": {"path": str(data / "ift_heldout.jsonl")},
        },
        "judges": {"words": {"kind": "python", "function": "srlm_recipe_judges:words"}},
        # a random model cannot judge: a template whose regex takes any number it writes
        "reward_config": {
            "prompt_template": "score {{ response }} for {{ prompt }} : score",
            "reward_regex_template": "{{ reward }}",
        },
        "stages": [
            {"kind": "sft", "datasets": ["ift"], "trainer": small},
            {
                "kind": "eft_build",
                "inputs": "eft_inputs",
                "agreement": "best_worst",
                "heldout_fraction": 0.0,
                "judge_settings": {"num_samples": 4, "max_new_tokens": 12, "temperature": 1.0},
            },
            {"kind": "sft", "datasets": ["ift", "generated_eft"], "init": "base", "trainer": small},
            h2h,
            {
                "kind": "self_reward_dpo",
                "prompts": "prompts",
                "num_preference_pairs": 1,
                "num_candidates": 3,
                "max_new_tokens": 8,
                "judge_settings": {"num_samples": 2, "max_new_tokens": 8},
                "trainer": {"batch_size": 1, "start_learning_rate": 5.0e-2},
            },
            h2h,
        ],
        "accelerate": {"cpu": True},
        "out": str(out),
        "seed": 0,
    }


def test_the_oasst_recipe_end_to_end_through_srlm(prepared, tmp_path, monkeypatch, capsys):
    data, model = prepared
    run = tmp_path / "run"
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(_config(data, model, run)))
    (tmp_path / "srlm_recipe_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["-q", "run", str(config)]) == 0
    capsys.readouterr()
    eft_dir = run / "02-eft-build"
    stats = json.loads((eft_dir / "stats.json").read_text())
    eft = [json.loads(x) for x in (eft_dir / "eft.jsonl").open()]
    assert stats["train_examples"] == len(eft) >= 1
    assert not (eft_dir / "checkpoint").exists()
    report = (run / "report.md").read_text()
    assert "- eft: `02-eft-build/eft.jsonl`" in report
    assert "| score_histogram_after | " in report
    # M1's outputs (04) are the baseline of M2's (06), judged by the words judge
    m1 = [json.loads(x) for x in (run / "04-head-to-head" / "outputs.jsonl").open()]
    assert [r["prompt"] for r in m1] == [r["messages"][0]["content"] for r in _rows(data)]
    stats, rows = _check_outputs(run / "06-head-to-head")  # equal to a recomputation
    assert [r["response_b"] for r in rows] == [r["response"] for r in m1]
    words = [float(len(r["response_a"].split()) > len(r["response_b"].split())) for r in rows]
    ties = [len(r["response_a"].split()) == len(r["response_b"].split()) for r in rows]
    assert stats["win_rate"] == pytest.approx(sum(w + t / 2 for w, t in zip(words, ties)) / 3)
    assert (stats["name_a"], stats["name_b"], stats["items_total"]) == (
        "06-head-to-head",
        "04-head-to-head",
        3,
    )
    records = {r["stage"]: r for r in json.loads((run / "report.json").read_text())["stages"]}
    assert records["04-head-to-head"]["baseline"] is None
    summary = records["06-head-to-head"]["head_to_head"]
    assert summary == {k: stats[k] for k in summary} and summary["judged"] == 3
    pct = f"{100 * stats['win_rate']:.1f}%"
    assert f"| 06-head-to-head | 04-head-to-head | 3 | {pct}" in report.split("## Head-to-head")[1]


def _rows(data: Path) -> list[dict]:
    return [json.loads(x) for x in (data / "ift_heldout.jsonl").open()]


@pytest.mark.parametrize("recipe", ["recipe_oasst_1b.yaml", "recipe_oasst_8b.yaml"])
def test_the_example_recipes_load_and_check_on_the_tiny_model(prepared, recipe, capsys):
    data, model = prepared
    path = EXAMPLES / recipe
    cfg = load_run_config(path, check_files=False)
    kinds = [s.kind for s in cfg.stage_objects]
    rounds = ["prompt_generation", "self_reward_dpo", "head_to_head"] * 2  # M2, M3
    assert kinds == ["sft", "eft_build", "sft", "head_to_head", *rounds]
    assert [s.baseline for s in cfg.stage_objects if s.kind == "head_to_head"] == ["first"] * 3
    assert cfg.stage_objects[2].init == "base"
    assert "generated_eft" in cfg.stage_objects[2].datasets
    overrides = [f"model.path={model}", f"data.ift.path={data / 'ift.jsonl'}",
                 f"data.eft_inputs.path={data / 'eft_inputs.jsonl'}",
                 f"data.heldout.path={data / 'ift_heldout.jsonl'}",
                 "generation={backend: torch}",
                 "accelerate.cpu=true", "accelerate.mixed_precision='no'"]  # fmt: skip
    assert main(["-q", "run", str(path), "--check", *overrides]) == 0
