"""``srlm demo --quick`` end to end: the report's structure, and every metric recomputed
independently from the files the run left (the models' greedy outputs, the pipeline's
candidate and pair files) and from the saved checkpoints themselves."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from itertools import combinations
from pathlib import Path

import pytest
import torch

from self_rewarding_lm_pytorch import LLMJudge, load_checkpoint
from self_rewarding_lm_pytorch.demo import DemoTokenizer, build_demo_model, task
from self_rewarding_lm_pytorch.demo.arms import (
    ARM_TABLE,
    ARMS,
    DEFAULT_ARMS,
    Arm,
    ArmIteration,
    check_arms,
)
from self_rewarding_lm_pytorch.demo.config import (
    IterationConfig,
    RandomJudge,
    demo_reward_config,
    quick_config,
)
from self_rewarding_lm_pytorch.demo.report import aggregate, render_aggregate, render_table
from self_rewarding_lm_pytorch.demo.run import main, run_demo
from self_rewarding_lm_pytorch.generation import GenerationConfig, generate_text
from self_rewarding_lm_pytorch.store import read_jsonl

SEED = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["--quick", "--seed", str(SEED), "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def _model_dirs(report: dict) -> dict[str, str]:
    return {name: m["files"] for name, m in report["models"].items()}


def _checkpoint(out: Path, name: str) -> Path:
    if name == "M1":
        return out / "m1" / "01-sft" / "checkpoint"
    arm, m = name.split("/")
    t = int(m[1:]) - 1
    kind = "self-reward-dpo" if arm == "self" else "external-reward-dpo"
    return out / arm / f"{t:02d}-{kind}" / "checkpoint"


def _naive_pairwise(pred: list, gold: list, groups: list) -> float:
    agree = total = 0.0
    for i, j in combinations(range(len(gold)), 2):
        if groups[i] != groups[j] or gold[i] == gold[j]:
            continue
        total += 1
        if pred[i] is None or pred[j] is None or pred[i] == pred[j]:
            agree += 0.5
        elif (pred[i] > pred[j]) == (gold[i] > gold[j]):
            agree += 1
    return agree / total if total else math.nan


def _verdicts_written(text: str) -> str:
    """The verdict string of a well-formed judgement ``yyny Score: N`` or, in the letters
    form, ``yByKny Score: N`` (N in 0..5): its lower-case y/n characters; else ''."""
    m = re.match(r"\s*((?:[A-Z]?[yn])+) Score: [0-5](?!\d)", text)
    return re.sub("[A-Z]", "", m.group(1)) if m else ""


# ---------------------------------------------------------------------- structure


def test_report_files_and_structure(run: tuple[Path, dict]) -> None:
    out, report = run
    assert (out / "report.md").read_text().startswith("# srlm demo report")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["seed"] == SEED and report["quick"] is True
    assert report["arms"] == list(DEFAULT_ARMS) and not report["failures"]
    expected = {"M1"} | {f"{arm}/M{t}" for arm in DEFAULT_ARMS for t in (2, 3)}
    assert set(report["models"]) == expected
    for m in report["models"].values():
        assert 0 <= m["task"]["mean_score"] <= 5
        assert 0 <= m["task"]["pct_fully_correct"] <= 100
        assert set(m["judge"]) >= {
            "pairwise_accuracy",
            "exact_match",
            "spearman",
            "kendall_tau",
            "parse_rate",
            "verdicts",
        }
    for arm in DEFAULT_ARMS:
        assert len(report["iterations"][arm]) == 2
        assert report["summary"]["arms"][arm]["models"] == ["M1", f"{arm}/M2", f"{arm}/M3"]
    for phase in ("data", "sft", "eval M1", "arm self", "total"):
        assert report["timings"][phase]["wall_s"] >= 0
        assert report["timings"][phase]["cpu_s"] >= 0
    # the printed table is in report.md, built from the same numbers
    assert render_table(report) in (out / "report.md").read_text()


def test_summary_and_checks_follow_the_model_metrics(run: tuple[Path, dict]) -> None:
    _, report = run
    models, summary = report["models"], report["summary"]
    for arm in DEFAULT_ARMS:
        a = summary["arms"][arm]
        fc = [models[n]["task"]["pct_fully_correct"] for n in a["models"]]
        pa = [100 * models[n]["judge"]["pairwise_accuracy"] for n in a["models"]]
        assert a["pct_fully_correct"] == fc
        assert a["delta_fully_correct"] == pytest.approx(fc[2] - fc[0])
        assert a["delta_judge_pairwise_accuracy"] == pytest.approx(pa[2] - pa[0])
        assert summary["checks"][f"{arm}_clears_bar"] == (fc[2] - fc[0] >= 10)
    last = {arm: summary["arms"][arm]["pct_fully_correct"][-1] for arm in DEFAULT_ARMS}
    assert summary["checks"]["controls_ordered"] == (
        last["oracle"] >= last["self"] >= last["random"]
    )


# ---------------------------------------------------------------------- task metrics


def test_task_metrics_recomputed_from_the_saved_outputs(run: tuple[Path, dict]) -> None:
    out, report = run
    prompts = task.eval_prompts(quick_config().n_eval_prompts, SEED)
    for name, folder in _model_dirs(report).items():
        records = read_jsonl(out / folder / "task.jsonl")
        assert [r["prompt"] for r in records] == prompts
        correct = 0
        for r in records:
            checks = task.check(r["prompt"], r["response"])
            assert r["score"] == task.score(r["prompt"], r["response"])
            correct += all(checks.values())
        t = report["models"][name]["task"]
        assert t["pct_fully_correct"] == pytest.approx(100 * correct / len(records))
        assert t["mean_score"] == pytest.approx(sum(r["score"] for r in records) / len(records))
        assert t["mean_response_length"] == pytest.approx(
            sum(len(r["response"]) for r in records) / len(records)
        )


def test_saved_outputs_are_the_checkpoints_greedy_outputs(run: tuple[Path, dict]) -> None:
    """Reload M1 and each arm's M3 from its checkpoint and regenerate: the saved responses
    and judgements are exactly what the model writes."""
    out, report = run
    cfg = quick_config()
    tok = DemoTokenizer()
    for name in ("M1", "self/M3", "oracle/M3", "random/M2"):
        model = build_demo_model(SEED, cfg.model)
        load_checkpoint(model, _checkpoint(out, name))
        folder = out / report["models"][name]["files"]
        records = read_jsonl(folder / "task.jsonl")[:20]
        fresh = generate_text(
            model,
            tok,
            [r["prompt"] for r in records],
            GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0),
        )
        assert [f[0] for f in fresh] == [r["response"] for r in records]
        judged = read_jsonl(folder / "judge.jsonl")[:12]
        judge = LLMJudge(
            model,
            tok,
            demo_reward_config(),
            num_samples=1,
            temperature=0.0,
            max_new_tokens=cfg.judge_max_new_tokens,
        )
        results = judge.score([r["prompt"] for r in judged], [r["response"] for r in judged])
        assert [res.samples[0] for res in results] == [r["judgement"] for r in judged]


# ---------------------------------------------------------------------- judge metrics


def test_judge_metrics_recomputed_from_the_saved_judgements(run: tuple[Path, dict]) -> None:
    out, report = run
    examples = task.judge_eval_set(
        quick_config().n_judge_eval_prompts,
        SEED,
        responses_per_prompt=quick_config().judge_eval_responses,
    )
    config = demo_reward_config()
    for name, folder in _model_dirs(report).items():
        records = read_jsonl(out / folder / "judge.jsonl")
        assert [(r["prompt"], r["response"]) for r in records] == [
            (e.prompt, e.response) for e in examples
        ]
        pred = [config.parse(r["judgement"]) for r in records]
        assert pred == [r["score"] for r in records]
        gold = [task.score(r["prompt"], r["response"]) for r in records]
        assert gold == [r["gold_score"] for r in records]
        j = report["models"][name]["judge"]
        assert j["parse_rate"] == pytest.approx(sum(p is not None for p in pred) / len(pred))
        assert j["exact_match"] == pytest.approx(
            sum(p is not None and round(p) == g for p, g in zip(pred, gold)) / len(gold)
        )
        naive = _naive_pairwise(pred, gold, [r["group"] for r in records])
        assert j["pairwise_accuracy"] == pytest.approx(naive)
        # verdict accuracy: characters of the judge's verdict string against the oracle's
        right = total = 0
        for r in records:
            v = task.verdicts(r["prompt"], r["response"])
            got = _verdicts_written(r["judgement"])
            ok = len(got) == len(v)
            right += sum(ok and a == b for a, b in zip(got, v))
            total += len(v)
        assert j["verdicts"]["accuracy"] == pytest.approx(right / total)


# ---------------------------------------------------------------------- meta-judge


def test_meta_judge_metrics_recomputed_from_the_saved_files(run: tuple[Path, dict]) -> None:
    """Each model's meta-judge records are the held-out meta set asked in both orders;
    accuracy and position consistency follow from the saved texts alone."""
    out, report = run
    held = task.meta_eval_set(quick_config().n_meta_eval, SEED)
    for name, folder in _model_dirs(report).items():
        records = read_jsonl(out / folder / "meta.jsonl")
        assert [(r["task_prompt"], r["right"], r["wrong"]) for r in records] == [
            (e.task_prompt, e.right, e.wrong) for e in held
        ]
        first = [r["text_right_first"].strip()[:1] for r in records]
        second = [r["text_right_second"].strip()[:1] for r in records]
        right = sum(a == "A" for a in first) + sum(b == "B" for b in second)
        same = sum({a, b} == {"A", "B"} for a, b in zip(first, second))
        m = report["models"][name]["meta_judge"]
        assert m["accuracy"] == pytest.approx(right / (2 * len(records)))
        assert m["position_consistency"] == pytest.approx(same / len(records))
        assert m["parse_rate"] == pytest.approx(
            sum(x in ("A", "B", "=") for x in first + second) / (2 * len(records))
        )
    # the saved texts are what the checkpoint writes for those prompts (asked as the
    # evaluation asks them: each example right-first, then right-second, in one batch)
    model = build_demo_model(SEED, quick_config().model)
    load_checkpoint(model, _checkpoint(out, "M1"))
    records = read_jsonl(out / "eval" / "M1" / "meta.jsonl")
    prompts = [
        task.render_meta_prompt(r["task_prompt"], r["task_response"], *pair)
        for r in records
        for pair in ((r["right"], r["wrong"]), (r["wrong"], r["right"]))
    ]
    config = GenerationConfig(max_new_tokens=2, temperature=0.0)
    fresh = generate_text(model, DemoTokenizer(), prompts, config)
    saved = [t for r in records for t in (r["text_right_first"], r["text_right_second"])]
    assert [f[0] for f in fresh] == saved
    assert "meta-judge acc" in render_table(report)


def test_an_arm_is_one_table_entry_and_any_iteration_count_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new arm added to ARM_TABLE runs, with three iterations, through the run, the
    report, the plot and the seeds table without any other change."""

    def half_oracle(cfg: object, seed: int, t: int, it: IterationConfig) -> ArmIteration:
        return ArmIteration(
            stage={"kind": "external_reward_dpo", "judge": f"half_{t}", "pair_margin": 0.0},
            judges={f"half_{t}": lambda p, r: task.score(p, r) / 2},
        )

    monkeypatch.setitem(ARM_TABLE, "half", Arm("half", "the oracle's score halved", half_oracle))
    cfg = dataclasses.replace(
        quick_config(),
        sft_steps=20,
        n_eval_prompts=20,
        n_headroom_prompts=10,
        pairs_per_iteration=12,
        iterations=(IterationConfig(num_epochs=1, batch_size=16),) * 3,
    )
    report = run_demo(tmp_path / "r", seed=SEED, arms=["half"], config=cfg)
    assert report["arms"] == ["half"] and not report["failures"]
    assert report["summary"]["arms"]["half"]["models"] == ["M1", "half/M2", "half/M3", "half/M4"]
    assert len(report["iterations"]["half"]) == 3
    fc = [report["models"][n]["task"]["pct_fully_correct"] for n in ("M1", "half/M4")]
    assert report["summary"]["checks"]["half_clears_bar"] == (fc[1] - fc[0] >= 10)
    assert report["summary"]["checks"]["controls_ordered"] is None
    md = (tmp_path / "r" / "report.md").read_text()
    assert "- half: the oracle's score halved" in md and "M1 -> M4" in md
    assert (tmp_path / "r" / "report.png").read_bytes()[:4] == b"\x89PNG"
    for it in report["iterations"]["half"]:  # the arm's judge made the pairs
        for p in read_jsonl(tmp_path / "r" / "half" / it["stage"] / "pairs.jsonl"):
            assert p["score_chosen"] == task.score(p["prompt"], p["chosen"]) / 2
    agg = aggregate([report, report])
    assert len(agg["arms"]["half"]["pct_fully_correct"]) == 4
    assert "| half | M4 - M1 |" in render_aggregate(agg)


