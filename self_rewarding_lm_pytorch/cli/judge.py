"""``srlm judge`` (score rows with a judge, to a resumable JSONL) and ``srlm eval`` (judge
agreement with labelled scores)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from ..config import ConfigError, JudgeSpec, RewardConfigSpec, resolve_object
from ..judge import JudgeConfig
from .build import build_judge
from .flags import dataclass_from_args
from .inputs import _abspath, _check_input, _device, _file_hash, _fingerprint, _row_keys
from .outputs import KeyedJsonlStore


def _judge_spec_from_args(args: argparse.Namespace) -> JudgeSpec:
    from .generate import backend_from_args

    generation = backend_from_args(args)
    chosen = [a for a in ("model", "reward_model", "function") if getattr(args, a) is not None]
    if not chosen and generation.backend == "openai":
        chosen = ["model"]  # an LLM judge on a server: --model (a tokenizer) is optional
    if len(chosen) != 1:
        raise ConfigError(
            "choose exactly one judge: --model PATH (LLM as a judge), --reward-model PATH or "
            "--function module:name"
        )
    kind = {"model": "llm", "reward_model": "reward_model", "function": "python"}[chosen[0]]
    kw: dict[str, Any] = {"kind": kind}
    if kind == "python":
        kw["function"] = args.function
    else:
        kw.update(path=args.model or args.reward_model, tokenizer=args.tokenizer, dtype=args.dtype)
        if args.batch_size is not None:
            kw["batch_size"] = args.batch_size
    if kind == "llm":
        rc = None
        if args.prompt_template_file or args.regex_template or args.score_range:
            rc = RewardConfigSpec(
                prompt_template_file=args.prompt_template_file,
                reward_regex_template=args.regex_template,
                score_range=list(args.score_range) if args.score_range else None,
            )
        kw.update(reward_config=rc, **dataclasses.asdict(dataclass_from_args(JudgeConfig, args)))
        if generation.backend != "torch":
            kw["generation"] = generation
    elif generation.backend != "torch":
        raise ConfigError(
            f"--backend {generation.backend} serves an LLM judge (--model); a "
            f"{kind.replace('_', ' ')} judge runs in this process: drop --backend"
        )
    elif kind == "reward_model":
        if args.template is not None:
            kw["template"] = args.template
        kw["head"] = args.head
    try:
        return JudgeSpec(**kw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _judge_settings(spec: JudgeSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Everything that shapes the scores ``srlm judge`` writes for a row."""
    settings: dict[str, Any] = {
        "input": _abspath(args.input),
        "prompt_field": args.prompt_field,
        "response_field": args.response_field,
        "responses_field": args.responses_field,
        "judge": spec.kind,
        "seed": args.seed,
    }
    if spec.kind == "python":
        assert spec.function is not None
        resolve_object(spec.function)  # an import error names the fix
        source = getattr(sys.modules[spec.function.partition(":")[0]], "__file__", None)
        settings["function"] = spec.function
        settings["function_file"] = _file_hash(source, "--function") if source else None
        return settings
    flag = "--model" if spec.kind == "llm" else "--reward-model"
    settings.update(
        model=_abspath(spec.path),
        model_files=_fingerprint(spec.path, flag) if spec.path else None,
        tokenizer=_abspath(spec.tokenizer),
        tokenizer_files=_fingerprint(spec.tokenizer, "--tokenizer") if spec.tokenizer else None,
        dtype=spec.dtype,
    )
    if spec.kind == "llm":
        rc = spec.reward_config
        if spec.generation is not None:
            from ..generation.selection import backend_fingerprint

            settings["generation"] = backend_fingerprint(spec.generation)
        settings.update(
            prompt_template_file=(
                _file_hash(rc.prompt_template_file, "--prompt-template-file") if rc else None
            ),
            regex_template=rc.reward_regex_template if rc else None,
            score_range=rc.score_range if rc else None,
            **_sampling_settings(spec),
        )
    else:
        settings.update(template=spec.template, head=spec.head)
    return settings


#: JudgeConfig fields that batch the work but do not change a score
_BATCHING = ("batch_size", "token_budget")


