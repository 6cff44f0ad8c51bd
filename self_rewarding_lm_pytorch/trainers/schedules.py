"""Learning-rate schedules (warmup then linear / cosine decay), length-grouped and
length-bucketed batching."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch

__all__ = ["length_bucketed_batches", "length_grouped_batches", "lr_multiplier", "make_scheduler"]


def lr_multiplier(
    step: int,
    *,
    start_lr: float,
    end_lr: float,
    warmup_steps: int,
    decay_steps: int,
    schedule: str,
) -> float:
    """Multiplier of ``start_lr`` for optimizer update number ``step`` (0-based).

    Linear warmup over ``warmup_steps`` updates, then decay from ``start_lr`` to
    ``end_lr`` over ``decay_steps`` updates (``"linear"`` or ``"cosine"``), then constant.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    if schedule == "linear":
        lr = start_lr + (end_lr - start_lr) * progress
    else:
        lr = end_lr + (start_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr / start_lr


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    mega_batch_factor: int = 50,
) -> list[list[int]]:
    """Batches of indices with similar lengths, in random order (HF ``group_by_length``).

    Indices are shuffled, cut into mega-batches of ``mega_batch_factor * batch_size``,
    each sorted by length (longest first), cut into batches; the batch order is shuffled.
    Every index appears exactly once.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = mega_batch_factor * batch_size
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    boundaries: Sequence[int],
    *,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Batches whose rows all lie in one length bucket, in random order (the buckets of
    ``tf.data``'s ``bucket_by_sequence_length``).

    Bucket ``k`` holds the rows with ``boundaries[k - 1] < length <= boundaries[k]`` (the
    last one every row longer than the last boundary). Within a bucket the rows are
    shuffled and cut into batches (the last one may be short); the batch order is
    shuffled. Unlike :func:`length_grouped_batches`, rows of different lengths inside a
    bucket stay mixed, so data sets of similar lengths are still batched together while
    the rare long rows no longer set the padded length of every batch. Every index
    appears exactly once.
    """
    if list(boundaries) != sorted(set(boundaries)):
        raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)}")
    buckets: list[list[int]] = [[] for _ in range(len(boundaries) + 1)]
    for i in torch.randperm(len(lengths), generator=generator).tolist():
        buckets[bisect.bisect_left(boundaries, lengths[i])].append(i)
    batches = [b[i : i + batch_size] for b in buckets for i in range(0, len(b), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    start_lr: float,
    end_lr: float,
    warmup_steps: int,
    decay_steps: int | None,
    schedule: str,
    total_steps: int,
    done_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_multiplier` for a run of ``total_steps`` updates, resumed
    after ``done_steps``; ``decay_steps`` None decays over all updates after the warmup."""
    kw = dict(
        start_lr=start_lr,
        end_lr=end_lr,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps if decay_steps is not None else max(1, total_steps - warmup_steps),
        schedule=schedule,
    )
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", start_lr)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, **kw), last_epoch=done_steps - 1
    )
