"""Crash-safe files of the run directory.

* :func:`atomic_write_json` / :func:`atomic_write_text`: temp file, fsync, rename, so a
  reader sees the old file or the new one, never half of one.
* :class:`JsonlStore`: append-only JSON lines, each record flushed and fsynced as it is
  made. Records carry a unique ``id``; reopening the file skips a torn last line left by
  a crash and reports which ids are already present, so a resumed run neither loses nor
  duplicates a record.
* :class:`RunLock`: one writer per run directory (``flock`` on ``.srlm-lock``; the lock
  dies with its process). :func:`clear_run_dir` empties a run directory for
  ``--overwrite`` and refuses any folder this library did not make.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "JsonlStore",
    "LOCK_NAME",
    "RunDirError",
    "RunLock",
    "StoreError",
    "atomic_write_json",
    "atomic_write_text",
    "clear_run_dir",
    "ensure_run_dir",
    "is_run_dir",
    "read_jsonl",
]

LOCK_NAME = ".srlm-lock"
# what this library writes at the top of a run directory; --overwrite deletes only these
_RUN_ENTRY = re.compile(
    r"state\.json|config\.yaml|run_config\.yaml|report\.(json|md)|[^/]+\.png|logs|final"
    r"|\d{2,}-[a-z0-9-]+|\..+\.tmp"
)
_HOST = socket.gethostname()


class StoreError(OSError):
    """A run-directory file could not be written; the message names the path and the fix."""


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked (another run holds it, it is not a run
    directory, or its settings differ); the message names what is there and the fix."""


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Remove temp files of ``name`` left by dead writers; live writers' temps stay.

    Temp names are ``.NAME.PID.TOKEN.HOST.tmp``: a temp is stale when it was made on this
    host by a process that no longer runs (a temp from another host is left alone)."""
    prefix = f".{name}."
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        parts = entry.name[len(prefix) : -len(".tmp")].split(".", 2)
        if len(parts) == 3 and parts[0].isdigit():
            pid, host = int(parts[0]), parts[2]
            if host != _HOST or pid == os.getpid() or _pid_alive(pid):
                continue
        elif len(parts) != 1:  # not a temp of this file (e.g. of NAME.bak)
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass  # another process removed it first


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The file gets the mode ``open()`` would give it (0666 less the umask). Concurrent
    writers of one path each use their own temp file; the last rename wins."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path.parent, path.name)  # left by a killed writer
        token = secrets.token_hex(4)
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{token}.{_HOST}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


def decode_utf8(raw: bytes, path: str | Path) -> str:
    """``raw`` as UTF-8 text (a leading byte-order mark is dropped); invalid bytes raise a
    ``ValueError`` naming the file, the line, the byte offset and the fix."""
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        pos = skip + exc.start
        line_start = raw.rfind(b"\n", 0, pos) + 1
        line = raw.count(b"\n", 0, pos) + 1
        bad = " ".join(f"0x{b:02x}" for b in raw[pos : skip + exc.end])
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 (byte {bad} at byte offset {pos}, column "
            f"{pos - line_start + 1} of the line); re-save the file as UTF-8 (e.g. "
            f"iconv -f latin1 -t utf-8), or fix that line"
        ) from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read every complete JSON line of ``path``; a torn final line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = decode_utf8(path.read_bytes(), path).split("\n")
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


# ====================================================================== the run directory


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a run state (``state.json`` with a
    ``finished`` list), i.e. a run directory this library made."""
    state = Path(path) / "state.json"
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("finished"), list)


def _listing(path: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def ensure_run_dir(path: str | Path) -> Path:
    """Create the run folder ``path`` (and its parents) if needed; a clear error when a
    file is in the way or the folder cannot be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(
            f"the output path {path} is a file, not a folder; choose another --out "
            "(checkpoints_folder) for the run directory, or move the file away"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            exc.errno,
            f"cannot create the run folder {path}: {exc.strerror or exc}; choose "
            "another output directory (checkpoints_folder / --out), or fix the path (a "
            "file may be in the way)",
        ) from exc
    return path


def clear_run_dir(path: str | Path, *, dry_run: bool = False) -> None:
    """Empty the run directory ``path`` for ``--overwrite``; ``path`` itself stays.

    Only a run directory this library made (see :func:`is_run_dir`) holding nothing but
    what the library writes, or an empty folder, is cleared; anything else is refused
    with :class:`RunDirError`, naming what is there, and nothing is deleted
    (``dry_run=True`` only checks). The lock file stays (its holder may be the caller);
    ``state.json`` goes last, so a clear interrupted half-way can be repeated."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise RunDirError(
            f"--overwrite: {path} is {kind}, not a run directory, so it is not deleted; "
            "choose another --out (checkpoints_folder) for the run"
        )
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME]
    if not entries:
        return
    if not is_run_dir(path):
        raise RunDirError(
            f"--overwrite: {path} is not a run directory made by this library (no "
            f"state.json with a run state), so nothing in it is deleted; it holds "
            f"{_listing(path)}. Choose another --out (checkpoints_folder) for the run, "
            "or empty the folder yourself"
        )
    foreign = [p for p in entries if not _RUN_ENTRY.fullmatch(p.name)]
    if foreign:
        names = ", ".join(sorted(p.name for p in foreign)[:5])
        raise RunDirError(
            f"--overwrite: the run directory {path} also holds files this library did not "
            f"write ({names}), so nothing in it is deleted; move them elsewhere, or choose "
            "another --out (checkpoints_folder) for the run"
        )
    if dry_run:
        return
    state = path / "state.json"
    for p in entries:
        if p == state:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    state.unlink()
    _fsync_dir(path)