# ---------------------------------------------------------------------- iterations


def test_iteration_metrics_recomputed_from_the_pipeline_files(run: tuple[Path, dict]) -> None:
    out, report = run
    for arm in DEFAULT_ARMS:
        for it in report["iterations"][arm]:
            stage_dir = out / arm / it["stage"]
            candidates = read_jsonl(stage_dir / "candidates.jsonl")
            pairs = read_jsonl(stage_dir / "pairs.jsonl")
            assert it["pairs"] == len(pairs) == quick_config().pairs_per_iteration
            for r in candidates:
                assert r["oracle_scores"] == [task.score(r["prompt"], s) for s in r["responses"]]
            by_id = {r["id"]: r for r in candidates}
            good = 0
            for p in pairs:
                rec = by_id[p["prompt_id"]]
                assert rec["responses"][p["chosen_index"]] == p["chosen"]
                assert p["score_chosen"] > p["score_rejected"]
                good += task.score(p["prompt"], p["chosen"]) > task.score(
                    p["prompt"], p["rejected"]
                )
            assert it["pairs_oracle_correct"] == pytest.approx(good / len(pairs))
            pred = [s for r in candidates for s in r["scores"]]
            gold = [s for r in candidates for s in r["oracle_scores"]]
            groups = [i for i, r in enumerate(candidates) for _ in r["scores"]]
            assert it["judge_pairwise_accuracy_on_policy"] == pytest.approx(
                _naive_pairwise(pred, gold, groups)
            )
            if arm == "oracle":
                assert it["pairs_oracle_correct"] == 1.0
            if arm in ("self", "meta"):  # per-criterion accuracy of the own judge samples
                n_ok: dict[str, list[int]] = {}
                for r in candidates:
                    spec = task.parse_prompt(r["prompt"])
                    for resp, jd in zip(r["responses"], r["judgements"]):
                        v = task.verdicts(spec, resp)
                        assert len(jd["samples"]) == quick_config().judge_samples
                        for text in jd["samples"]:
                            got = _verdicts_written(text)
                            usable = len(got) == len(v)
                            for k, c in enumerate(spec.criteria):
                                s = n_ok.setdefault(c, [0, 0])
                                s[0] += usable and got[k] == v[k]
                                s[1] += 1
                per = it["verdicts"]["per_criterion"]
                for c, (ok, n) in n_ok.items():
                    assert per[c]["accuracy"] == pytest.approx(ok / n)
            else:
                assert "verdicts" not in it


