"""Crash-safe files of the run directory.

* :func:`atomic_write_json` / :func:`atomic_write_text`: temp file, fsync, rename, so a
  reader sees the old file or the new one, never half of one.
* :class:`JsonlStore`: append-only JSON lines, each record flushed and fsynced as it is
  made. Records carry a unique ``id``; reopening the file skips a torn last line left by
  a crash and reports which ids are already present, so a resumed run neither loses nor
  duplicates a record.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["JsonlStore", "atomic_write_json", "atomic_write_text", "read_jsonl", "StoreError"]


class StoreError(OSError):
    """A run-directory file could not be written; the message names the path and the fix."""


def _explain(exc: OSError, path: Path) -> StoreError:
    if exc.errno == errno.ENOSPC:
        hint = "the disk is full: free space or point the run at another --out directory"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = (
            "the directory is not writable: fix its permissions or choose another output directory"
        )
    else:
        hint = "check that the output directory exists and is writable"
    err = StoreError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; {hint}")
    err.__cause__ = exc
    return err


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _explain(exc, path) from exc


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read every complete JSON line of ``path``; a torn final line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # only the last line can be torn by a crash
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


class JsonlStore:
    """Append-only JSONL file of records with unique ``id`` fields.

    >>> store = JsonlStore(path)          # doctest: +SKIP
    >>> store.append({"id": "p0", ...})   # written, flushed and fsynced at once
    >>> "p0" in store                     # True, also after a restart
    """

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._records: list[dict] = []
        self._ids: set[str] = set()
        if self.path.exists():
            self._repair_and_load()

    def _repair_and_load(self) -> None:
        # a crash mid-append leaves a last line without its newline: cut it off, so the
        # next append starts on a clean line
        with open(self.path, "rb") as f:
            raw = f.read()
        if raw and not raw.endswith(b"\n"):
            cut = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
        records = read_jsonl(self.path)
        for r in records:
            rid = r.get("id")
            if rid in self._ids:
                continue  # a duplicate can only come from outside; ignore it on read
            if rid is not None:
                self._ids.add(rid)
            self._records.append(r)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._ids

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict]:
        return iter(list(self._records))

    @property
    def records(self) -> list[dict]:
        return list(self._records)

    @property
    def ids(self) -> set[str]:
        return set(self._ids)

    def append(self, record: dict) -> bool:
        """Append ``record`` (must have an ``id``); returns False if that id is already stored."""
        return self.extend([record]) == 1

    def extend(self, records: Iterable[dict]) -> int:
        """Append the records whose ids are new, in one flushed write; returns how many."""
        fresh = []
        for r in records:
            rid = r.get("id")
            if rid is None:
                raise ValueError("every stored record needs an 'id' field")
            if rid in self._ids or any(f["id"] == rid for f in fresh):
                continue
            fresh.append(r)
        if not fresh:
            return 0
        data = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in fresh)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
        except OSError as exc:
            raise _explain(exc, self.path) from exc
        for r in fresh:
            self._ids.add(r["id"])
            self._records.append(r)
        return len(fresh)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return str(obj)
