"""Judge health: before a preference stage judges its candidates, the judge it is about
to use is measured (pairwise accuracy against an oracle on the policy's own candidates,
or against human ranks), and an unhealthy judge stops the run or is replaced by the
judge of the last healthy stage. Each measurement is written to ``judge_health.json``
and read back on resume."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError
from ..generation import GenerationConfig, generate_text
from ..metrics import pairwise_accuracy
from ..store import atomic_write_json
from ..utils import make_generator

__all__ = [
    "HEALTH_FILE",
    "JudgeHealthConfig",
    "JudgeHealthError",
    "check_health",
    "earlier_measurements",
    "check_oracle",
    "judge_to_measure",
    "measure",
    "stage_health",
]

HEALTH_FILE = "judge_health.json"


class JudgeHealthError(RuntimeError):
    """The judge a stage was about to use measured unhealthy (``judge_health.action: stop``)."""


@dataclass
class JudgeHealthConfig:
    """How a preference stage measures its judge before judging, and what an unhealthy
    judge does (``null`` thresholds are off; at least one must be set)."""

    prompts: str | None = field(
        default=None,
        metadata={"help": "prompt dataset: the policy's candidates scored against the oracle"},
    )
    rows: str | None = field(
        default=None,
        metadata={"help": "dataset of {prompt, responses, human_ranks}: accuracy vs the ranks"},
    )
    min_accuracy: float | None = field(
        default=None, metadata={"help": "unhealthy below this pairwise accuracy"}
    )
    max_drop: float | None = field(
        default=None, metadata={"help": "unhealthy this far below the best earlier accuracy"}
    )
    action: Literal["stop", "freeze"] = field(
        default="stop",
        metadata={"help": "stop the run, or judge with the last healthy stage's model"},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if (self.prompts is None) == (self.rows is None):
            raise ConfigError(
                "judge_health: give exactly one of prompts (a prompt dataset, scored against "
                "the run's oracle) or rows (a dataset of {prompt, responses, human_ranks}), "
                f"got prompts={self.prompts!r}, rows={self.rows!r}"
            )
        if self.min_accuracy is None and self.max_drop is None:
            raise ConfigError(
                "judge_health: set min_accuracy and/or max_drop (both are null, so no judge "
                "is ever unhealthy); e.g. min_accuracy: 0.6, or remove judge_health"
            )
        for key in ("min_accuracy", "max_drop"):
            value = getattr(self, key)
            ok = value is None or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
            )
            if not ok:
                raise ConfigError(
                    f"judge_health.{key} must be a number in [0, 1] (a pairwise accuracy) or "
                    f"null, got {value!r}; use e.g. 0.6 (min_accuracy) or 0.05 (max_drop)"
                )
        if self.action not in ("stop", "freeze"):
            raise ConfigError(
                f"judge_health.action must be 'stop' or 'freeze', got {self.action!r}"
            )


def _count_pairs(gold: Sequence[float], groups: Sequence[Any]) -> int:
    """Pairs inside one group whose gold scores differ (every pair of a group, less those
    of equal gold)."""
    by_group: dict[Any, Counter] = defaultdict(Counter)
    for g, y in zip(groups, gold):
        by_group[g][y] += 1
    return sum(
        math.comb(sum(c.values()), 2) - sum(math.comb(k, 2) for k in c.values())
        for c in by_group.values()
    )


def _last_frozen(earlier: list[dict]) -> dict | None:
    """The latest earlier measurement made under a ``freeze`` decision, if any."""
    return next((e for e in reversed(earlier) if e.get("frozen")), None)


def measure(
    config: JudgeHealthConfig,
    *,
    judge: Any,
    backend: Any,
    tokenizer: Any,
    gen_config: GenerationConfig,
    data: list,
    oracle: Callable[[str, str], float] | None,
    seed: int,
    device: Any,
    budgets: Callable[[list[str]], list[int]] | None = None,
) -> dict[str, Any]:
    """The judge's pairwise accuracy: on ``data`` prompts (``backend``'s candidates, seeded
    by ``seed``, against ``oracle``; ``budgets(prompts)``: each one's limit on new tokens)
    or on ``data`` rows (against their human ranks)."""
    generator = make_generator(seed, device)
    if config.prompts is not None:
        responses = generate_text(
            backend,
            tokenizer,
            data,
            gen_config,
            generator=generator,
            max_new_tokens_per_prompt=budgets(data) if budgets is not None else None,
        )
        items = [(p, r, g) for g, (p, rs) in enumerate(zip(data, responses)) for r in rs]
        gold = [float(oracle(p, r)) for p, r, _ in items]  # type: ignore[misc]
    else:
        items = [(row["prompt"], r, g) for g, row in enumerate(data) for r in row["responses"]]
        gold = [-float(rank) for row in data for rank in row["human_ranks"]]
    results = judge.score([p for p, _, _ in items], [r for _, r, _ in items], generator=generator)
    groups = [g for _, _, g in items]
    accuracy = pairwise_accuracy([r.score for r in results], gold, groups=groups)
    return {
        "accuracy": None if math.isnan(accuracy) else accuracy,
        "pairs": _count_pairs(gold, groups),
    }


def earlier_measurements(stage_dirs: Sequence[Path]) -> list[dict]:
    """The ``judge_health.json`` of the given (earlier) stage folders that have one."""
    return [
        json.loads((d / HEALTH_FILE).read_text()) for d in stage_dirs if (d / HEALTH_FILE).exists()
    ]


def check_health(
    name: str,
    config: JudgeHealthConfig,
    stage_dir: Path,
    earlier: list[dict],
    judge_model: str,
    run_measurement: Callable[[], dict[str, Any]],
    *,
    main: bool = True,
) -> dict[str, Any]:
    """Measure (or read back) the judge of stage ``name`` that samples with ``judge_model``
    and decide: the returned record's ``judge_model`` is the model that judges the stage.

    A measurement in ``stage_dir`` taken with the same settings and judge model is read
    back, not redone. Raises :class:`JudgeHealthError` (``action: stop``, or ``freeze``
    with no healthy earlier stage) before any candidate is judged.
    """
    path = stage_dir / HEALTH_FILE
    settings = dataclasses.asdict(config)
    old = json.loads(path.read_text()) if path.exists() else None
    if old and old.get("settings") == settings and old.get("measured_model") == judge_model:
        measured = {"accuracy": old["accuracy"], "pairs": old["pairs"]}
    else:
        measured = run_measurement()
    accuracy = measured["accuracy"]
    scored = [e for e in earlier if e.get("accuracy") is not None]
    best = max(scored, key=lambda e: e["accuracy"], default=None)
    why = None
    if accuracy is None:
        why = "no pair of its data has different gold scores, so accuracy is undefined"
    elif config.min_accuracy is not None and accuracy < config.min_accuracy:
        why = f"accuracy {accuracy:.3f} is below min_accuracy={config.min_accuracy}"
    elif config.max_drop is not None and best is not None:
        if accuracy < best["accuracy"] - config.max_drop:
            why = (
                f"accuracy {accuracy:.3f} is more than max_drop={config.max_drop} below the "
                f"best earlier accuracy {best['accuracy']:.3f} (stage {best['stage']})"
            )
    frozen = _last_frozen(earlier)
    record = {
        "stage": name,
        "settings": settings,
        "measured_model": judge_model,
        "accuracy": accuracy,
        "pairs": measured["pairs"],
        "healthy": why is None,
        "decision": "ok" if why is None else config.action,
        "reason": why,
        "judge_model": judge_model,
        "frozen": bool(frozen),
    }
    if frozen and why is None:
        record["reason"] = (
            f"judged with {judge_model!r}, frozen by stage {frozen['stage']} (judge_health "
            "action: freeze); measured healthy"
        )
    if why is not None and config.action == "freeze":
        healthy = [e for e in earlier if e.get("healthy")]
        if healthy:
            record["judge_model"] = healthy[-1]["judge_model"]
            record["frozen"] = True
            record["reason"] = (
                f"{why}; judged with {record['judge_model']!r}, the model that judged stage "
                f"{healthy[-1]['stage']} (the last healthy one)"
            )
    if main:
        atomic_write_json(path, record)
    if why is not None and (config.action == "stop" or not record["frozen"]):
        fix = (
            "no earlier stage measured healthy, so there is no judge to freeze to; "
            if config.action == "freeze"
            else ""
        )
        raise JudgeHealthError(
            f"stage {name}: the judge (model {judge_model!r}) is unhealthy before judging: "
            f"{why}, over {measured['pairs']} pairs. {fix}Nothing was judged. Fixes: judge "
            "with a frozen earlier model (judge_model: initial or a stage name), anchor the "
            "rejected responses (rejected_from: initial), use judge_health.action: freeze, "
            "or relax judge_health.min_accuracy / max_drop, then rerun in the same run "
            "folder (this stage judged nothing, so its settings may change)"
        )
    return record


def judge_to_measure(earlier: list[dict], own: str) -> str:
    """The model the next stage with health settings judges with: the one an earlier
    ``freeze`` decision set, else the stage's own (``own``)."""
    frozen = _last_frozen(earlier)
    return frozen["judge_model"] if frozen else own


