"""What ``srlm generate`` / ``judge`` / ``eval`` share: input checks, the device, and the
keys that tie each output row to its input row and settings (so a rerun resumes)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, DataSource


def _check_input(path: str, fmt: str, flag: str) -> None:
    """Refuse a missing input file or one of an unknown format before any work."""
    from ..io import detect_format

    if not Path(path).exists():
        raise ConfigError(f"{flag}: {path} does not exist")
    if fmt == "auto":
        try:
            detect_format(path)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from exc


def _source_from_args(args: argparse.Namespace, path: str) -> DataSource:
    _check_input(path, args.format, "--prompts")
    return DataSource(
        path=path,
        format=args.format,
        split=args.split,
        prompt_field=args.prompt_field,
        response_field=getattr(args, "response_field", "response"),
        messages_field=args.messages_field,
        limit=args.limit,
    )


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _need(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{flag}: {path} does not exist; fix the path")
    return p


def _fingerprint(path: str | Path, flag: str) -> str:
    """A short hash of a file's or a folder's files (names, sizes, modification times):
    changes when a model is saved again in the same folder."""
    p = _need(path, flag)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _file_hash(path: str | Path | None, flag: str) -> str | None:
    """A short hash of a file's bytes (``None`` for no file)."""
    if path is None:
        return None
    return hashlib.sha256(_need(path, flag).read_bytes()).hexdigest()[:12]


def _abspath(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _row_keys(settings: dict[str, Any], contents: list[Any]) -> list[str]:
    """One key per input row: a hash of the settings, the row's content and how many
    rows with the same content come before it (so duplicated rows keep their own rows)."""
    base = json.dumps(settings, sort_keys=True, default=str)
    seen: dict[str, int] = {}
    keys = []
    for content in contents:
        text = json.dumps(content, sort_keys=True, default=str)
        n = seen[text] = seen.get(text, -1) + 1
        keys.append(hashlib.sha256(f"{base}\0{text}\0{n}".encode()).hexdigest()[:32])
    return keys
