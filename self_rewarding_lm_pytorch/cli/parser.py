"""The ``srlm`` argument parser: one subcommand per command, sampling and judge flags
generated from their config dataclasses."""

from __future__ import annotations

import argparse

from .build import cmd_run
from .generate import cmd_generate
from .judge import cmd_eval, cmd_judge


def _add_input_args(p: argparse.ArgumentParser, *, response: bool) -> None:
    g = p.add_argument_group("input data")
    g.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "json", "csv", "tsv", "parquet", "datasets"],
        help="input format (default: from the suffix; a folder is a datasets folder)",
    )
    g.add_argument("--split", default=None, help="split of a datasets DatasetDict folder")
    g.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    g.add_argument("--prompt-field", default="prompt", help="column with the prompt text")
    if response:
        g.add_argument("--response-field", default="response", help="column with one response")
        g.add_argument(
            "--responses-field",
            default="responses",
            help="column with a list of responses (the output of srlm generate)",
        )
    else:
        g.add_argument("--messages-field", default=None, help="column with chat messages")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (choose one)")
    g.add_argument("--model", default=None, help="local causal LM folder used as an LLM judge")
    g.add_argument(
        "--reward-model", default=None, help="local sequence-classification reward model"
    )
    g.add_argument(
        "--function",
        default=None,
        help="importable 'module:name' callable (prompt, response) -> score (trusted code only)",
    )
    o = p.add_argument_group("judge options")
    _add_model_args(o)  # type: ignore[arg-type]
    o.add_argument("--prompt-template-file", default=None, help="Jinja2 judge prompt template")
    o.add_argument(
        "--regex-template", default=None, help="score pattern, e.g. 'Score: {{ reward }}'"
    )
    o.add_argument("--score-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None)
    o.add_argument("--samples", type=int, default=3, help="judgements per response (paper: 3)")
    o.add_argument("--mode", default="mean", choices=["mean", "expected"])
    o.add_argument("--temperature", type=float, default=0.7)
    o.add_argument("--top-p", type=float, default=0.9)
    o.add_argument("--max-new-tokens", type=int, default=256)
    o.add_argument("--batch-size", type=int, default=None)
    o.add_argument(
        "--on-too-long", default="error", choices=["error", "truncate_response", "truncate_left"]
    )
    o.add_argument("--template", default=None, help="reward-model input template (Jinja2)")
    o.add_argument("--head", default="scalar", choices=["scalar", "classes"])
    o.add_argument("--chunk-size", type=int, default=32, help="rows scored (and saved) together")
    o.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srlm",
        description="Self-Rewarding Language Models (Yuan et al., 2024): training pipeline, "
        "generation, judging and judge evaluation.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "run",
        help="run (or resume) the staged pipeline from a YAML config",
        description="Run the stages of CONFIG.yaml in order (SFT, SPIN, prompt generation, "
        "self-/external-reward DPO). The config is validated before any work starts. "
        "Running the same command again resumes where it stopped.",
    )
    p.add_argument("config", help="YAML run config (see examples/*.yaml and docs/cli.md)")
    p.add_argument("--out", default=None, help="run folder (overrides out: in the config)")
    p.add_argument("--overwrite", action="store_true", help="clear a run folder made by srlm")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "generate",
        help="sample candidate responses for prompts, to JSONL",
        description="Sample --num-candidates responses per prompt with a local Hugging Face "
        "model. Writes one JSON line per prompt: {id, prompt, responses}. Resumes: a rerun "
        "reuses the rows of --out made from the same prompts with the same settings, and "
        "refuses an --out made with other settings (naming them).",
    )
    p.add_argument("--model", required=True, help="local causal LM folder")
    p.add_argument(
        "--prompts", required=True, help="prompt file (jsonl/json/csv/tsv/parquet/datasets folder)"
    )
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace --out instead of resuming it")
    _add_model_args(p)
    p.add_argument(
        "--chat-template-file", default=None, help="replace the tokenizer's chat template"
    )
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    p.add_argument("--num-candidates", type=int, default=4, help="responses per prompt (paper: 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="paper: 0.7")
    p.add_argument("--top-p", type=float, default=0.9, help="paper: 0.9")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--chunk-size", type=int, default=16, help="prompts generated (and saved) together"
    )
    p.add_argument("--seed", type=int, default=0)
    _add_input_args(p, response=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "judge",
        help="score a JSONL of prompt/response pairs with a judge",
        description="Score each row's response (or list of responses, as written by srlm "
        "generate) with an LLM judge, a reward model or a Python function. Writes the rows "
        "with score/judgement (or scores/judgements) added. Resumes: a rerun reuses the "
        "rows of --out judged from the same input rows with the same settings, and refuses "
        "an --out made with other settings (naming them).",
    )
    p.add_argument("--input", required=True, help="rows with prompt and response(s)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace --out instead of resuming it")
    _add_judge_args(p)
    _add_input_args(p, response=True)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser(
        "eval",
        help="judge agreement with labelled scores (pairwise accuracy, Spearman, ...)",
        description="Compare judge scores with gold scores: pairwise accuracy (within "
        "--group-field, default the prompt), exact match, Spearman, Kendall tau and parse "
        "rate (Yuan et al. 2024, Table 3). Scores come from --pred-field, or from a judge "
        "run now (--model / --reward-model / --function).",
    )
    p.add_argument("--input", required=True, help="rows with prompt, response and a gold score")
    p.add_argument("--gold-field", default="gold_score", help="column with the gold score")
    p.add_argument("--pred-field", default=None, help="column with existing predicted scores")
    p.add_argument(
        "--group-field",
        default="prompt",
        help="pairwise accuracy compares rows sharing this field ('' for all pairs)",
    )
    p.add_argument("--out", default=None, help="write the metrics JSON here too")
    p.add_argument(
        "--scored-out",
        default=None,
        help="with a judge: write the scored rows (JSONL; a rerun resumes it like srlm judge)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --scored-out instead of resuming it"
    )
    _add_judge_args(p)
    _add_input_args(p, response=True)
    p.set_defaults(func=cmd_eval)

    sub.add_parser(
        "demo",
        help="the built-in miniature task (srlm demo --help for its options)",
        add_help=False,
    )
    return parser
