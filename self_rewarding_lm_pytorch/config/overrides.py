"""``key=value`` overrides of a YAML mapping (``srlm run CONFIG seed=3 stages.1.trainer.beta=0.2``).

A key is a dotted path into the mapping; list entries are numbered from 0
(``stages.1.beta``) and a value is read as YAML (``x=null``, ``x=[1, 2]``, ``x=0.5``).
Each path is checked against the config dataclass at that place (a stage against the
dataclass of its ``kind``, a stage's ``trainer:`` against its trainer's config class), so a
misspelt key is refused, naming the valid keys, before the file is parsed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

from .core import ConfigError

__all__ = ["apply_overrides", "parse_override"]

_ANY = object()  # a place whose keys no dataclass describes (xtransformers:, adam_kwargs:)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` as ``(["a", "b"], 1)`` (the value read as YAML)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {text!r} is not KEY=VALUE with a dotted KEY (e.g. seed=3, "
            "stages.1.trainer.beta=0.2)"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        for a in args:  # a section (dataclass) or a container wins over a scalar
            if dataclasses.is_dataclass(a) or get_origin(a) in (list, dict):
                return a
        return args[0] if len(args) == 1 else _ANY
    return tp


def _child_schema(schema: Any, value: Any) -> Any:
    """What describes the entries of a list or mapping typed ``schema``."""
    args = get_args(schema)
    if get_origin(schema) is list:
        return _strip_optional(args[0]) if args else _ANY
    if get_origin(schema) is dict:
        return _strip_optional(args[1]) if len(args) == 2 else _ANY
    return _ANY


def _stage_schema(stage: Any) -> Any:
    from ..pipeline import STAGE_TYPES

    kind = stage.get("kind") if isinstance(stage, dict) else None
    return STAGE_TYPES.get(kind, _ANY) if isinstance(kind, str) else _ANY


def _trainer_schema(stage_schema: Any) -> Any:
    """The config class of a stage dataclass's trainer (its ``trainer:`` keys), if it has one."""
    from ..pipeline.stages import STAGE_TRAINERS

    trainer = STAGE_TRAINERS.get(stage_schema)
    return trainer.config_class if trainer is not None else _ANY


def _keys(schema: type) -> list[str]:
    """The keys a config dataclass takes: its fields, or a trainer config's accepted keys
    (its fields and their aliases)."""
    accepted = getattr(schema, "accepted_keys", None)
    return accepted() if accepted else [f.name for f in dataclasses.fields(schema) if f.init]


def _field_schema(schema: type, key: str) -> Any:
    """What describes the value of ``key`` in dataclass ``schema`` (an alias: its field's)."""
    name = getattr(schema, "aliases", {}).get(key, key)
    hints = typing.get_type_hints(schema)
    return _strip_optional(hints[name]) if name in hints else _ANY


def _refuse_key(text: str, where: str, key: str, valid: Sequence[str], what: str) -> None:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"override {text!r}: {what} has no key {key!r} at {where!r}{hint} "
        f"(valid keys: {', '.join(sorted(valid))})"
    )


def _apply(data: dict, path: list[str], value: Any, text: str, root: type) -> None:
    node: Any = data
    schema: Any = root
    stage_list = in_stage = False
    trainer_of: str | None = None  # the kind of the stage whose trainer: this is
    for depth, key in enumerate(path):
        where = ".".join(path[: depth + 1])
        last = depth == len(path) - 1
        if isinstance(node, list):
            if not key.lstrip("-").isdigit():
                raise ConfigError(
                    f"override {text!r}: {'.'.join(path[:depth]) or 'the config'} is a list; "
                    f"give an entry number 0-{len(node) - 1} instead of {key!r}"
                )
            index = int(key)
            if not 0 <= index < len(node):
                raise ConfigError(
                    f"override {text!r}: {where}: index {index} is out of range; "
                    f"{'.'.join(path[:depth])} has {len(node)} entries (0-{len(node) - 1})"
                )
            schema = _stage_schema(node[index]) if stage_list else _child_schema(schema, None)
            in_stage, stage_list = stage_list, False
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            parent = ".".join(path[:depth])
            raise ConfigError(
                f"override {text!r}: {parent} is a value ({node!r}), not a mapping with keys"
            )
        if dataclasses.is_dataclass(schema):
            valid = _keys(schema)
            if key not in valid:
                what = f"a stage of kind {node.get('kind')!r}" if in_stage else schema.__name__
                if trainer_of is not None:
                    what = f"the trainer: of a stage of kind {trainer_of!r} ({schema.__name__})"
                _refuse_key(text, where, key, valid, what)
            stage_list = schema is root and key == "stages"
            trainer_of = node.get("kind") if in_stage and key == "trainer" else None
            stage_schema, in_stage = (schema if in_stage else None), False
            schema = _field_schema(schema, key)
            if trainer_of is not None:
                schema = _trainer_schema(stage_schema)
            elif stage_schema is not None and key == "generation":  # a partial generation:
                from ..generation.selection import BackendConfig

                schema = BackendConfig
        elif get_origin(schema) is dict:
            if key not in node and not last:
                defined = ", ".join(sorted(map(str, node))) or "none"
                raise ConfigError(
                    f"override {text!r}: {'.'.join(path[:depth])} has no entry {key!r} "
                    f"(defined: {defined}); define it in the config file"
                )
            schema = _child_schema(schema, None)
        else:
            schema = _ANY
        if last:
            node[key] = value
            return
        if isinstance(schema, type) and not dataclasses.is_dataclass(schema):
            raise ConfigError(
                f"override {text!r}: {where} is a value ({schema.__name__}), not a mapping "
                "with keys; set it as a whole"
            )
        if node.get(key) is None:
            node[key] = {}  # an omitted section (e.g. reward_config) starts empty
        node = node[key]


def apply_overrides(data: Any, overrides: Sequence[str], root: type | None = None) -> Any:
    """A copy of the YAML mapping ``data`` with each ``KEY=VALUE`` of ``overrides`` set,
    checked against the dataclass ``root`` (default: :class:`~.run.RunConfig`)."""
    if not overrides:
        return data
    if root is None:
        from .run import RunConfig

        root = RunConfig
    if not isinstance(data, dict):
        raise ConfigError("overrides need a config that is a mapping of keys (model:, ...)")
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        _apply(data, path, value, text, root)
    return data
