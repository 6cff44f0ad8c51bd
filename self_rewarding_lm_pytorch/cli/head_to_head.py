"""``srlm eval --head-to-head``: compare two models' outputs on the same prompts with a judge
(win rate, length-controlled win rate, ...; see :mod:`self_rewarding_lm_pytorch.head_to_head`)
and write the statistics, the per-item judgements, a report and alpaca_eval files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError

__all__ = ["add_head_to_head_args", "cmd_head_to_head", "match_prompts"]

#: the fields of alpaca_eval's outputs files, read when the usual fields are absent
ALPACA_PROMPT, ALPACA_OUTPUT = "instruction", "output"
_SHOWN = 3  # prompts named in a mismatch error


def add_head_to_head_args(p: argparse.ArgumentParser) -> None:
    """The ``srlm eval --head-to-head`` flags (the judge flags are ``srlm eval``'s own)."""
    g = p.add_argument_group(
        "head-to-head (--head-to-head: --out is then a folder, --input is not used)"
    )
    g.add_argument(
        "--head-to-head",
        action="store_true",
        help="compare the outputs in --a with those in --b using the judge: win rate, "
        "length-controlled win rate, ties, lengths",
    )
    g.add_argument(
        "--a", dest="h2h_a", metavar="PATH", default=None, help="outputs of model A (rated)"
    )
    g.add_argument(
        "--b",
        dest="h2h_b",
        metavar="PATH",
        default=None,
        help="outputs of model B (the reference; may be alpaca_eval's JSON)",
    )
    g.add_argument("--name-a", default=None, help="model A's name (default: from the file)")
    g.add_argument("--name-b", default=None, help="model B's name (default: from the file)")
    g.add_argument(
        "--response-index",
        type=int,
        default=0,
        help="which response of a --responses-field list (srlm generate output) to compare",
    )
    g.add_argument(
        "--pairwise",
        action="store_true",
        help="judge each pair with a pairwise LLM judge on --model (both orders)",
    )
    g.add_argument(
        "--pairwise-template-file", default=None, help="Jinja2 pairwise judge prompt template"
    )
    g.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        help="paired bootstrap resamples for confidence intervals (0: off; seeded by --seed)",
    )
    g.add_argument(
        "--length-tokenizer",
        metavar="PATH",
        default=None,
        help="tokenizer folder: also report token lengths",
    )


def _text(value: Any, flag: str, path: str, i: int, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{flag} {path} row {i}: the {what} must be text, got {type(value).__name__}"
        )
    return value


def _read_outputs(path: str, flag: str, args: argparse.Namespace) -> tuple[list, list, str]:
    """The prompts and responses of an outputs file, and the model's name in it (its rows'
    ``generator``, else the file's stem)."""
    from ..io import read_rows
    from .inputs import _check_input

    _check_input(path, args.format, flag)
    rows = read_rows(path, format=args.format, split=args.split)
    prompts, responses = [], []
    k = args.response_index
    for i, row in enumerate(rows):
        key = args.prompt_field if args.prompt_field in row else ALPACA_PROMPT
        if key not in row:
            raise ValueError(
                f"{flag} {path} row {i} has no {args.prompt_field!r} (or alpaca_eval "
                f"{ALPACA_PROMPT!r}) field (fields: {', '.join(map(str, row))}); set --prompt-field"
            )
        prompts.append(_text(row[key], flag, path, i, "prompt"))
        if args.response_field in row:
            response = row[args.response_field]
        elif args.responses_field in row:
            many = row[args.responses_field]
            if not isinstance(many, list) or not -len(many) <= k < len(many):
                size = f"{len(many)} responses" if isinstance(many, list) else "no list"
                raise ValueError(
                    f"{flag} {path} row {i}: {args.responses_field!r} holds {size}, so it has "
                    f"no response {k}; set --response-index (or --responses-field)"
                )
            response = many[k]
        elif ALPACA_OUTPUT in row:
            response = row[ALPACA_OUTPUT]
        else:
            raise ValueError(
                f"{flag} {path} row {i} has none of {args.response_field!r}, "
                f"{args.responses_field!r} or {ALPACA_OUTPUT!r} (fields: "
                f"{', '.join(map(str, row))}); set --response-field or --responses-field"
            )
        responses.append(_text(response, flag, path, i, "response"))
    names = {row.get("generator") for row in rows}
    name = names.pop() if len(names) == 1 and isinstance(next(iter(names)), str) else None
    return prompts, responses, name or Path(path).stem