def _sampling_settings(spec: JudgeSpec) -> dict[str, Any]:
    """The LLM judge's sampling settings that shape its scores (``JudgeConfig``'s fields)."""
    sampling = dataclasses.asdict(spec.judge_config())
    for key in _BATCHING:
        del sampling[key]
    sampling["samples"] = sampling.pop("num_samples")  # the key outputs were written with
    return sampling


def _responses(row: dict, args: argparse.Namespace, i: int) -> tuple[bool, list[str]]:
    """Whether ``row`` holds a list of responses, and its responses; checks the fields."""
    if args.prompt_field not in row:
        raise ValueError(
            f"row {i} has no {args.prompt_field!r} field (fields: {', '.join(map(str, row))}); "
            "set --prompt-field"
        )
    if args.responses_field not in row and args.response_field not in row:
        raise ValueError(
            f"row {i} has neither {args.response_field!r} nor {args.responses_field!r}; "
            "set --response-field or --responses-field"
        )
    if not isinstance(row[args.prompt_field], str):
        raise TypeError(
            f"row {i}: the prompt must be text, got {type(row[args.prompt_field]).__name__}; "
            "check --prompt-field"
        )
    resp = row.get(args.responses_field, row.get(args.response_field))
    many = isinstance(resp, list)
    for r in resp if many else [resp]:
        if not isinstance(r, str):
            raise TypeError(
                f"row {i}: responses must be text, got {type(r).__name__}; "
                "check --response-field / --responses-field"
            )
    return many, list(resp) if many else [resp]


def _score_rows(
    rows: list[dict],
    make_judge: Any,
    args: argparse.Namespace,
    out: str | None,
    *,
    spec: JudgeSpec,
    flag: str = "--out",
) -> tuple[list[dict], int]:
    """Score every row (``response`` or a ``responses`` list) in fixed chunks of the input
    (each seeded by its first position). With ``out``, scored rows are appended to that
    JSONL as they are made, and a rerun reuses the rows made with the same settings from
    the same input rows (see :class:`KeyedJsonlStore`). ``make_judge()`` builds the judge,
    only when some row needs scoring. Returns the rows and how many were scored now."""
    checked = [_responses(row, args, i) for i, row in enumerate(rows)]  # all, before any work
    ids = [str(row.get("id", i)) for i, row in enumerate(rows)]
    settings = _judge_settings(spec, args)
    keys = _row_keys(settings, rows)
    store = None
    if out is not None:
        store = KeyedJsonlStore(
            out,
            name="judge",
            settings=settings,
            keys=keys,
            flag=flag,
            input_path=args.input,
            overwrite=args.overwrite,
        )
    done: dict[str, dict] = store.rows if store is not None else {}
    todo = [k for k in keys if k not in done]
    made: dict[str, dict] = {}
    judge = make_judge() if todo else None
    try:
        _score_chunks(rows, checked, keys, done, made, judge, store, args)
    finally:
        _close(judge)
    if store is not None:
        return store.finish(keys, ids), len(todo)
    return [made[k] for k in keys], len(todo)


def _score_chunks(
    rows: list[dict],
    checked: list[tuple[bool, list[str]]],
    keys: list[str],
    done: dict[str, dict],
    made: dict[str, dict],
    judge: Any,
    store: Any,
    args: argparse.Namespace,
) -> None:
    from ..utils import make_generator

    ids = [str(row.get("id", i)) for i, row in enumerate(rows)]
    for start in range(0, len(rows), args.chunk_size):
        idx = list(range(start, min(start + args.chunk_size, len(rows))))
        if all(keys[i] in done for i in idx):
            continue
        prompts, responses, owners = [], [], []
        for i in idx:
            for r in checked[i][1]:
                prompts.append(rows[i][args.prompt_field])
                responses.append(r)
                owners.append(i)
        gen = make_generator(args.seed + start)  # on the CPU, whatever the judge's device
        scored = judge.score(prompts, responses, generator=gen)
        new = []
        for i in idx:
            if keys[i] in done:
                continue
            mine = [sc for sc, o in zip(scored, owners) if o == i]
            row = {**rows[i], "id": ids[i]}
            if checked[i][0]:
                row["scores"] = [sc.score for sc in mine]
                row["judgements"] = [sc.to_dict() for sc in mine]
            else:
                row["score"] = mine[0].score
                row["judgement"] = mine[0].to_dict()
            new.append(store.keyed(row, keys[i]) if store is not None else row)
            made[keys[i]] = new[-1]
        if store is not None:
            store.extend(new)


