"""(temporary)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import ConfigError


class _KeyedOutput:
    """An output JSONL whose rows carry ``<name>_key`` (what produced the row: the input
    row's content and the settings) and ``<name>_settings``, so a rerun reuses exactly the
    rows it would make again. Rows are appended (flushed each, fsynced each chunk); a torn
    last line from a crash is dropped. Anything else in the file (rows of other settings,
    of input rows no longer given, of another tool) is refused before any work."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str,
        settings: dict[str, Any],
        keys: list[str],
        flag: str,
        input_path: str,
        overwrite: bool,
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.settings = settings
        self.key_field, self.settings_field = f"{name}_key", f"{name}_settings"
        self.rows: dict[str, dict] = {}
        self.order: list[str] = []  # keys in file order
        self._cut: int | None = None  # where to truncate before the first append
        self._duplicates = False
        if Path(input_path).resolve() == self.path.resolve():
            raise ConfigError(f"{flag} {path} is the input file; write the output elsewhere")
        fix = f"use another {flag}, or add --overwrite to replace the file"
        if overwrite or not self.path.exists():
            self._cut = 0 if self.path.exists() else None
            return
        from ..io import decode_utf8

        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # a torn last line (a crash) is dropped
        self._cut = len(complete) if len(complete) < len(raw) else None
        try:
            text = decode_utf8(complete, self.path)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}; or {fix}") from exc
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or self.key_field not in row:
                raise ConfigError(
                    f"{flag} {path}: line {n} is not a row written by srlm {name} (it has no "
                    f"{self.key_field!r}), so the file cannot be resumed; {fix}"
                )
            old = row.get(self.settings_field) or {}
            if old != settings:
                changed = [
                    f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                    for k in sorted(set(old) | set(settings))
                    if old.get(k) != settings.get(k)
                ]
                raise ConfigError(
                    f"{flag} {path} holds rows made with other settings ({'; '.join(changed)}); "
                    f"its rows are reused only for the same settings: {fix}"
                )
            key = row[self.key_field]
            if key in self.rows:
                self._duplicates = True  # dropped when the file is rewritten at the end
                continue
            self.rows[key] = row
            self.order.append(key)
        wanted = set(keys)
        stale = [k for k in self.order if k not in wanted]
        if stale:
            first = self.rows[stale[0]]
            shown = f"id {first.get('id')!r}"
            if isinstance(first.get("prompt"), str):
                shown += f", prompt {first['prompt'][:60]!r}"
            raise ConfigError(
                f"{flag} {path} holds {len(stale)} rows made from input rows that {input_path} "
                f"no longer gives (the first: {shown}): the input was edited, or --limit "
                f"lowered; {fix}"
            )

    def append(self, rows: list[dict]) -> None:
        """Append ``rows`` (each already keyed), flushing each line, fsyncing at the end."""
        from ..store import _explain  # the library's explanation of write errors

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._cut is not None:  # drop a torn last line (or, with --overwrite, all)
                with open(self.path, "r+b") as f:
                    f.truncate(self._cut)
                self._cut = None
            with open(self.path, "ab") as f:
                for row in rows:
                    f.write((json.dumps(row, sort_keys=True, default=str) + "\n").encode())
                    f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise _explain(exc, self.path) from exc
        for row in rows:
            key = row[self.key_field]
            self.rows[key] = row
            self.order.append(key)

    def keyed(self, row: dict, key: str) -> dict:
        """``row`` with this output's key and settings."""
        return {**row, self.key_field: key, self.settings_field: self.settings}

    def finish(self, keys: list[str], ids: list[str]) -> list[dict]:
        """The rows in input order (ids as given); the file is rewritten atomically in that
        order when a resumed run appended rows out of order."""
        from ..store import atomic_write_text

        rows = [self.rows[k] for k in keys]
        in_order = self.order == keys and all(r.get("id") == i for r, i in zip(rows, ids))
        in_order = in_order and not self._duplicates
        rows = [{**r, "id": i} for r, i in zip(rows, ids)]
        if not in_order:
            text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
            atomic_write_text(self.path, text)
        return rows
