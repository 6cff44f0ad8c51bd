"""Small helpers shared across the package: eval mode, seeds and generators, chunking."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["chunks", "derive_seed", "eval_mode", "make_generator", "with_overrides"]

C = TypeVar("C")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's previous mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def derive_seed(*parts: Any) -> int:
    """A 60-bit seed from ``parts`` (their ``str`` joined with ``/``, hashed with SHA-256):
    stable across runs, machines and Python versions, and independent for different parts."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:15], 16)


def make_generator(
    seed_or_generator: torch.Generator | int | None, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """A ``torch.Generator`` as given (used as is), a new one on ``device`` seeded with an
    int, or None for None."""
    if seed_or_generator is None or isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    if isinstance(seed_or_generator, int) and not isinstance(seed_or_generator, bool):
        return torch.Generator(device=device).manual_seed(seed_or_generator)
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None, got {seed_or_generator!r}"
    )


def chunks(costs: Sequence[int], batch_size: int | None, token_budget: int | None) -> list[range]:
    """Consecutive index ranges with at most ``batch_size`` items and ``token_budget`` cost
    (an item costing more than the budget gets a range of its own)."""
    out: list[range] = []
    start, total = 0, 0
    for i, c in enumerate(costs):
        full = batch_size is not None and i - start >= batch_size
        over = token_budget is not None and i > start and total + c > token_budget
        if full or over:
            out.append(range(start, i))
            start, total = i, 0
        total += c
    if start < len(costs):
        out.append(range(start, len(costs)))
    return out


def with_overrides(cls: type[C], config: C | None, overrides: dict[str, Any], *, owner: str) -> C:
    """``config`` (an instance of the dataclass ``cls``; None: its defaults) with the fields
    named in ``overrides`` replaced; a TypeError for another type or an unknown field."""
    names = [f.name for f in dataclasses.fields(cls)]
    if config is not None and not isinstance(config, cls):
        raise TypeError(
            f"{owner}: config must be a {cls.__name__}, got {type(config).__name__}; pass "
            f"settings as keyword arguments or {cls.__name__}(...)"
        )
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(
            f"{owner} got unknown setting(s) {unknown}; valid {cls.__name__} fields are {names}"
        )
    return dataclasses.replace(config if config is not None else cls(), **overrides)
