"""The trainers' side of accelerate and torch: building the accelerator and the optimizer
(torch AdamW or bitsandbytes' 8-bit AdamW), gradient checkpointing, sharded (optionally
length-grouped) data loaders, dropout during training, and taking back from a shared
accelerator what one trainer prepared on it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import checkpoint
from torch.utils.data import DataLoader

from ..data import ListDataset
from ..models import detect_kind, is_peft_model
from .schedules import length_bucketed_batches, length_grouped_batches
from .sharding import _decoder_layers

__all__ = [
    "enable_gradient_checkpointing",
    "forget_prepared",
    "make_accelerator",
    "make_loader",
    "make_optimizer",
    "set_dropout",
]

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


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "adamw":
        return torch.optim.AdamW
    if name != "adamw8bit":
        raise ValueError(f"optimizer must be 'adamw' or 'adamw8bit', got {name!r}")
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(
            "trainer optimizer 'adamw8bit' needs bitsandbytes: pip install "
            "'self-rewarding-lm-pytorch[bnb]' (or bitsandbytes>=0.50.2), or use optimizer: "
            f"adamw ({exc})"
        ) from None
    return bnb.optim.AdamW8bit


def make_optimizer(
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    adam_kwargs: dict[str, Any] | None,
    optimizer: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW (``optimizer``: ``"adamw"`` torch's, ``"adamw8bit"`` bitsandbytes' with 8-bit
    m and v) over the trainable parameters; weight decay on matrices only."""
    cls = _optimizer_class(optimizer)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay}]
    no_decay = [p for p in params if p.ndim < 2]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    try:
        return cls(groups, lr=lr, **(adam_kwargs or {}))
    except TypeError as exc:
        raise TypeError(
            f"trainer adam_kwargs: {cls.__module__}.{cls.__name__} rejected {adam_kwargs}: "
            f"{exc}; pass only that class's keyword arguments"
        ) from None


def _checkpointed_forward(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``forward`` under activation checkpointing when it builds a graph for training."""
    module = getattr(forward, "__self__", None)
    training = module.training if isinstance(module, nn.Module) else True
    if not (training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    # no early stop: the recomputation runs to the end of the layer (stopping it raises an
    # exception inside the layer, which libraries such as einx re-raise as their own)
    with checkpoint.set_checkpoint_early_stop(False):
        return checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer's activations in the backward pass instead of keeping
    them (non-reentrant ``torch.utils.checkpoint``). Hugging Face models (PEFT-wrapped too)
    use their own ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
    in older transformers); x-transformers and other modules get each repeated block's
    forward wrapped (the blocks ``shard_model`` shards). Forwards in eval mode or without
    gradients (generation, reference passes) are not affected."""
    kind = detect_kind(model)
    if kind == "hf":
        base = model.get_base_model() if is_peft_model(model) else model
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"trainer gradient_checkpointing: {type(base).__name__} does not support "
                "gradient checkpointing in transformers; set gradient_checkpointing: false"
            )
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # newer transformers' name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(
            f"trainer gradient_checkpointing: found no repeated decoder layers in the {kind} "
            f"model {type(model).__name__} (an nn.ModuleList of blocks); set "
            "gradient_checkpointing: false, or checkpoint its layers in its own forward"
        )
    for layer in layers:
        if not getattr(layer, "_srlm_checkpointed", False):
            layer.forward = functools.partial(_checkpointed_forward, layer.forward)
            layer._srlm_checkpointed = True


def make_loader(
    items: Sequence[Any],
    collate_fn: Callable,
    *,
    shuffle: bool,
    batch_size: int,
    generator: torch.Generator | None,
    lengths: Sequence[int] | None = None,
    boundaries: Sequence[int] = (),
) -> DataLoader:
    """A loader over ``items``; with ``lengths`` (and ``shuffle``), shuffled batches are drawn
    from length-sorted mega-batches of 50 batches, so little compute goes to padding, or,
    with ``boundaries`` too, from the length buckets they bound
    (:func:`~.schedules.length_bucketed_batches`)."""
    if shuffle and lengths is not None:
        if boundaries:
            sampler = length_bucketed_batches(lengths, batch_size, boundaries, generator=generator)
        else:
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