def check_oracle(stages: Sequence[Any], names: Sequence[str], oracle: Any) -> None:
    """``judge_health.prompts`` scores the policy's candidates with the run's oracle: refuse
    it before any work when none is given."""
    for stage, name in zip(stages, names):
        health = getattr(stage, "judge_health", None)
        if health is not None and health.prompts is not None and oracle is None:
            raise ConfigError(
                f"stage {name}, judge_health.prompts: measuring the judge on the policy's "
                "candidates needs the run's oracle (oracle=..., a function (prompt, response) "
                "-> score), and none was given; give one, or measure against human ranks "
                "with judge_health.rows (a dataset of {prompt, responses, human_ranks})"
            )


def stage_health(
    name: str,
    config: JudgeHealthConfig,
    stage_dir: Path,
    earlier_dirs: Sequence[Path],
    own: str,
    *,
    judge_for: Callable[[str], Any],
    data: Callable[[], list],
    main: bool = True,
    **measure_kwargs: Any,
) -> dict[str, Any]:
    """:func:`check_health` for stage ``name``, whose own judge samples with ``own`` (an
    earlier ``freeze`` overrides it); ``judge_for(model)`` builds the judge, ``data()``
    reads the measurement's prompts or rows, ``measure_kwargs`` go to :func:`measure`."""
    earlier = earlier_measurements(earlier_dirs)
    model = judge_to_measure(earlier, own)

    def run() -> dict[str, Any]:
        return measure(config, judge=judge_for(model), data=data(), **measure_kwargs)

    return check_health(name, config, stage_dir, earlier, model, run, main=main)