def _read_input(args: argparse.Namespace) -> list[dict]:
    from ..io import read_rows

    _check_input(args.input, args.format, "--input")
    return read_rows(args.input, format=args.format, split=args.split, limit=args.limit)


def _judge_maker(spec: JudgeSpec, args: argparse.Namespace) -> Any:
    return lambda: build_judge(spec, device=_device(args.device) if spec.kind != "python" else None)


def _close(judge: Any) -> None:
    from .build import close_judges

    if judge is not None:
        close_judges({"judge": judge})


def cmd_judge(args: argparse.Namespace) -> int:
    spec = _judge_spec_from_args(args)
    rows = _read_input(args)
    scored, judged = _score_rows(rows, _judge_maker(spec, args), args, args.out, spec=spec)
    flat = [s for r in scored for s in (r["scores"] if "scores" in r else [r["score"]])]
    parsed = sum(s is not None for s in flat)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "rows": len(scored),
                "scores": len(flat),
                "parsed": parsed,
                "judged": judged,
                "reused": len(scored) - judged,
            }
        )
    )
    return 0


def _as_float(value: Any, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {value!r} is not a number") from exc


def cmd_eval(args: argparse.Namespace) -> int:
    from ..metrics import reward_metrics

    if args.head_to_head or args.h2h_a is not None or args.h2h_b is not None:
        from .head_to_head import cmd_head_to_head

        return cmd_head_to_head(args)
    if args.input is None:
        raise ConfigError("--input is required (or compare two outputs: --head-to-head)")
    rows = _read_input(args)
    if args.pred_field is None:
        spec = _judge_spec_from_args(args)
        maker = _judge_maker(spec, args)
        rows, _ = _score_rows(rows, maker, args, args.scored_out, spec=spec, flag="--scored-out")
        pred_field, preds_field = "score", "scores"
    else:
        if any(getattr(args, a) is not None for a in ("model", "reward_model", "function")):
            raise ConfigError(
                "give either --pred-field (scores already in the file) or a judge, not both"
            )
        pred_field = preds_field = args.pred_field
    pred: list[float | None] = []
    gold: list[float] = []
    groups: list[Any] = []
    for i, row in enumerate(rows):
        if args.gold_field not in row:
            raise ValueError(
                f"row {i} has no gold score field {args.gold_field!r} (fields: "
                f"{', '.join(map(str, row))}); set --gold-field"
            )
        g = row[args.gold_field]
        p = row.get(preds_field) if isinstance(g, list) else row.get(pred_field)
        if isinstance(g, list):  # one row per prompt, a list of candidates
            if not isinstance(p, list) or len(p) != len(g):
                raise ValueError(
                    f"row {i}: {args.gold_field!r} is a list of {len(g)} but the predictions "
                    f"are {p!r}; give one prediction per gold score"
                )
            for k, (pp, gg) in enumerate(zip(p, g)):
                pred.append(_as_float(pp, f"row {i} prediction {k}"))
                gold.append(_gold(gg, i))
                groups.append(i)
        else:
            pred.append(_as_float(p, f"row {i} prediction"))
            gold.append(_gold(g, i))
            groups.append(row.get(args.group_field, i) if args.group_field else 0)
    metrics = reward_metrics(pred, gold, groups=groups)
    metrics = {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
    }
    text = json.dumps(metrics, indent=2)
    if args.out is not None:
        from ..store import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def _gold(value: Any, i: int) -> float:
    g = _as_float(value, f"row {i} gold score")
    if g is None:
        raise ValueError(f"row {i}: the gold score is empty; every row needs a gold score")
    return g