class RunLock:
    """One writer per run directory: a non-blocking ``flock`` on ``DIR/.srlm-lock``.

    The lock belongs to the open file, so it ends with its process (a crash or kill
    never leaves a stale lock). The file records the holder's pid, host and start time,
    which a refused process names in its message."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock at once or raise :class:`RunDirError` naming the holder."""
        import fcntl

        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _explain(exc, self.path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise _explain(exc, self.path) from exc
            raise RunDirError(
                f"{self.path.parent} is in use by another run ({self.holder()}); one process "
                "(one launch) writes a run directory at a time. Wait for that run to end, "
                "or choose another --out (checkpoints_folder)"
            ) from None
        info = {"pid": os.getpid(), "host": _HOST, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    def check_free(self) -> None:
        """Raise :class:`RunDirError` at once if another process holds the lock (a quick
        look before expensive set-up; :meth:`acquire` is what takes it)."""
        if self._fd is not None or not self.path.is_file():
            return
        self.acquire()
        self.release()

    def holder(self) -> str:
        """Who holds (or last held) the lock, as recorded in the lock file."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        """Give the lock up (the lock file stays)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None


class JsonlStore:
    """Append-only JSONL file of records with unique ``id`` fields.

    >>> store = JsonlStore(path)          # doctest: +SKIP
    >>> store.append({"id": "p0", ...})   # written, flushed and fsynced at once
    >>> "p0" in store                     # True, also after a restart
    """

    #: the field that makes a record unique (subclasses key records by another field)
    key_field = "id"

    def __init__(self, path: str | Path, *, fsync: bool = True, repair: bool = True) -> None:
        """``repair=False`` only reads (a torn last line is skipped, not cut off): for the
        ranks of a launch that do not write the file."""
        self.path = Path(path)
        self.fsync = fsync
        self.writable = repair
        self._records: list[dict] = []
        self._by_key: dict[Any, dict] = {}
        self._cut: int | None = None  # truncate the file to this size before the next write
        if self.path.exists():
            self._repair_and_load(repair)

    def _repair_and_load(self, repair: bool) -> None:
        # a crash mid-append leaves a last line without its newline: cut it off, so the
        # next append starts on a clean line
        with open(self.path, "rb") as f:
            raw = f.read()
        if repair and raw and not raw.endswith(b"\n"):
            cut = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
        for r in read_jsonl(self.path):
            self._add(r)

    def _add(self, record: dict) -> bool:
        """Keep ``record`` in memory unless its key is already there (a duplicate can only
        come from outside; it is ignored on read). Returns whether it was kept."""
        key = record.get(self.key_field)
        if key in self._by_key:
            return False
        if key is not None:
            self._by_key[key] = record
        self._records.append(record)
        return True

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._by_key

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict]:
        return iter(list(self._records))

    @property
    def records(self) -> list[dict]:
        return list(self._records)

    @property
    def ids(self) -> set[str]:
        return set(self._by_key)

    def append(self, record: dict) -> bool:
        """Append ``record`` (must have an ``id``); returns False if that id is already stored."""
        return self.extend([record]) == 1

    def extend(self, records: Iterable[dict]) -> int:
        """Append the records whose ids are new, in one flushed write; returns how many."""
        if not self.writable:
            raise RuntimeError(f"{self.path} was opened read-only (repair=False)")
        fresh: dict[Any, dict] = {}
        for r in records:
            rid = r.get(self.key_field)
            if rid is None:
                raise ValueError(f"every stored record needs an {self.key_field!r} field")
            if rid not in self._by_key:
                fresh.setdefault(rid, r)
        if not fresh:
            return 0
        data = "".join(
            json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in fresh.values()
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._cut is not None:  # a torn last line (or, to start over, everything)
                with open(self.path, "r+b") as f:
                    f.truncate(self._cut)
                self._cut = None
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
        except OSError as exc:
            raise _explain(exc, self.path) from exc
        for r in fresh.values():
            self._add(r)
        return len(fresh)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return str(obj)
