"""Typed configs: dict -> dataclass with errors that teach (:mod:`.core`), the sections
of a ``srlm run`` file (:mod:`.run`), reading and checking one (:mod:`.load`) and
``key=value`` overrides (:mod:`.overrides`).

The run-config names load on first use, so modules that only need :class:`ConfigError`
(e.g. ``judge.config``, which :mod:`.run` itself builds on) import this package freely.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core import ConfigError, from_dict, to_dict
from .core import _convert as _convert  # the value rules, shared with the stage checks
from .core import _type_name as _type_name

_LAZY = {
    **dict.fromkeys(
        (
            "AccelerateConfig",
            "DataSource",
            "JudgeSpec",
            "LoRAConfig",
            "ModelConfig",
            "RewardConfigSpec",
            "RunConfig",
            "TokenizerConfig",
        ),
        "run",
    ),
    **dict.fromkeys(
        (
            "BUILTIN_TRACKERS",
            "build_stages",
            "load_run_config",
            "load_yaml",
            "parse_run_config",
            "resolve_object",
        ),
        "load",
    ),
    **dict.fromkeys(("apply_overrides", "parse_override"), "overrides"),
}

__all__ = ["ConfigError", "from_dict", "to_dict", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