def test_headroom_recomputed_from_the_saved_samples(run: tuple[Path, dict]) -> None:
    out, report = run
    records = read_jsonl(out / "eval" / "M1" / "headroom.jsonl")
    cfg = quick_config()
    assert len(records) == cfg.n_headroom_prompts
    assert all(len(r["responses"]) == cfg.num_candidates for r in records)
    hits = [[task.fully_correct(r["prompt"], s) for s in r["responses"]] for r in records]
    h = report["headroom"]
    assert h["pass_at_n"] == pytest.approx(sum(any(x) for x in hits) / len(hits))
    assert h["pass_at_1"] == pytest.approx(sum(sum(x) / len(x) for x in hits) / len(hits))
    assert h["pass_at_n"] >= h["pass_at_1"]


# ---------------------------------------------------------------------- resume, seeds, errors


def test_rerun_resumes_without_redoing_work(run: tuple[Path, dict]) -> None:
    out, report = run
    task_file = out / "eval" / "M1" / "task.jsonl"
    before = task_file.stat().st_mtime_ns
    assert main(["--quick", "--seed", str(SEED), "--out", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert task_file.stat().st_mtime_ns == before
    assert again["models"] == report["models"]
    assert again["iterations"] == report["iterations"]
    assert again["timings"]["sft"]["cpu_s"] < report["timings"]["sft"]["cpu_s"]


def test_same_seed_same_run(run: tuple[Path, dict], tmp_path: Path) -> None:
    out, report = run
    other = tmp_path / "again"
    assert main(["--quick", "--seed", str(SEED), "--out", str(other), "--arms", "random"]) == 0
    again = json.loads((other / "report.json").read_text())
    for name in ("M1", "random/M2", "random/M3"):
        assert again["models"][name] == report["models"][name]
    assert (other / "random" / "01-external-reward-dpo" / "pairs.jsonl").read_text() == (
        out / "random" / "01-external-reward-dpo" / "pairs.jsonl"
    ).read_text()


def test_bad_arguments_are_refused(run: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    out, _ = run
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--arms", "self,bogus", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err
    # a finished run with other settings is not silently mixed with a new one
    assert main(["--quick", "--seed", str(SEED + 1), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a folder that is not a demo run is never deleted by --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["--quick", "--out", str(foreign), "--overwrite"]) == 2
    assert (foreign / "keep.txt").exists()


def test_random_judge_is_seeded_and_uninformative() -> None:
    judge = RandomJudge(7, salt="iteration-1")
    prompts = task.fresh_prompts(400, 0, 1)
    rng = random.Random(0)
    responses = [task.solve(p, rng) if rng.random() < 0.5 else "xq" for p in prompts]
    scores = [judge(p, r) for p, r in zip(prompts, responses)]
    assert scores == [RandomJudge(7, salt="iteration-1")(p, r) for p, r in zip(prompts, responses)]
    assert scores != [RandomJudge(7, salt="iteration-2")(p, r) for p, r in zip(prompts, responses)]
    assert all(0 <= s <= 5 for s in scores)
    gold = [task.score(p, r) for p, r in zip(prompts, responses)]
    # no information: the random judge orders oracle-distinct pairs at chance
    acc = _naive_pairwise(scores[:120], gold[:120], [0] * 120)
    assert 0.4 < acc < 0.6
    with pytest.raises(TypeError, match="seed"):
        RandomJudge("7")  # type: ignore[arg-type]


def test_aggregate_over_seeds(run: tuple[Path, dict]) -> None:
    _, report = run
    other = json.loads(json.dumps(report))
    other["seed"] = SEED + 1
    for arm in DEFAULT_ARMS:
        other["summary"]["arms"][arm]["pct_fully_correct"][2] += 4.0
        other["summary"]["arms"][arm]["delta_fully_correct"] += 4.0
    agg = aggregate([report, other])
    for arm in DEFAULT_ARMS:
        a = report["summary"]["arms"][arm]
        m3 = agg["arms"][arm]["pct_fully_correct"][2]
        assert m3["mean"] == pytest.approx(a["pct_fully_correct"][2] + 2.0)
        assert m3["min"] == pytest.approx(a["pct_fully_correct"][2])
        assert m3["std"] == pytest.approx(math.sqrt(8.0))
        assert agg["arms"][arm]["delta_fully_correct"]["mean"] == pytest.approx(
            a["delta_fully_correct"] + 2.0
        )
    text = render_aggregate(agg)
    assert f"Seeds {SEED}, {SEED + 1}" in text
    # paired with self: seed 2 moved every arm alike, so each difference is the same twice
    assert "vs_self" not in agg["arms"]["self"]
    for arm in (a for a in DEFAULT_ARMS if a != "self"):
        a, base = report["summary"]["arms"][arm], report["summary"]["arms"]["self"]
        diff = a["pct_fully_correct"][2] - base["pct_fully_correct"][2]
        v = agg["arms"][arm]["vs_self"]
        assert v["fully_correct"]["values"] == pytest.approx([diff, diff])
        assert v["fully_correct"]["std"] == pytest.approx(0.0)
        assert v["seeds_above"] == (2 if diff > 0 else 0)
        judge = a["judge_pairwise_accuracy_pct"][2] - base["judge_pairwise_accuracy_pct"][2]
        assert v["judge_pairwise_accuracy"]["mean"] == pytest.approx(judge)
        assert f"| {arm} | {diff:+.1f} / {diff:+.1f} | {diff:+.1f} ± 0.0 |" in text
    other["summary"]["arms"]["meta"]["pct_fully_correct"][2] += 3.0  # meta alone, seed 2
    v = aggregate([report, other])["arms"]["meta"]["vs_self"]["fully_correct"]
    assert v["values"][1] - v["values"][0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no reports"):
        aggregate([])


def test_demo_model_is_what_the_run_trained(run: tuple[Path, dict]) -> None:
    """The checkpoints load into the demo architecture strictly and differ per stage."""
    out, _ = run
    cfg = quick_config()
    weights = []
    for name in ("M1", "self/M2", "self/M3"):
        model = build_demo_model(SEED, cfg.model)
        load_checkpoint(model, _checkpoint(out, name))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[1], weights[2])


def test_letters_judgement_form_round_trips_and_matches_the_oracle() -> None:
    rng = random.Random(5)
    for e in task.eft_data(300, 1, letters=True):
        spec = task.parse_prompt(e.task_prompt)
        # the restated letters are the prompt's, in prompt order, each before its verdict
        letters = [getattr(spec, c).upper() for c in spec.criteria if c in ("start", "end", "has")]
        assert [c for c in e.response.split(" ")[0] if c.isupper()] == letters
        assert task.parse_judgement(e.response, len(spec.criteria)) == (e.verdicts, e.score)
        assert e.score == task.score(e.task_prompt, e.task_response)
    prompt = "len6 start:b end:k has:t>"
    response = task.solve(prompt, rng)
    assert task.format_judgement(prompt, response, letters=True) == "yByKyTy Score: 5"
    assert task.format_judgement(prompt, response) == "yyyy Score: 5"
    with pytest.raises(ValueError, match="one y/n verdict per criterion"):
        task.judgement_text(prompt, "yyy")


def test_arm_names_are_checked_against_the_table() -> None:
    assert check_arms(["random", "self", "random"]) == ["random", "self"]
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['bogus'\]; .*self,oracle,random"):
        check_arms(["self", "bogus"])
    with pytest.raises(ValueError, match="no arm given"):
        check_arms([])
    assert [a.name for a in ARM_TABLE.values()] == list(ARMS)
    assert all(a.description for a in ARM_TABLE.values())


def test_meta_arm_judge_pairs_are_its_own_judgements_meta_judged(run: tuple[Path, dict]) -> None:
    """The meta arm's judge pairs: two of the model's own judgements of one of its
    candidates (from candidates.jsonl), the judge prompt as the judge saw it, the
    Bradley-Terry stronger one chosen (meta_judgements.jsonl), at most the configured
    share of the iteration's pairs."""
    out, report = run
    cfg = quick_config()
    stages = sorted((out / "meta").glob("*-meta-reward-dpo"))
    assert len(stages) == len(cfg.iterations)
    for stage in stages:
        by_id = {r["id"]: r for r in read_jsonl(stage / "candidates.jsonl")}
        metas = {m["id"]: m for m in read_jsonl(stage / "meta_judgements.jsonl")}
        judge_pairs = read_jsonl(stage / "judge_pairs.jsonl")
        actor = read_jsonl(stage / "pairs.jsonl")
        stats = json.loads((stage / "stats.json").read_text())
        assert stats["judge_pairs"] == len(judge_pairs) > 0
        assert len(judge_pairs) / (len(judge_pairs) + len(actor)) <= cfg.meta_judge_pair_share
        for p in judge_pairs:
            record = by_id[p["prompt_id"]]
            response = record["responses"][p["candidate"]]
            texts = record["judgements"][p["candidate"]]["samples"]
            assert p["prompt"] == task.render_judge_prompt(record["prompt"], response)
            assert (p["chosen"], p["rejected"]) == (
                texts[p["chosen_index"]],
                texts[p["rejected_index"]],
            )
            meta = metas[f"{p['prompt_id']}/{p['candidate']}"]
            strength = dict(zip(meta["judgement_indices"], meta["strengths"]))
            assert strength[p["chosen_index"]] == max(strength.values())
            assert strength[p["rejected_index"]] == min(strength.values())
        # every meta-judgement that ranks its judgements was a candidate pair; the pairs kept
        # fill the share cap's room and are spread over the chosen scores by water-filling:
        # a score that lost pairs keeps at least as many as any other score, less one
        offered: dict[float, int] = {}
        for m in metas.values():
            st, idx = m["strengths"], m["judgement_indices"]
            best = max(range(len(st)), key=lambda k: (st[k], -k))
            worst = min(range(len(st)), key=lambda k: (st[k], k))
            samples = by_id[m["prompt_id"]]["judgements"][m["candidate"]]["samples"]
            if st[best] - st[worst] > 1e-9 and samples[idx[best]] != samples[idx[worst]]:
                offered[m["scores"][best]] = offered.get(m["scores"][best], 0) + 1
        room = math.floor(
            cfg.meta_judge_pair_share / (1 - cfg.meta_judge_pair_share) * len(actor) + 1e-9
        )
        assert stats["judge_pair_candidates"] == sum(offered.values())
        assert len(judge_pairs) == min(room, sum(offered.values()))
        kept: dict[float, int] = {}
        for p in judge_pairs:
            kept[p["score_chosen"]] = kept.get(p["score_chosen"], 0) + 1
        for score, n in offered.items():
            if kept.get(score, 0) < n:
                assert all(kept.get(score, 0) >= k - 1 for k in kept.values())
