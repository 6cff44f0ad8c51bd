"""Build typed config dataclasses from plain dicts (YAML) with errors that teach.

``from_dict(cls, data)`` checks every key and value before any work starts: an unknown key
names the closest valid key, a wrong type names the expected type and the key's path.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

__all__ = ["ConfigError", "from_dict", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown or of the wrong type; the message says which and how to fix it."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}: {value!r} is not one of {_type_name(tp)}{hint}")
    if origin in (Union, types.UnionType):
        errors = []
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                # a mapping meant for a config section: its own error is the useful one
                if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                    raise
                errors.append(str(e))
        raise ConfigError(
            f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path=path)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(
            f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, path: str = "") -> T:
    """Construct dataclass ``cls`` from ``data``, validating keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed: dict[str, str] = getattr(cls, "_renamed_keys", {})
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key in renamed and key not in fields:
            raise renamed_key(where, key, renamed[key], value, python=False)
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {where!r}{hint} (valid keys: {valid})")
        kwargs[key] = _convert(value, hints[key], where)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"{path or cls.__name__}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def renamed_key(where: str, old: str, new: str, value: Any, *, python: bool) -> ConfigError:
    """The error for key ``old`` of an earlier version, now (dotted) key ``new``: it names
    the new key and shows how to give ``value`` there, in Python or in YAML."""
    section, _, leaf = new.rpartition(".")
    shown = repr(value) if python else json.dumps(value)
    if not section:
        fix = f"use {new}"
    elif python:
        fix = f"pass {section}={{{leaf!r}: {shown}}}"
    else:
        fix = f"write {section}: {{{leaf}: {shown}}}"
    return ConfigError(f"{where}: {old} is now {new}; {fix}")


def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain dicts/lists, callables and modules shown by name."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return f"<{type(obj).__name__}>"
