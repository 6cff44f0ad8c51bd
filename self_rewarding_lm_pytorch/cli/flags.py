"""Command-line flags generated from a config dataclass: one flag per field, with the
field's type, default and ``metadata["help"]``, so a setting is spelled in one place. A
field that is itself a config dataclass gets dotted flags (``--openai.base-url``)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

__all__ = ["add_dataclass_args", "dataclass_from_args", "flag_dests"]

T = TypeVar("T")


def _dest(prefix: str, name: str) -> str:
    return f"{prefix.replace('-', '_')}{name}"


def _fields(cls: type, exclude: Iterable[str]) -> list[dataclasses.Field]:
    skip = set(exclude)
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]


def _scalar(tp: Any) -> tuple[Any, bool]:
    """``(the type without None, whether None is allowed)``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), len(args) < len(get_args(tp))
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    exclude: Iterable[str] = (),
    aliases: dict[str, list[str]] | None = None,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
) -> list[str]:
    """Add one ``--{prefix}{field-name}`` flag per field of dataclass ``cls``: the type
    from the annotation (``int | None`` accepts ``none``), the default from the field,
    the help from ``metadata["help"]``, ``Literal`` as choices, ``bool`` as
    ``--x/--no-x``, ``list[...]`` as several values and ``dict[...]`` as a YAML mapping. ``aliases`` maps a field name to
    extra flag spellings; ``defaults`` / ``helps`` replace a field's default / help for
    this command. Returns the ``argparse`` dests added."""
    hints = typing.get_type_hints(cls)
    dests = []
    for f in _fields(cls, exclude):
        tp, optional = _scalar(hints[f.name])
        if dataclasses.is_dataclass(tp):  # a nested section: --{name}.{field} flags
            dests += add_dataclass_args(parser, tp, prefix=f"{prefix}{f.name}.")
            continue
        flag = "--" + f"{prefix}{f.name}".replace("_", "-")
        names = [flag, *(aliases or {}).get(f.name, [])]
        dest = _dest(prefix, f.name)
        default = (defaults or {}).get(f.name, _default(f))
        text = (helps or {}).get(f.name) or f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": dest, "default": default}
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is list or tp is list:
            inner = (get_args(tp) or (str,))[0]
            kw.update(nargs="+", type=inner)
        elif get_origin(tp) is dict or tp is dict:
            kw.update(type=_mapping, metavar="YAML")
        elif tp in (int, float, str):
            kw["type"] = _none_or(tp) if optional else tp
        text += f" (default: {default})" if default is not None or optional else ""
        parser.add_argument(*names, help=text, **kw)
        dests.append(dest)
    return dests


def _none_or(tp: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else tp(text)

    parse.__name__ = tp.__name__  # argparse names the type in its errors
    return parse


def _mapping(text: str) -> dict[str, Any] | None:
    """A ``dict`` field's flag value: a YAML mapping (``'{top_k: 5}'``) or ``none``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid YAML ({exc})") from None
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a mapping such as '{{top_k: 5}}' (or none), got {text!r}"
        )
    return value


def flag_dests(cls: type, *, prefix: str = "", exclude: Iterable[str] = ()) -> list[str]:
    """The ``argparse`` dests :func:`add_dataclass_args` adds for ``cls``."""
    return [_dest(prefix, f.name) for f in _fields(cls, exclude)]


def dataclass_from_args(
    cls: type[T], args: argparse.Namespace, *, prefix: str = "", exclude: Iterable[str] = ()
) -> T:
    """An instance of ``cls`` from the flags :func:`add_dataclass_args` added (a field
    without a flag, e.g. an excluded one, keeps its default). A nested section that may
    be ``None`` is ``None`` unless one of its flags was set."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in _fields(cls, exclude):
        tp, optional = _scalar(hints[f.name])
        if dataclasses.is_dataclass(tp):
            sub = f"{prefix}{f.name}."
            if not any(hasattr(args, d) for d in flag_dests(tp, prefix=sub)):
                continue
            nested = dataclass_from_args(tp, args, prefix=sub)
            values[f.name] = None if optional and nested == tp() else nested
        elif hasattr(args, _dest(prefix, f.name)):
            values[f.name] = getattr(args, _dest(prefix, f.name))
    return cls(**values)
