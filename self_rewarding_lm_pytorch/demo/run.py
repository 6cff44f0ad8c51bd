"""``srlm demo``: the paper's loop in miniature, end to end, on a laptop CPU.

Phases (each timed in wall-clock and process CPU seconds, each with a progress bar):

1. **Data** (:mod:`.task`): IFT (prompt -> response with systematic, fixable noise), EFT
   (judge prompt -> per-criterion verdicts and ``Score: N``), fresh prompts for every
   iteration, held-out evaluation prompts and a held-out judge set.
2. **M1**: one :class:`~self_rewarding_lm_pytorch.SelfRewardingTrainer` run with an
   :class:`~self_rewarding_lm_pytorch.SFTStage` on IFT + EFT (Yuan et al., 2024, section 2.1).
3. **Headroom**: pass@N of M1 at the candidates' temperature on held-out prompts.
   Preference training can only sharpen what the model sometimes does (feasibility note,
   round 1, lesson 5), so this is checked and reported before any DPO.
4. **Arms**: for each arm a fresh model loaded with M1 and a SelfRewardingTrainer with two
   :class:`~self_rewarding_lm_pytorch.PreferenceStage` iterations (N candidates at T=1,
   best vs worst, DPO with an NLL term on the chosen response and EFT replay):

   * ``self``: the model judges its own candidates (section 2.3, ``judge_samples``
     judgements averaged) -- gives M2 and M3;
   * ``oracle``: the task's exact oracle judges (upper bound: ``external_reward_dpo``);
   * ``random``: a seeded random judge (lower bound).
5. **Evaluation** of M1 and every arm's M2, M3 on held-out data: greedy responses scored
   by the oracle (mean score, % fully correct, mean length, per-criterion satisfaction)
   and the model as a greedy judge of a held-out judge set against the oracle (pairwise
   accuracy, exact match, Spearman, Kendall tau, parse rate, per-criterion verdict
   accuracy).  Per iteration, from the run's ``candidates.jsonl`` / ``pairs.jsonl``: the
   judge's accuracy on the policy's own candidates (per criterion: the reward-hacking
   signal) and the oracle quality of the pairs.
6. **Report** (:mod:`.report`): ``report.json``, ``report.md``, ``report.png`` and a table
   printed at the end.  Every number is computed from files the run wrote (the models'
   greedy outputs under ``eval/``, the pipeline's candidate and pair files).

The run directory (``--out``) holds ``m1/`` (the SFT run), one folder per arm, ``eval/``
and the report; running the same command again resumes (finished stages and evaluations
are reused), ``--overwrite`` starts afresh.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import (
    PreferenceStage,
    RewardConfig,
    SelfRewardingTrainer,
    SFTStage,
    load_checkpoint,
)
from ..generation import (
    GenerationBackend,
    GenerationConfig,
    TorchBackend,
    as_backend,
    generate_text,
)
from ..judge import JudgeConfig, LLMJudge
from ..metrics import reward_metrics, verdict_accuracy
from ..pipeline import JudgeParseError, NotEnoughPairsError
from ..store import atomic_write_json, atomic_write_text, read_jsonl
from ..utils import make_generator
from . import task
from .cli import main
from .config import (
    ARMS,
    DemoConfig,
    DemoSetupError,
    IterationConfig,
    RandomJudge,
    demo_reward_config,
    quick_config,
)
from .model import build_demo_model, count_parameters
from .tokenizer import DemoTokenizer

__all__ = [
    "ARMS",
    "DemoConfig",
    "DemoSetupError",
    "IterationConfig",
    "RandomJudge",
    "demo_reward_config",
    "evaluate_judge",
    "evaluate_task",
    "iteration_metrics",
    "main",
    "quick_config",
    "run_demo",
]


# ====================================================================== timing


@dataclass
class _Timer:
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _say(f"phase: {name}")
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            rec = self.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            rec["wall_s"] += time.perf_counter() - wall
            rec["cpu_s"] += time.process_time() - cpu


def _say(msg: str) -> None:
    print(f"[srlm demo] {msg}", file=sys.stderr, flush=True)


# ====================================================================== evaluation


def _jsonl_text(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def _cached(path: Path, n: int) -> list[dict] | None:
    """The records of a finished evaluation file, or ``None`` if it is absent/incomplete."""
    if not path.exists():
        return None
    records = read_jsonl(path)
    return records if len(records) == n else None


def evaluate_task(
    model: torch.nn.Module | GenerationBackend,
    tokenizer: DemoTokenizer,
    prompts: Sequence[str],
    path: Path,
    *,
    max_new_tokens: int = 16,
) -> tuple[list[dict], dict[str, Any]]:
    """Greedy responses of ``model`` (or a backend) to ``prompts`` scored by the oracle;
    records go to ``path`` (JSONL: prompt, response, verdicts, score) and are reused if the
    file is complete.

    Returns the records and :func:`~.task.instruction_metrics` of them.
    """
    records = _cached(path, len(prompts))
    if records is None or [r["prompt"] for r in records] != list(prompts):
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        responses = generate_text(
            as_backend(model), tokenizer, list(prompts), config, progress=True
        )
        records = [
            {
                "prompt": p,
                "response": rs[0],
                "verdicts": task.verdicts(p, rs[0]),
                "score": task.score(p, rs[0]),
            }
            for p, rs in zip(prompts, responses)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _jsonl_text(records))
    metrics = task.instruction_metrics(
        [r["prompt"] for r in records], [r["response"] for r in records]
    )
    return records, metrics


def judge_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """Reward-modelling metrics of judged records (keys ``score``, ``gold_score``,
    ``group``, ``judgement``, ``gold_verdicts``, ``prompt``): the score metrics of
    :func:`~..metrics.reward_metrics` (pairwise accuracy within each prompt) plus
    per-criterion verdict accuracy."""
    pred = [r["score"] for r in records]
    gold = [r["gold_score"] for r in records]
    out: dict[str, Any] = dict(reward_metrics(pred, gold, groups=[r["group"] for r in records]))
    names = [task.parse_prompt(r["prompt"]).criteria for r in records]
    pred_v = [
        task.parse_judgement(r["judgement"], len(r["gold_verdicts"])).verdicts for r in records
    ]
    out["verdicts"] = verdict_accuracy(pred_v, [r["gold_verdicts"] for r in records], names)
    return out


def evaluate_judge(
    model: torch.nn.Module | GenerationBackend,
    tokenizer: DemoTokenizer,
    examples: Sequence[task.JudgeEvalExample],
    path: Path,
    *,
    reward_config: RewardConfig | None = None,
    max_new_tokens: int = 16,
) -> tuple[list[dict], dict[str, Any]]:
    """The model (or a backend) as a greedy judge (one judgement each) of the held-out
    judge set.

    Records (prompt, response, gold score/verdicts, group, judgement text, parsed score)
    go to ``path`` and are reused if the file is complete.  Returns them and
    :func:`judge_metrics`.
    """
    records = _cached(path, len(examples))
    if records is None:
        judge = LLMJudge(
            as_backend(model),
            tokenizer,
            reward_config or demo_reward_config(),
            num_samples=1,
            mode="mean",
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            generation_kwargs={"progress": True},
        )
        results = judge.score([e.prompt for e in examples], [e.response for e in examples])
        records = [
            {
                "prompt": e.prompt,
                "response": e.response,
                "group": e.group,
                "gold_score": e.score,
                "gold_verdicts": e.verdicts,
                "judgement": r.samples[0] if r.samples else "",
                "score": r.score,
            }
            for e, r in zip(examples, results)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _jsonl_text(records))
    return records, judge_metrics(records)


def headroom_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """pass@1 (mean fraction of fully correct samples) and pass@N (fraction of prompts
    with at least one fully correct sample) of sampled responses."""
    if not records:
        raise ValueError("no headroom records; sample at least one prompt")
    n = len(records[0]["responses"])
    correct = [[task.fully_correct(r["prompt"], s) for s in r["responses"]] for r in records]
    return {
        "n_prompts": len(records),
        "samples_per_prompt": n,
        "pass_at_1": sum(sum(c) / len(c) for c in correct) / len(correct),
        f"pass_at_{n}": sum(any(c) for c in correct) / len(correct),
        "pass_at_n": sum(any(c) for c in correct) / len(correct),
    }


def evaluate_headroom(
    model: torch.nn.Module | GenerationBackend,
    tokenizer: DemoTokenizer,
    prompts: Sequence[str],
    path: Path,
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> tuple[list[dict], dict[str, Any]]:
    """Sample ``num_samples`` responses per prompt from ``model`` (or a backend) at
    ``temperature`` (as the iterations do) and measure pass@1 and pass@N
    (:func:`headroom_metrics`)."""
    records = _cached(path, len(prompts))
    if records is None:
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            num_return_sequences=num_samples,
        )
        samples = generate_text(
            as_backend(model),
            tokenizer,
            list(prompts),
            config,
            generator=make_generator(seed),  # on the CPU, whatever the model's device
            progress=True,
        )
        records = [{"prompt": p, "responses": rs} for p, rs in zip(prompts, samples)]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _jsonl_text(records))
    return records, headroom_metrics(records)


def iteration_metrics(candidates: Sequence[dict], pairs: Sequence[dict]) -> dict[str, Any]:
    """What one preference iteration's files say about its judge and its pairs.

    From ``candidates.jsonl`` (each record: prompt, responses, scores, judgements and the
    oracle's scores) and ``pairs.jsonl``:

    * ``candidates_mean_oracle_score`` / ``candidates_pct_fully_correct``: the policy's
      own samples;
    * ``judge_pairwise_accuracy_on_policy``: the judge's scores against the oracle's over
      candidate pairs of the same prompt;
    * ``pairs_oracle_correct`` / ``_tied`` / ``_inverted``: fractions of the training
      pairs whose chosen response the oracle scores above / equal to / below the rejected;
    * ``verdicts`` (model judges only): per-criterion accuracy of every judge sample's
      verdicts against the oracle's on the policy's candidates -- a criterion whose
      ``fail_recall`` drops is a blind spot the policy can exploit (reward hacking).
    """
    if not candidates:
        raise ValueError("no candidate records; the iteration judged nothing")
    from ..metrics import pairwise_accuracy

    pred, gold, groups = [], [], []
    for i, r in enumerate(candidates):
        if "oracle_scores" not in r:
            raise ValueError(
                "candidate records have no oracle_scores; run the pipeline with oracle=..."
            )
        pred += r["scores"]
        gold += r["oracle_scores"]
        groups += [i] * len(r["scores"])
    by_id = {r["id"]: r for r in candidates}
    signs = []
    for p in pairs:
        o = by_id[p["prompt_id"]]["oracle_scores"]
        d = o[p["chosen_index"]] - o[p["rejected_index"]]
        signs.append((d > 0) - (d < 0))
    n_pairs = len(pairs)
    responses = [(r["prompt"], s) for r in candidates for s in r["responses"]]
    out: dict[str, Any] = {
        "prompts": len(candidates),
        "candidates": len(responses),
        "pairs": n_pairs,
        "candidates_mean_oracle_score": sum(gold) / len(gold),
        "candidates_pct_fully_correct": 100.0
        * sum(task.fully_correct(p, s) for p, s in responses)
        / len(responses),
        "judge_parse_rate": sum(s is not None for s in pred) / len(pred),
        "judge_pairwise_accuracy_on_policy": pairwise_accuracy(pred, gold, groups=groups),
        "pairs_oracle_correct": signs.count(1) / n_pairs if n_pairs else math.nan,
        "pairs_oracle_tied": signs.count(0) / n_pairs if n_pairs else math.nan,
        "pairs_oracle_inverted": signs.count(-1) / n_pairs if n_pairs else math.nan,
    }
    pred_v, gold_v, names = [], [], []
    for r in candidates:
        spec = task.parse_prompt(r["prompt"])
        for response, judgement in zip(r["responses"], r["judgements"]):
            gold_string = task.verdicts(spec, response)
            for text in judgement.get("samples") or []:
                pred_v.append(task.parse_judgement(text, len(gold_string)).verdicts)
                gold_v.append(gold_string)
                names.append(spec.criteria)
    if gold_v:
        out["verdicts"] = verdict_accuracy(pred_v, gold_v, names)
    return out


# ====================================================================== the run


@dataclass
class _Data:
    ift: list[dict]
    eft: list[dict]
    prompts: dict[str, list[str]]
    eval_prompts: list[str]
    judge_eval: list[task.JudgeEvalExample]
    headroom_prompts: list[str]


def _make_data(cfg: DemoConfig, seed: int) -> _Data:
    ift = task.ift_data(cfg.n_ift, seed, config=cfg.task_config, noise=cfg.ift_noise)
    eft = task.eft_data(cfg.n_eft, seed, config=cfg.task_config, letters=cfg.judge_letters)
    prompts = {
        f"prompts_{t}": task.fresh_prompts(cfg.prompt_pool, seed, t, config=cfg.task_config)
        for t in range(1, len(cfg.iterations) + 1)
    }
    eval_prompts = task.eval_prompts(cfg.n_eval_prompts, seed, config=cfg.task_config)
    return _Data(
        ift=[{"prompt": e.prompt, "response": e.response} for e in ift],
        eft=[{"prompt": e.prompt, "response": e.response} for e in eft],
        prompts=prompts,
        eval_prompts=eval_prompts,
        judge_eval=task.judge_eval_set(
            cfg.n_judge_eval_prompts,
            seed,
            responses_per_prompt=cfg.judge_eval_responses,
            config=cfg.task_config,
        ),
        headroom_prompts=eval_prompts[: cfg.n_headroom_prompts],
    )


def _preference_stages(cfg: DemoConfig, arm: str) -> list[PreferenceStage]:
    stages = []
    for t, it in enumerate(cfg.iterations, start=1):
        common: dict[str, Any] = dict(
            prompts=f"prompts_{t}",
            num_preference_pairs=cfg.pairs_per_iteration,
            num_candidates=cfg.num_candidates,
            temperature=cfg.candidate_temperature,
            top_p=1.0,
            max_new_tokens=cfg.max_new_tokens,
            chunk_size=cfg.chunk_size,
            pair_margin=it.pair_margin if arm == "self" else 0.0,
            replay="eft",
            trainer={
                "beta": it.beta,
                "nll_weight": it.nll_weight,
                "replay_weight": it.replay_weight,
                "num_epochs": it.num_epochs,
                "batch_size": it.batch_size,
                "start_learning_rate": it.learning_rate,
                "end_learning_rate": it.end_learning_rate,
                "group_by_length": cfg.group_by_length,
            },
        )
        if arm == "self":
            stage = PreferenceStage(
                kind="self_reward_dpo",
                judge="self",
                judge_settings=JudgeConfig(
                    num_samples=cfg.judge_samples,
                    mode=cfg.judge_mode,  # type: ignore[arg-type]
                    temperature=cfg.judge_temperature,
                    top_p=cfg.judge_top_p,
                    max_new_tokens=cfg.judge_max_new_tokens,
                ),
                **common,
            )
        else:
            stage = PreferenceStage(kind="external_reward_dpo", judge=f"{arm}_{t}", **common)
        stages.append(stage)
    return stages


def _judges(arm: str, cfg: DemoConfig, seed: int) -> dict[str, Callable[[str, str], float]]:
    out: dict[str, Callable[[str, str], float]] = {}
    for t in range(1, len(cfg.iterations) + 1):
        if arm == "oracle":
            out[f"oracle_{t}"] = task.score
        elif arm == "random":
            out[f"random_{t}"] = RandomJudge(seed, salt=f"iteration-{t}")
    return out


def _trainer_common(cfg: DemoConfig, seed: int, tokenizer: DemoTokenizer) -> dict[str, Any]:
    return dict(
        tokenizer=tokenizer,
        seed=seed,
        accelerate_kwargs={"cpu": True},
        preference_max_seq_len=cfg.model.max_seq_len,
    )


def _load(cfg: DemoConfig, seed: int, checkpoint: Path) -> torch.nn.Module:
    model = build_demo_model(seed, cfg.model)
    load_checkpoint(model, checkpoint)
    return model


def _check_out_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    marker = out / "demo_config.json"
    if overwrite and out.exists():
        if out.is_dir() and not marker.exists() and any(out.iterdir()):
            raise DemoSetupError(
                f"--overwrite would delete {out}, which is not a demo run directory (no "
                "demo_config.json); pick another --out"
            )
        shutil.rmtree(out)
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous != settings:
            changed = sorted(
                k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k)
            )
            raise DemoSetupError(
                f"{out} holds a demo run with different settings ({', '.join(changed)}); "
                "pass --overwrite to replace it or choose another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise DemoSetupError(
            f"{out} exists and is not a demo run directory; choose another --out (or remove it)"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, settings)


def _evaluate_model(
    name: str,
    model: torch.nn.Module,
    tokenizer: DemoTokenizer,
    data: _Data,
    cfg: DemoConfig,
    out: Path,
) -> dict[str, Any]:
    folder = out / "eval" / name.replace("/", "-")
    backend = TorchBackend(model)
    _, task_m = evaluate_task(
        backend,
        tokenizer,
        data.eval_prompts,
        folder / "task.jsonl",
        max_new_tokens=cfg.max_new_tokens,
    )
    _, judge_m = evaluate_judge(
        backend,
        tokenizer,
        data.judge_eval,
        folder / "judge.jsonl",
        max_new_tokens=cfg.judge_max_new_tokens,
    )
    return {"task": task_m, "judge": judge_m, "files": str(folder.relative_to(out))}


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    arms: Sequence[str] = ARMS,
    config: DemoConfig | None = None,
    overwrite: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return the report (also written there)."""
    from . import report as report_mod

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    arms = list(dict.fromkeys(arms))
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    cfg = config or (quick_config() if quick else DemoConfig())
    out = Path(out)
    settings = {"seed": seed, "config": cfg.to_dict()}
    _check_out_dir(out, settings, overwrite)

    timer = _Timer()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    tokenizer = DemoTokenizer()
    reward_config = demo_reward_config()
    failures: dict[str, str] = {}

    with timer.phase("data"):
        data = _make_data(cfg, seed)

    # ---------------------------------------------------------------- M1 (SFT)
    with timer.phase("sft"):
        model = build_demo_model(seed, cfg.model)
        n_params = count_parameters(model)
        sft = SelfRewardingTrainer(
            model,
            stages=[
                SFTStage(
                    datasets=["ift", "eft"],
                    trainer={
                        "num_train_steps": cfg.sft_steps,
                        "batch_size": cfg.sft_batch_size,
                        "start_learning_rate": cfg.sft_learning_rate,
                        "end_learning_rate": cfg.sft_end_learning_rate,
                        "warmup_steps": cfg.sft_warmup_steps,
                        "group_by_length": cfg.group_by_length,
                    },
                )
            ],
            datasets={"ift": data.ift, "eft": data.eft},
            checkpoints_folder=out / "m1",
            **_trainer_common(cfg, seed, tokenizer),
        )
        m1_report = sft.run()
        m1_checkpoint = out / "m1" / m1_report["stages"][0]["checkpoint"]
        model = sft.model

    models: dict[str, dict[str, Any]] = {}
    with timer.phase("eval M1"):
        models["M1"] = _evaluate_model("M1", model, tokenizer, data, cfg, out)
        _, headroom = evaluate_headroom(
            model,
            tokenizer,
            data.headroom_prompts,
            out / "eval" / "M1" / "headroom.jsonl",
            num_samples=cfg.num_candidates,
            temperature=cfg.candidate_temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
        )
    _say(
        f"M1: {models['M1']['task']['pct_fully_correct']:.1f}% fully correct (greedy); "
        f"pass@1 {100 * headroom['pass_at_1']:.1f}%, pass@{cfg.num_candidates} "
        f"{100 * headroom['pass_at_n']:.1f}% at T={cfg.candidate_temperature}; judge pairwise "
        f"accuracy {models['M1']['judge']['pairwise_accuracy']:.3f}"
    )

    iterations: dict[str, list[dict[str, Any]]] = {}
    for arm in arms:
        with timer.phase(f"arm {arm}"):
            arm_model = _load(cfg, seed, m1_checkpoint)
            trainer = SelfRewardingTrainer(
                arm_model,
                stages=_preference_stages(cfg, arm),
                datasets={"eft": data.eft, **data.prompts},
                judges=_judges(arm, cfg, seed),
                oracle=task.score,
                reward_prompt_config=reward_config,
                checkpoints_folder=out / arm,
                **_trainer_common(cfg, seed, tokenizer),
            )
            try:
                arm_report = trainer.run()
            except (JudgeParseError, NotEnoughPairsError) as exc:
                failures[arm] = f"{type(exc).__name__}: {exc}"
                _say(f"arm {arm} stopped: {failures[arm]}")
                continue
        with timer.phase(f"eval {arm}"):
            iterations[arm] = []
            for t, stage in enumerate(arm_report["stages"], start=1):
                stage_dir = out / arm / stage["stage"]
                it = iteration_metrics(
                    read_jsonl(stage_dir / "candidates.jsonl"),
                    read_jsonl(stage_dir / "pairs.jsonl"),
                )
                it["stage"] = stage["stage"]
                it["pipeline_stats"] = stage.get("stats", {})
                it["dpo"] = stage.get("metrics", {})
                iterations[arm].append(it)
                name = f"{arm}/M{t + 1}"
                m = _load(cfg, seed, out / arm / stage["checkpoint"])
                models[name] = _evaluate_model(name, m, tokenizer, data, cfg, out)
                _say(
                    f"{name}: {models[name]['task']['pct_fully_correct']:.1f}% fully correct; "
                    f"judge pairwise accuracy {models[name]['judge']['pairwise_accuracy']:.3f}; "
                    f"pairs oracle-correct {it['pairs_oracle_correct']:.2f}"
                )

    timings = dict(timer.phases)
    timings["total"] = {
        "wall_s": time.perf_counter() - start_wall,
        "cpu_s": time.process_time() - start_cpu,
    }
    report = {
        "version": 1,
        "seed": seed,
        "quick": quick,
        "arms": arms,
        "config": cfg.to_dict(),
        "model_parameters": n_params,
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "timings": timings,
        "headroom": headroom,
        "models": models,
        "iterations": iterations,
        "failures": failures,
    }
    report["summary"] = report_mod.summarize(report)
    report_mod.write_report(out, report)
    return report


# ====================================================================== CLI


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
