"""Experiment trackers of ``srlm run``: the built-in ``jsonl`` tracker and the
``Accelerator`` keyword arguments of the ``accelerate:`` section."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config import AccelerateConfig


def _tracker_base() -> type:
    from accelerate.tracking import GeneralTracker

    return GeneralTracker


def JsonlTracker(run_name: str, logging_dir: str | Path) -> Any:  # noqa: N802 (class factory)
    """An accelerate tracker that needs no extra package: appends every ``log`` call to
    ``<logging_dir>/<run_name>/metrics.jsonl`` and the run config to ``config.json``.
    (A factory, so importing this module does not import accelerate.)"""
    base = _tracker_base()

    class _JsonlTracker(base):  # type: ignore[misc, valid-type]
        name = "jsonl"
        requires_logging_directory = True
        main_process_only = True

        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(logging_dir) / run_name
            self.path = self.dir / "metrics.jsonl"

        @property
        def tracker(self) -> Path:
            return self.path

        def start(self) -> None:
            self.dir.mkdir(parents=True, exist_ok=True)

        def store_init_configuration(self, values: dict) -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.json").write_text(json.dumps(values, indent=2, default=str) + "\n")

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

        def finish(self) -> None:
            pass

    return _JsonlTracker()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def _flat_config(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as flat ``a.b.c`` keys with scalar values (what trackers store)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_config(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        out[prefix[:-1]] = json.dumps(obj, default=str)
    else:
        out[prefix[:-1]] = (
            obj if isinstance(obj, (bool, int, float, str)) or obj is None else str(obj)
        )
    return out


def build_accelerate_kwargs(acc: AccelerateConfig, out: str | Path) -> dict[str, Any]:
    """``Accelerator`` keyword arguments from the config (``jsonl`` becomes a tracker object)."""
    kwargs: dict[str, Any] = {"mixed_precision": acc.mixed_precision, "cpu": acc.cpu}
    if acc.trackers:
        project_dir = acc.project_dir or str(Path(out) / "logs")
        trackers: list[Any] = []
        for name in acc.trackers:
            trackers.append(
                JsonlTracker(acc.project_name, project_dir) if name == "jsonl" else name
            )
        kwargs["log_with"] = trackers
        kwargs["project_dir"] = project_dir
    return kwargs
