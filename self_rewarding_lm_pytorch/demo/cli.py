"""The ``srlm demo`` command line: its argument parser and :func:`main`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arms import ARM_TABLE, check_arms
from .config import DemoSetupError

__all__ = ["main"]


def _parse_arms(text: str) -> list[str]:
    try:
        return check_arms([a.strip() for a in text.split(",") if a.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srlm demo",
        description=(
            "Train a tiny model from scratch on a synthetic instruction-following task and "
            "run self-rewarding iterations, with oracle-pair and random-pair controls; "
            "writes report.md, report.json and report.png to --out."
        ),
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke-test run (seconds; shows no effect)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and sampling")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument(
        "--arms",
        type=_parse_arms,
        default=list(ARM_TABLE),
        help="comma-separated arms to run (default all): "
        + "; ".join(f"{a.name}: {a.description}" for a in ARM_TABLE.values()),
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete --out first instead of resuming"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """``srlm demo``: run the demo, print the results table; 0 on success, 1 if an arm
    stopped early (the report says why), 2 for bad arguments."""
    from .run import run_demo  # run.py imports this module: import it when called

    args = _parser().parse_args(argv)
    try:
        report = run_demo(
            args.out,
            seed=args.seed,
            arms=args.arms,
            overwrite=args.overwrite,
            quick=args.quick,
        )
    except DemoSetupError as exc:
        print(f"srlm demo: {exc}", file=sys.stderr)
        return 2
    from .report import render_table

    print(render_table(report))
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 1 if report["failures"] else 0
