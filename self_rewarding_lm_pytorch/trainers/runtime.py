"""The trainers' side of accelerate and torch: building the accelerator and AdamW, sharded
(optionally length-grouped) data loaders, dropout during training, and taking back from a
shared accelerator what one trainer prepared on it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import ListDataset
from .schedules import length_grouped_batches

__all__ = ["forget_prepared", "make_accelerator", "make_loader", "make_optimizer", "set_dropout"]

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def make_accelerator(
    accelerator: Any, accelerate_kwargs: dict[str, Any] | None, project_name: str
) -> tuple[Any, bool]:
    """``(accelerator, owns_trackers)``: the given one, or one built from the kwargs (its
    trackers started when ``log_with`` is set)."""
    if accelerator is not None and accelerate_kwargs:
        raise ValueError(
            "pass either accelerator or accelerate_kwargs, not both (the kwargs would be ignored)"
        )
    if accelerator is not None:
        return accelerator, False
    from accelerate import Accelerator

    accelerator = Accelerator(**(accelerate_kwargs or {}))
    if (accelerate_kwargs or {}).get("log_with") is not None:
        accelerator.init_trackers(project_name)
        return accelerator, True
    return accelerator, False


def make_optimizer(
    module: nn.Module, *, lr: float, weight_decay: float, adam_kwargs: dict[str, Any] | None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay}]
    no_decay = [p for p in params if p.ndim < 2]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, **(adam_kwargs or {}))


def make_loader(
    items: Sequence[Any],
    collate_fn: Callable,
    *,
    shuffle: bool,
    batch_size: int,
    generator: torch.Generator | None,
    lengths: Sequence[int] | None = None,
) -> DataLoader:
    """A loader over ``items``; with ``lengths`` (and ``shuffle``), shuffled batches are drawn
    from length-sorted mega-batches of 50 batches, so little compute goes to padding."""
    if shuffle and lengths is not None:
        sampler = length_grouped_batches(lengths, batch_size, generator=generator)
        return DataLoader(ListDataset(items), batch_sampler=sampler, collate_fn=collate_fn)
    return DataLoader(
        ListDataset(items),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        collate_fn=collate_fn,
        generator=generator,
    )


@contextlib.contextmanager
def set_dropout(module: nn.Module, p: float | None) -> Iterator[None]:
    """Every dropout module's ``p`` set to ``p`` inside the block (None: left as is)."""
    saved: list[tuple[nn.Module, float]] = []
    if p is not None:
        for m in module.modules():
            if isinstance(m, _DROPOUT_TYPES):
                saved.append((m, m.p))
                m.p = p
    try:
        yield
    finally:
        for m, old in saved:
            m.p = old


def forget_prepared(accelerator: Any, objects: Iterable[Any]) -> None:
    """Remove ``objects`` (models, optimizers, loaders one trainer prepared) from the
    accelerator's lists, leaving anything else prepared on a shared accelerator alone."""
    mine = {id(obj) for obj in objects}
    gradient_state = getattr(accelerator, "gradient_state", None)
    refs = getattr(gradient_state, "dataloader_references", None) or []
    for loader in [r for r in refs if id(r) in mine]:
        loader.end()  # a loop left before its end stays registered as active otherwise
    for name in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
        held = getattr(accelerator, name, None)
        if isinstance(held, list):
            held[:] = [obj for obj in held if id(obj) not in mine]
