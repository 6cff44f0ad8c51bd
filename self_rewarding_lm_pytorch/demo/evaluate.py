"""The demo's measurements: task accuracy of a model on held-out prompts (scored by the
oracle), the judge's agreement with the oracle, the meta-judge's accuracy, best-of-N
headroom, and the statistics of one iteration's candidates and pairs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import RewardConfig
from ..generation import GenerationBackend, GenerationConfig, as_backend, generate_text
from ..judge import LLMJudge
from ..metrics import reward_metrics, verdict_accuracy
from ..store import atomic_write_text, read_jsonl
from ..utils import make_generator
from . import task
from .config import demo_reward_config
from .tokenizer import DemoTokenizer

__all__ = [
    "evaluate_headroom",
    "evaluate_judge",
    "evaluate_meta_judge",
    "evaluate_task",
    "headroom_metrics",
    "iteration_metrics",
    "judge_metrics",
    "meta_judge_metrics",
]


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


def meta_judge_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """Meta-judge metrics of records with ``verdict_right_first`` (gold ``A``) and
    ``verdict_right_second`` (gold ``B``): ``accuracy`` over both orders, ``both_right``
    (right in both orders), ``position_consistency`` (the same judgement picked in both
    orders, right or wrong), ``parse_rate`` and ``accuracy`` per flipped criterion."""
    if not records:
        raise ValueError("no meta-judge records; evaluate at least one example")
    first = [r["verdict_right_first"] for r in records]
    second = [r["verdict_right_second"] for r in records]
    right = [(a == "A") + (b == "B") for a, b in zip(first, second)]
    per: dict[str, list[int]] = {}
    for r, k in zip(records, right):
        per.setdefault(r["flipped"], []).append(k)
    n = len(records)
    return {
        "n": n,
        "accuracy": sum(right) / (2 * n),
        "both_right": sum(k == 2 for k in right) / n,
        "position_consistency": sum(
            (a, b) in (("A", "B"), ("B", "A")) for a, b in zip(first, second)
        )
        / n,
        "parse_rate": sum(v is not None for v in first + second) / (2 * n),
        "per_flipped_criterion": {
            c: sum(ks) / (2 * len(ks)) for c, ks in sorted(per.items(), key=lambda x: x[0])
        },
    }


def evaluate_meta_judge(
    model: torch.nn.Module | GenerationBackend,
    tokenizer: DemoTokenizer,
    examples: Sequence[task.MetaExample],
    path: Path,
) -> tuple[list[dict], dict[str, Any]]:
    """The model as a greedy meta-judge of held-out examples, each asked in both orders
    (right judgement first, then second: position consistency).

    Records (task prompt and response, the two judgements, the flipped criterion, both
    verdicts and the raw texts) go to ``path`` and are reused if the file is complete.
    Returns them and :func:`meta_judge_metrics`.
    """
    records = _cached(path, len(examples))
    if records is None:
        prompts = [
            task.render_meta_prompt(e.task_prompt, e.task_response, *pair)
            for e in examples
            for pair in ((e.right, e.wrong), (e.wrong, e.right))
        ]
        config = GenerationConfig(max_new_tokens=2, temperature=0.0)
        texts = [rs[0] for rs in generate_text(as_backend(model), tokenizer, prompts, config)]
        records = [
            {
                "task_prompt": e.task_prompt,
                "task_response": e.task_response,
                "right": e.right,
                "wrong": e.wrong,
                "flipped": e.flipped,
                "text_right_first": texts[2 * i],
                "text_right_second": texts[2 * i + 1],
                "verdict_right_first": task.parse_meta_verdict(texts[2 * i]),
                "verdict_right_second": task.parse_meta_verdict(texts[2 * i + 1]),
            }
            for i, e in enumerate(examples)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _jsonl_text(records))
    return records, meta_judge_metrics(records)


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
