"""The ``srlm`` command line.

* ``srlm run CONFIG.yaml [KEY=VALUE ...] [--out DIR] [--overwrite] [--check]``: the whole
  staged pipeline from a YAML config (``KEY=VALUE`` overrides a key of the file) (validated before any work; see ``self_rewarding_lm_pytorch.config``). Running the same
  command again resumes where it stopped.
* ``srlm generate``: sample candidate responses for a file of prompts, to JSONL.
* ``srlm judge``: score a JSONL of prompt/response(s) with a judge, to JSONL.
* ``srlm eval``: agreement of judge scores with labelled scores (pairwise accuracy, exact
  match, Spearman, Kendall tau, parse rate: the paper's reward-modelling metrics).
* ``srlm prepare oasst``: the paper's IFT / EFT inputs from an Open Assistant export.
* ``srlm plan CONFIG.yaml``: per-GPU memory of a config for each sharding strategy.
* ``srlm demo ...``: the built-in miniature task (``self_rewarding_lm_pytorch.demo.run``).

Every command takes ``--help``. ``generate`` and ``judge`` append records as they are
made; each record carries a key of the input row and the settings that made it, so a
rerun reuses exactly the records it would make again (an interrupted command resumes)
and refuses an output file made with other settings, naming them (``--overwrite``
replaces it).
Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is quick.

Modules: :mod:`.parser` (the flags), :mod:`.build` (``srlm run``: objects of a config),
:mod:`.generate`, :mod:`.judge` (``judge`` and ``eval``), :mod:`.inputs` (what those
share), :mod:`.outputs` (their resumable output files), :mod:`.trackers`, :mod:`.flags`
(flags from dataclass fields), :mod:`.prepare`, :mod:`.plan`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..config import ConfigError
from .build import (
    build_datasets,
    build_judge,
    build_model,
    build_reward_config,
    build_tokenizer,
    build_trainer,
    run_from_config,
)
from .flags import add_dataclass_args, dataclass_from_args
from .parser import build_parser
from .trackers import JsonlTracker, build_accelerate_kwargs

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "JsonlTracker",
    "add_dataclass_args",
    "build_accelerate_kwargs",
    "build_datasets",
    "build_judge",
    "build_model",
    "build_parser",
    "build_reward_config",
    "build_tokenizer",
    "build_trainer",
    "dataclass_from_args",
    "main",
    "run_from_config",
]

EXIT_USAGE = 2  # bad config / arguments
EXIT_FAILURE = 1  # the work itself failed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report)


def cmd_demo(argv: list[str]) -> int:
    try:
        from ..demo.run import main as demo_main
    except ModuleNotFoundError as exc:
        if exc.name not in ("self_rewarding_lm_pytorch.demo.run",):
            raise
        print(
            "srlm demo: the demo runner (self_rewarding_lm_pytorch/demo/run.py) is not "
            "installed in this version",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return int(demo_main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``srlm``; returns the exit status (0 success, 1 failure, 2 bad input,
    130 interrupted by Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `srlm demo ...` hands every later argument (including --help) to the demo's parser
    globals_ = [a for a in argv[: argv.index("demo")]] if "demo" in argv else []
    if "demo" in argv and all(a.startswith("-") for a in globals_):
        try:
            return cmd_demo(argv[argv.index("demo") + 1 :])
        except KeyboardInterrupt:
            if "--debug" in globals_:
                raise
            print("srlm demo: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "run" and not any(a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]  # KEY=VALUE after the flags
    elif extra:
        parser.parse_args(argv)  # names the unrecognised arguments and exits 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        resumes = args.command in ("run", "generate", "judge") or getattr(args, "scored_out", None)
        hint = "; rerun the same command to resume" if resumes else ""
        if resumes and getattr(args, "overwrite", False):  # rerun as is: it would start over
            hint = "; rerun the same command without --overwrite to resume"
        print(f"srlm {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"srlm {args.command}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(
            f"srlm {args.command}: error: {type(exc).__name__}: {exc}\n(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