def _keys(prompts: list[str]) -> list[tuple[str, int]]:
    """``(prompt, how many times it came before)``: a repeated prompt matched by occurrence."""
    seen: dict[str, int] = {}
    out = []
    for q in prompts:
        seen[q] = seen.get(q, -1) + 1
        out.append((q, seen[q]))
    return out


def match_prompts(prompts_a: list[str], prompts_b: list[str], *, subset: bool = False) -> list[int]:
    """For each of A's prompts, the index of the same prompt in B (the n-th repeat of a
    prompt matches its n-th repeat). Refuses prompts of one side missing from the other
    (with ``subset``, B may hold more)."""
    where = {key: j for j, key in enumerate(_keys(prompts_b))}
    keys_a = _keys(prompts_a)
    missing_b = [key for key in keys_a if key not in where]
    missing_a = [] if subset else sorted(set(where) - set(keys_a), key=where.__getitem__)
    if missing_b or missing_a:
        parts = []
        for miss, side, other in ((missing_b, "--a", "--b"), (missing_a, "--b", "--a")):
            if miss:
                shown = ", ".join(
                    repr(q[:60]) + (f" (occurrence {k + 1})" if k else "") for q, k in miss[:_SHOWN]
                )
                more = f" and {len(miss) - _SHOWN} more" if len(miss) > _SHOWN else ""
                many = len(miss) > 1
                count = (
                    f"{len(miss)} prompt{'s' if many else ''} of {side} {'are' if many else 'is'}"
                )
                parts.append(f"{count} not in {other} ({shown}{more})")
        raise ValueError(
            f"head-to-head: --a and --b must hold the same prompts, but {'; '.join(parts)}. "
            "Prompts are matched by their exact text (a repeated prompt by occurrence); "
            "give both models' outputs on the same prompts"
        )
    return [where[key] for key in keys_a]


def _check_flags(args: argparse.Namespace) -> None:
    if not args.head_to_head:
        raise ConfigError("--a / --b give the outputs to compare; add --head-to-head")
    if args.h2h_a is None or args.h2h_b is None:
        raise ConfigError("--head-to-head needs --a A.jsonl and --b B.jsonl (both outputs)")
    for dest in ("input", "pred_field", "scored_out"):
        if getattr(args, dest) is not None:
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} does not apply to --head-to-head; give --a and --b")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0 (resamples; 0: off), got {args.bootstrap}")
    if not args.pairwise:
        if args.pairwise_template_file is not None:
            raise ConfigError("--pairwise-template-file applies with --pairwise only; add it")
        return
    if args.model is None or args.reward_model is not None or args.function is not None:
        raise ConfigError(
            "--pairwise judges with a language model: give --model PATH (and no "
            "--reward-model / --function)"
        )
    if args.prompt_template_file or args.regex_template or args.score_range:
        raise ConfigError(
            "--prompt-template-file / --regex-template / --score-range set a scoring judge's "
            "prompt; for --pairwise give --pairwise-template-file"
        )


def _pairwise_template(path: str | None) -> Any:
    from ..io import read_text
    from ..judge import DEFAULT_PAIRWISE_TEMPLATE, PairwiseTemplate

    if path is None:
        return DEFAULT_PAIRWISE_TEMPLATE
    if not Path(path).is_file():
        raise ConfigError(f"--pairwise-template-file: {path} does not exist; fix the path")
    try:
        return PairwiseTemplate(read_text(path))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--pairwise-template-file {path}: {exc}") from exc


def _out_dir(args: argparse.Namespace) -> Path | None:
    if args.out is None:
        return None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; with --head-to-head --out is a folder")
    if (out / "head_to_head.json").exists() and not args.overwrite:
        raise ConfigError(
            f"--out {out} already holds a head-to-head result; use another --out or add "
            "--overwrite to replace it"
        )
    return out


def _judged_by(args: argparse.Namespace) -> str:
    if args.function is not None:
        return f"function {args.function}"
    kind = "pairwise LLM" if args.pairwise else "LLM" if args.model else "reward model"
    return f"{kind} {args.model or args.reward_model}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _interval(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"{100 * ci[0]:.1f}% to {100 * ci[1]:.1f}%"


