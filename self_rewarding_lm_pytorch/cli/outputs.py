"""The output file of a resumable command (``srlm generate`` / ``srlm judge``): a
:class:`~self_rewarding_lm_pytorch.store.JsonlStore` keyed by what made each row, reopened
only with the same settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..fingerprint import changed_keys
from ..store import JsonlStore, atomic_write_text, decode_utf8

__all__ = ["KeyedJsonlStore"]


class KeyedJsonlStore(JsonlStore):
    """The output JSONL of a resumable command (``srlm generate`` / ``srlm judge``): each
    row carries ``<name>_key`` (a key of what produced it: the input row's content and the
    settings) and ``<name>_settings``, so a rerun reuses exactly the rows it would make
    again. Opening changes nothing: a torn last line from a crash is dropped at the first
    write. Anything else in the file (rows of other settings, of input rows no longer
    given, of another tool) is refused with a :class:`ConfigError` before any work."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str,
        settings: dict[str, Any],
        keys: list[str],
        flag: str,
        input_path: str | Path,
        overwrite: bool,
    ) -> None:
        self.name, self.settings = name, settings
        self.key_field, self.settings_field = f"{name}_key", f"{name}_settings"
        self._duplicates = False
        self._open = (flag, keys, str(input_path), overwrite)
        if Path(input_path).resolve() == Path(path).resolve():
            raise ConfigError(f"{flag} {path} is the input file; write the output elsewhere")
        super().__init__(path)

    def _repair_and_load(self, repair: bool) -> None:
        flag, keys, input_path, overwrite = self._open
        if overwrite:
            self._cut = 0  # emptied at the first write
            return
        self._load_checked(flag, keys, input_path)

    def _load_checked(self, flag: str, keys: list[str], input_path: str) -> None:
        fix = f"use another {flag}, or add --overwrite to replace the file"
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
                    f"{flag} {self.path}: line {n} is not a row written by srlm {self.name} (it "
                    f"has no {self.key_field!r}), so the file cannot be resumed; {fix}"
                )
            old = row.get(self.settings_field) or {}
            if old != self.settings:
                changed = "; ".join(changed_keys(old, self.settings))
                raise ConfigError(
                    f"{flag} {self.path} holds rows made with other settings ({changed}); "
                    f"its rows are reused only for the same settings: {fix}"
                )
            if not self._add(row):
                self._duplicates = True  # dropped when the file is rewritten at the end
        wanted = set(keys)
        stale = [r for r in self._records if r[self.key_field] not in wanted]
        if stale:
            shown = f"id {stale[0].get('id')!r}"
            if isinstance(stale[0].get("prompt"), str):
                shown += f", prompt {stale[0]['prompt'][:60]!r}"
            raise ConfigError(
                f"{flag} {self.path} holds {len(stale)} rows made from input rows that "
                f"{input_path} no longer gives (the first: {shown}): the input was edited, or "
                f"--limit lowered; {fix}"
            )

    @property
    def rows(self) -> dict[str, dict]:
        """The rows by key (a live view: it grows as rows are appended)."""
        return self._by_key

    def keyed(self, row: dict, key: str) -> dict:
        """``row`` with this output's key and settings."""
        return {**row, self.key_field: key, self.settings_field: self.settings}

    def finish(self, keys: list[str], ids: list[str]) -> list[dict]:
        """The rows in input order (ids as given); the file is rewritten atomically in that
        order when a resumed run appended rows out of order."""
        rows = [self._by_key[k] for k in keys]
        order = [r[self.key_field] for r in self._records]
        in_order = order == keys and all(r.get("id") == i for r, i in zip(rows, ids))
        rows = [{**r, "id": i} for r, i in zip(rows, ids)]
        if not in_order or self._duplicates:
            text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
            atomic_write_text(self.path, text)
        return rows
