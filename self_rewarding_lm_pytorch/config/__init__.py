"""Typed configs: dict -> dataclass with errors that teach (:mod:`.core`), the sections
of a ``srlm run`` file (:mod:`.run`), reading and checking one (:mod:`.load`) and
``key=value`` overrides (:mod:`.overrides`).

The run-config names load on first use, so modules that only need :class:`ConfigError`
(e.g. ``judge.config``, which :mod:`.run` itself builds on) import this package freely.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core import ConfigError, from_dict, renamed_key, to_dict
from .core import _convert as _convert  # the value rules, shared with the stage checks
from .core import _type_name as _type_name

#: the modules whose ``__all__`` names this package exports, loaded on first use
_SUBMODULES = ("run", "load", "overrides")

__all__ = [
    "ConfigError",
    "from_dict",
    "renamed_key",
    "to_dict",
]  # and every name of _SUBMODULES' __all__


def __getattr__(name: str) -> Any:
    for sub in _SUBMODULES:
        module = importlib.import_module(f".{sub}", __name__)
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    names = set(globals())
    for sub in _SUBMODULES:
        names.update(importlib.import_module(f".{sub}", __name__).__all__)
    return sorted(names)
