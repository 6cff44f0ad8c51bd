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
4. **Arms** (:mod:`.arms`, one table entry each): for each arm a fresh model loaded with
   M1 and a SelfRewardingTrainer with one
   :class:`~self_rewarding_lm_pytorch.PreferenceStage` per ``DemoConfig.iterations`` entry
   (N candidates at T=1, best vs worst, DPO with an NLL term on the chosen response and EFT
   replay):

   * ``self``: the model judges its own candidates (section 2.3, ``judge_samples``
     judgements averaged) -- gives M2, M3, ...;
   * ``oracle``: the task's exact oracle judges (upper bound: ``external_reward_dpo``);
   * ``random``: a seeded random judge (lower bound).
5. **Evaluation** of M1 and every arm's M2 ... M_{T+1} on held-out data: greedy responses scored
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
    SelfRewardingTrainer,
    SFTStage,
    load_checkpoint,
)
from ..generation import (
    TorchBackend,
)
from ..pipeline import STAGE_TYPES, JudgeParseError, NotEnoughPairsError
from ..store import atomic_write_json, read_jsonl
from . import task
from .arms import ARM_TABLE, DEFAULT_ARMS, HEALTH_PROMPTS, check_arms
from .cli import main
from .config import DemoConfig, DemoSetupError, demo_reward_config, quick_config
from .evaluate import (
    evaluate_headroom,
    evaluate_judge,
    evaluate_meta_judge,
    evaluate_task,
    iteration_metrics,
)
from .model import build_demo_model, count_parameters
from .tokenizer import DemoTokenizer

__all__ = ["main", "run_demo"]  # main: the command line (demo/cli.py), `srlm demo` calls it here


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


# ====================================================================== the run


@dataclass
class _Data:
    ift: list[dict]
    eft: list[dict]
    prompts: dict[str, list[str]]
    eval_prompts: list[str]
    judge_eval: list[task.JudgeEvalExample]
    headroom_prompts: list[str]
    meta: list[dict]
    meta_eval: list[task.MetaExample]

    def judge_data(self) -> list[dict]:
        """The judge-skill SFT data: EFT, then the meta-judge examples (if any)."""
        return self.eft + self.meta


#: the fresh-prompt stream of the health arm's check prompts (far above any iteration's)
_HEALTH_STREAM = 1000


def _make_data(cfg: DemoConfig, seed: int) -> _Data:
    ift = task.ift_data(cfg.n_ift, seed, config=cfg.task_config, noise=cfg.ift_noise)
    eft = task.eft_data(cfg.n_eft, seed, config=cfg.task_config, letters=cfg.judge_letters)
    prompts = {
        f"prompts_{t}": task.fresh_prompts(cfg.prompt_pool, seed, t, config=cfg.task_config)
        for t in range(1, len(cfg.iterations) + 1)
    }
    # the health arm's check prompts: a stream of their own (no iteration uses it)
    prompts[HEALTH_PROMPTS] = task.fresh_prompts(
        cfg.n_health_prompts, seed, _HEALTH_STREAM, config=cfg.task_config
    )
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
        meta=[
            {"prompt": e.prompt, "response": e.response}
            for e in task.meta_eft_data(cfg.n_meta_eft, seed, config=cfg.task_config)
        ],
        meta_eval=task.meta_eval_set(cfg.n_meta_eval, seed, config=cfg.task_config),
    )


def _arm_stages(
    cfg: DemoConfig, arm: str, seed: int
) -> tuple[list[PreferenceStage], dict[str, Callable[[str, str], float]]]:
    """``arm``'s preference stages (the demo's common settings, then what its
    :data:`~.arms.ARM_TABLE` entry adds) and the Python judges they name."""
    stages, judges = [], {}
    for t, it in enumerate(cfg.iterations, start=1):
        common: dict[str, Any] = dict(
            prompts=f"prompts_{t}",
            num_preference_pairs=cfg.pairs_per_iteration,
            num_candidates=cfg.num_candidates,
            temperature=cfg.candidate_temperature,
            top_p=1.0,
            max_new_tokens=cfg.max_new_tokens,
            chunk_size=cfg.chunk_size,
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
                "length_buckets": cfg.length_buckets(),
            },
        )
        built = ARM_TABLE[arm].iteration(cfg, seed, t, it)
        stage = {**common, **built.stage}
        stages.append(STAGE_TYPES[stage["kind"]](**stage))
        judges.update(built.judges)
    return stages, judges


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
    _, meta_m = evaluate_meta_judge(backend, tokenizer, data.meta_eval, folder / "meta.jsonl")
    return {
        "task": task_m,
        "judge": judge_m,
        "meta_judge": meta_m,
        "files": str(folder.relative_to(out)),
    }


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    arms: Sequence[str] = DEFAULT_ARMS,
    config: DemoConfig | None = None,
    overwrite: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return the report (also written there)."""
    from . import report as report_mod

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    arms = check_arms(list(arms))
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
                        "length_buckets": cfg.length_buckets(),
                    },
                )
            ],
            datasets={"ift": data.ift, "eft": data.judge_data()},
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
        f"accuracy {models['M1']['judge']['pairwise_accuracy']:.3f}; meta-judge accuracy "
        f"{models['M1']['meta_judge']['accuracy']:.3f}"
    )

    iterations: dict[str, list[dict[str, Any]]] = {}
    for arm in arms:
        with timer.phase(f"arm {arm}"):
            arm_model = _load(cfg, seed, m1_checkpoint)
            stages, judges = _arm_stages(cfg, arm, seed)
            trainer = SelfRewardingTrainer(
                arm_model,
                stages=stages,
                datasets={"eft": data.judge_data(), **data.prompts},
                judges=judges,
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
        "arm_descriptions": {arm: ARM_TABLE[arm].description for arm in arms},
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