def report_markdown(stats: dict[str, Any]) -> str:
    """A small Markdown table of a head-to-head result (``HeadToHead.to_dict()``)."""
    s = stats
    se = "" if s["standard_error"] is None else f" (SE {_pct(s['standard_error'])})"
    rows = [
        (f"win rate of {s['name_a']}", _pct(s["win_rate"]) + se),
        ("95% CI (normal)", _interval(s["ci95"])),
        ("length-controlled win rate", _pct(s["lc_win_rate"])),
        ("wins / losses / ties", f"{s['wins']} / {s['losses']} / {s['ties']}"),
        ("tie rate", _pct(s["tie_rate"])),
        ("judged / prompts", f"{s['judged']} / {s['items_total']}"),
    ]
    if s["bootstrap"]:
        n = s["bootstrap"]
        rows.append((f"95% CI (bootstrap, {n} resamples)", _interval(s["bootstrap_ci95"])))
        rows.append(("LC win rate 95% CI (bootstrap)", _interval(s["lc_bootstrap_ci95"])))
    if s["judge"] == "pairwise":
        rows.append(("position consistency", _pct(s["position_consistency"])))
    for unit in ("chars", "tokens"):
        a, b = s[f"mean_{unit}_a"], s[f"mean_{unit}_b"]
        if a is not None:
            rows.append((f"mean length ({unit}), A / B", f"{a:.1f} / {b:.1f}"))
    lines = [
        f"# Head-to-head: {s['name_a']} (A) vs {s['name_b']} (B)",
        "",
        f"Judge: {s['judged_by']} ({s['judge']}).",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]
    return "\n".join(lines) + "\n"


def _write(out: Path, result: Any, stats: dict[str, Any], prompts: list, a: list, b: list) -> None:
    from ..head_to_head import alpaca_eval_rows
    from ..store import atomic_write_text

    def dump(obj: Any) -> str:
        return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"

    (out / "alpaca_eval").mkdir(parents=True, exist_ok=True)
    rows = "".join(
        json.dumps({"id": i, **item}, ensure_ascii=False) + "\n"
        for i, item in enumerate(result.items)
    )
    atomic_write_text(out / "judgements.jsonl", rows)
    atomic_write_text(out / "report.md", report_markdown(stats))
    for name, side, generator in (("model", a, stats["name_a"]), ("reference", b, stats["name_b"])):
        text = dump(alpaca_eval_rows(prompts, side, generator))
        atomic_write_text(out / "alpaca_eval" / f"{name}_outputs.json", text)
    atomic_write_text(out / "head_to_head.json", dump(stats))  # last: marks a finished result


def cmd_head_to_head(args: argparse.Namespace) -> int:
    """``srlm eval --head-to-head``: every input is checked before the judge is built."""
    from ..head_to_head import head_to_head
    from .judge import _judge_maker, _judge_spec_from_args

    _check_flags(args)
    template = _pairwise_template(args.pairwise_template_file) if args.pairwise else None
    spec = _judge_spec_from_args(args)
    out = _out_dir(args)
    prompts, a, name_a = _read_outputs(args.h2h_a, "--a", args)
    prompts_b, b, name_b = _read_outputs(args.h2h_b, "--b", args)
    if args.limit is not None:
        prompts, a = prompts[: args.limit], a[: args.limit]
    order = match_prompts(prompts, prompts_b, subset=args.limit is not None)
    b = [b[j] for j in order]
    tokenizer = None
    if args.length_tokenizer is not None:
        from ..hf import load_tokenizer

        tokenizer = load_tokenizer(args.length_tokenizer)
    judge = _judge_maker(spec, args)()
    if template is not None:
        from ..judge import PairwiseJudge

        judge = PairwiseJudge(judge.lm, judge.tokenizer, template, config=judge.settings)
    result = head_to_head(
        prompts,
        a,
        b,
        judge,
        tokenizer=tokenizer,
        generator=args.seed,
        bootstrap=args.bootstrap,
        bootstrap_seed=args.seed,
        name_a=args.name_a or name_a,
        name_b=args.name_b or name_b,
    )
    stats = {
        **result.to_dict(),
        "a": str(Path(args.h2h_a).resolve()),
        "b": str(Path(args.h2h_b).resolve()),
        "judged_by": _judged_by(args),
    }
    if out is not None:
        _write(out, result, stats, prompts, a, b)
    print(json.dumps(stats, indent=2))
    return 0
