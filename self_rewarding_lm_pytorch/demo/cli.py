"""The ``srlm demo`` command line: its argument parser and :func:`main`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ARMS, DemoSetupError

__all__ = ["main"]


def _parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise argparse.ArgumentTypeError(
            f"unknown arm(s) {unknown or text!r}; give a comma-separated subset of {','.join(ARMS)}"
        )
    return arms


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srlm demo",
        description=(
            "Train a tiny model from scratch on a synthetic instruction-following task and "
            "run two self-rewarding iterations, with oracle-pair and random-pair controls; "
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
        default=list(ARMS),
        help="comma-separated arms to run: self,oracle,random (default all)",
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
