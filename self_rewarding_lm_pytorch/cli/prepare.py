"""``srlm prepare oasst``: the paper's IFT / EFT seed files from an Open Assistant export.

Reads a local file (JSONL, Parquet, ... through :mod:`..io`) or a Hugging Face hub name
(``OpenAssistant/oasst1``, through ``datasets.load_dataset``), applies the rules of
:mod:`..oasst` and writes ``ift.jsonl``, ``ift_heldout.jsonl``, ``eft_inputs.jsonl``,
``eft_inputs_heldout.jsonl``, ``summary.md`` and ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError

#: the files ``srlm prepare oasst`` writes, by the part of the result they hold
OASST_FILES = {
    "ift": "ift.jsonl",
    "ift_heldout": "ift_heldout.jsonl",
    "eft": "eft_inputs.jsonl",
    "eft_heldout": "eft_inputs_heldout.jsonl",
}


#: OasstConfig fields -> the flags that set them
_FLAGS = {
    "langs": "--lang",
    "ift_count": "--ift-count",
    "eft_count": "--eft-count",
    "heldout_fraction": "--heldout-fraction",
    "min_responses": "--min-responses",
    "seed": "--seed",
}


def add_prepare_parser(sub: Any) -> None:
    """``srlm prepare`` and its one dataset, ``oasst``."""
    p = sub.add_parser(
        "prepare",
        help="make seed data files from a public dataset (oasst)",
        description="Turn a public dataset into the files a run config reads.",
    )
    kinds = p.add_subparsers(dest="dataset", metavar="DATASET")
    kinds.required = True
    o = kinds.add_parser(
        "oasst",
        help="Open Assistant -> ift.jsonl + eft_inputs.jsonl (Yuan et al. 2024, section 3.1)",
        description="From an Open Assistant export (oasst1 / oasst2, the messages or the "
        "trees export), write the paper's IFT data (first-turn prompts with their "
        "rank-0 human answer) and EFT inputs (prompts with several human-ranked answers), "
        "each with a held-out split by message tree, plus summary.md / summary.json "
        "counting what was left out and why. See docs/data.md.",
    )
    o.set_defaults(func=cmd_prepare_oasst, command="prepare oasst")
    o.add_argument(
        "--input",
        required=True,
        help="export file (.jsonl / .parquet / ..., or a datasets folder) or a hub name "
        "such as OpenAssistant/oasst1 (needs the datasets package and a connection)",
    )
    o.add_argument("--out", required=True, help="folder for the output files")
    o.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "json", "csv", "tsv", "parquet", "datasets"],
        help="input format of a local file (default: from the suffix)",
    )
    o.add_argument(
        "--split", default=None, help="split of a hub dataset (default: train) or datasets folder"
    )
    o.add_argument(
        "--lang", nargs="+", default=["en"], help="languages of the prompts kept (default: en)"
    )
    o.add_argument("--ift-count", type=int, default=None, help="IFT training rows at most")
    o.add_argument("--eft-count", type=int, default=None, help="EFT training prompts at most")
    o.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="fraction of message trees held out (default: 0.1)",
    )
    o.add_argument(
        "--min-responses",
        type=int,
        default=2,
        help="ranked replies an EFT prompt needs at least (default: 2)",
    )
    o.add_argument("--seed", type=int, default=0, help="seed of the split and the count caps")


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).suffix and "\\" not in name


def load_hub_rows(name: str, split: str | None) -> list[dict]:
    """The rows of a Hugging Face hub dataset (``datasets.load_dataset(name, split=...)``)."""
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(
            f"--input {name!r} is not a local file, so it is read as a Hugging Face hub "
            "dataset, which needs the datasets package: pip install datasets (or download "
            "the export and pass its .jsonl / .parquet file)"
        ) from exc
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, unknown name, unknown split: all say the same fix
        raise RuntimeError(
            f"--input: could not load the hub dataset {name!r} (split {split or 'train'}): "
            f"{type(exc).__name__}: {exc}; check the name, the split and the connection, or "
            "download the export and pass its .jsonl / .parquet file"
        ) from exc
    return ds.to_list()


def read_oasst_input(source: str, *, format: str = "auto", split: str | None = None) -> list[dict]:
    """The rows of ``--input``: a local file or folder, else a hub dataset name."""
    from ..io import read_rows

    if Path(source).exists():
        return read_rows(source, format=format, split=split)
    if _looks_like_hub_name(source):
        return load_hub_rows(source, split)
    raise ConfigError(
        f"--input: {source} does not exist (and is not a hub name such as "
        "OpenAssistant/oasst1); fix the path"
    )


def cmd_prepare_oasst(args: argparse.Namespace) -> int:
    from ..io import write_jsonl
    from ..oasst import OasstConfig, prepare_oasst, summary_markdown
    from ..store import atomic_write_text

    values = {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in _FLAGS.items()}
    try:
        config = OasstConfig(**values)
    except ConfigError as exc:  # name the flag, not the OasstConfig field
        key = str(exc).split(" ", 1)[0]
        raise ConfigError(str(exc).replace(key, _FLAGS.get(key, key), 1)) from None
    rows = read_oasst_input(args.input, format=args.format, split=args.split)
    data = prepare_oasst(rows, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part, name in OASST_FILES.items():
        write_jsonl(out / name, getattr(data, part))
    summary = {"input": args.input, **data.summary}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(data.summary))
    print(
        json.dumps(
            {
                "out": str(out),
                "ift": data.summary["ift"]["train"],
                "ift_heldout": data.summary["ift"]["heldout"],
                "eft_inputs": data.summary["eft"]["train"],
                "eft_inputs_heldout": data.summary["eft"]["heldout"],
            }
        )
    )
    return 0
