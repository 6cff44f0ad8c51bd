"""The ``srlm`` argument parser: one subcommand per command, sampling and judge flags
generated from their config dataclasses."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..generation import BackendConfig, GenerationConfig
from ..judge import JudgeConfig
from .build import cmd_run
from .flags import add_dataclass_args
from .generate import cmd_generate
from .head_to_head import add_head_to_head_args
from .judge import cmd_eval, cmd_judge
from .prepare import add_prepare_parser


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


def _add_backend_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--backend`` and the backends' settings (``--vllm.*``, ``--openai.*``)."""
    add_dataclass_args(
        p.add_argument_group(f"{what} backend (generation.BackendConfig)"),
        BackendConfig,
        helps={"backend": f"what samples the {what}: torch, vllm or openai (a server)"},
    )


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (choose one)")
    g.add_argument(
        "--model",
        default=None,
        help="local causal LM folder used as an LLM judge (optional with --backend openai)",
    )
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
    o.add_argument("--template", default=None, help="reward-model input template (Jinja2)")
    o.add_argument("--head", default="scalar", choices=["scalar", "classes"])
    o.add_argument("--chunk-size", type=int, default=32, help="rows scored (and saved) together")
    o.add_argument("--seed", type=int, default=0)
    sampling = p.add_argument_group("LLM judge sampling (judge.JudgeConfig)")
    add_dataclass_args(sampling, JudgeConfig, aliases=JUDGE_FLAG_ALIASES)
    _add_backend_args(p, "LLM judge")


#: today's spellings kept as aliases of the generated flags
JUDGE_FLAG_ALIASES = {"num_samples": ["--samples"]}
GENERATE_FLAG_ALIASES = {"num_return_sequences": ["--num-candidates"]}
#: GenerationConfig fields that ``srlm generate`` does not offer as flags
GENERATE_EXCLUDED = ("eos_token_id", "stop_strings")
#: ``srlm generate``'s defaults where they differ from GenerationConfig's (the paper's)
GENERATE_DEFAULTS = {
    "num_return_sequences": 4,
    "temperature": 0.7,
    "top_p": 0.9,
    "max_new_tokens": 256,
}
GENERATE_HELP = {
    "num_return_sequences": "responses per prompt (paper: 4)",
    "temperature": "sampling temperature (paper: 0.7; 0 is greedy)",
    "top_p": "nucleus sampling top-p (paper: 0.9)",
    "top_k": "sample from the k most likely tokens only (0: off)",
    "min_p": "drop tokens below min_p times the top probability (0: off)",
    "max_new_tokens": "tokens per response at most",
}


def _command(
    sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str, description: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    return p


def _add_output_args(p: argparse.ArgumentParser, flag: str, *, required: bool, help: str) -> None:
    p.add_argument(flag, required=required, default=None, help=help)
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace {flag} instead of resuming it"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``srlm`` parser: ``run``, ``generate``, ``judge``, ``eval`` and ``demo``."""
    parser = argparse.ArgumentParser(
        prog="srlm",
        description="Self-Rewarding Language Models (Yuan et al., 2024): training pipeline, "
        "generation, judging and judge evaluation.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = _command(
        sub,
        "run",
        cmd_run,
        "run (or resume) the staged pipeline from a YAML config",
        "Run the stages of CONFIG.yaml in order (SFT, SPIN, prompt generation, "
        "self-/external-reward DPO). The config is validated before any work starts. "
        "Running the same command again resumes where it stopped. KEY=VALUE arguments "
        "override keys of the file (dotted paths, list entries by number: seed=3, "
        "stages.1.trainer.beta=0.2, judges.big.num_samples=5; values are YAML).",
    )
    p.add_argument("config", help="YAML run config (see examples/*.yaml and docs/cli.md)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override a key of the config file"
    )
    p.add_argument("--out", default=None, help="run folder (overrides out: in the config)")
    p.add_argument("--overwrite", action="store_true", help="clear a run folder made by srlm")
    p.add_argument("--check", action="store_true", help="validate the config and exit")

    p = _command(
        sub,
        "generate",
        cmd_generate,
        "sample candidate responses for prompts, to JSONL",
        "Sample --num-return-sequences responses per prompt with a local Hugging Face "
        "model. Writes one JSON line per prompt: {id, prompt, responses}. Resumes: a rerun "
        "reuses the rows of --out made from the same prompts with the same settings, and "
        "refuses an --out made with other settings (naming them).",
    )
    p.add_argument(
        "--model", default=None, help="local causal LM folder (optional with --backend openai)"
    )
    p.add_argument(
        "--prompts", required=True, help="prompt file (jsonl/json/csv/tsv/parquet/datasets folder)"
    )
    _add_output_args(p, "--out", required=True, help="output JSONL")
    _add_model_args(p)
    p.add_argument(
        "--chat-template-file", default=None, help="replace the tokenizer's chat template"
    )
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    add_dataclass_args(
        p.add_argument_group("sampling (generation.GenerationConfig)"),
        GenerationConfig,
        exclude=GENERATE_EXCLUDED,
        aliases=GENERATE_FLAG_ALIASES,
        defaults=GENERATE_DEFAULTS,
        helps=GENERATE_HELP,
    )
    _add_backend_args(p, "responses")
    p.add_argument(
        "--chunk-size", type=int, default=16, help="prompts generated (and saved) together"
    )
    p.add_argument("--seed", type=int, default=0)
    _add_input_args(p, response=False)

    p = _command(
        sub,
        "judge",
        cmd_judge,
        "score a JSONL of prompt/response pairs with a judge",
        "Score each row's response (or list of responses, as written by srlm "
        "generate) with an LLM judge, a reward model or a Python function. Writes the rows "
        "with score/judgement (or scores/judgements) added. Resumes: a rerun reuses the "
        "rows of --out judged from the same input rows with the same settings, and refuses "
        "an --out made with other settings (naming them).",
    )
    p.add_argument("--input", required=True, help="rows with prompt and response(s)")
    _add_output_args(p, "--out", required=True, help="output JSONL")
    _add_judge_args(p)
    _add_input_args(p, response=True)

    p = _command(
        sub,
        "eval",
        cmd_eval,
        "judge agreement with labelled scores (pairwise accuracy, Spearman, ...)",
        "Compare judge scores with gold scores: pairwise accuracy (within "
        "--group-field, default the prompt), exact match, Spearman, Kendall tau and parse "
        "rate (Yuan et al. 2024, Table 3). Scores come from --pred-field, or from a judge "
        "run now (--model / --reward-model / --function).",
    )
    p.add_argument("--input", default=None, help="rows with prompt, response and a gold score")
    p.add_argument("--gold-field", default="gold_score", help="column with the gold score")
    p.add_argument("--pred-field", default=None, help="column with existing predicted scores")
    p.add_argument(
        "--group-field",
        default="prompt",
        help="pairwise accuracy compares rows sharing this field ('' for all pairs)",
    )
    p.add_argument("--out", default=None, help="write the metrics JSON here too")
    _add_output_args(
        p,
        "--scored-out",
        required=False,
        help="with a judge: write the scored rows (JSONL; a rerun resumes it like srlm judge)",
    )
    _add_judge_args(p)
    _add_input_args(p, response=True)
    add_head_to_head_args(p)

    add_prepare_parser(sub)

    sub.add_parser(
        "demo",
        help="the built-in miniature task (srlm demo --help for its options)",
        add_help=False,
    )
    from .plan import add_plan_parser  # srlm plan: per-GPU memory of a config

    add_plan_parser(sub)
    return parser
