"""The validation rules every stage config shares: the first failing rule raises a
:class:`~..config.ConfigError` naming the key, the problem and the fix; values are checked
against their annotations; keys renamed in earlier versions are refused by their new name."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from collections.abc import Sequence
from typing import Any

from ..config import ConfigError, renamed_key

#: how a run that cannot resume starts afresh (one spelling in every message that says so)
START_AFRESH = "--overwrite (overwrite=True) or another --out (checkpoints_folder)"


def _refuse_renamed(cls: type) -> type:
    """Make ``cls(old_key=...)`` name the key that replaced ``old_key`` (``cls._renamed_keys``;
    the YAML loader reads the same map)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in sorted(kwargs.keys() & cls._renamed_keys.keys()):
            raise renamed_key(cls.__name__, key, cls._renamed_keys[key], kwargs[key], python=True)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _check(stage: Any, rules: list[tuple[bool, str, str, str]]) -> None:
    """``(ok, key, rule, fix)``: the first rule that fails raises, naming key and value
    (a dotted key names a field of a nested config, e.g. ``judge_settings.top_p``)."""
    for ok, key, rule, fix in rules:
        if not ok:
            value = functools.reduce(getattr, key.split("."), stage)
            raise ConfigError(f"{key} must {rule}, got {value!r}; {fix}")


def _sampling_rules(temperature: float, top_p: float, t_key: str, p_key: str) -> list:
    return [
        (_non_negative(temperature), t_key, "be a finite number >= 0 (0 = greedy)", "use e.g. 0.7"),
        (0 < top_p <= 1, p_key, "lie in (0, 1] (1 disables it)", "use e.g. 0.9"),
    ]


def _did_you_mean(value: Any, valid: Sequence[str]) -> str:
    """``"did you mean 'x'?"`` for the valid name closest to ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def _non_negative(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _check_types(stage: Any) -> None:
    """Each field of a stage config against its annotation (the rules of the YAML loader)."""
    from ..config import _convert

    hints = typing.get_type_hints(type(stage))
    for f in dataclasses.fields(stage):
        if f.name == "pair_strategy":  # a name or a callable: checked by validate()
            continue
        _convert(getattr(stage, f.name), hints[f.name], f.name)
