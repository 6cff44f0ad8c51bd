"""Chunked stage work across processes: the chunks left to make are dealt round-robin to
the ranks, and every rank sees each round's records in chunk order, so the files a stage
writes do not depend on the number of processes (the preference, Meta-Rewarding, EFT-build
and head-to-head stages all make their records this way)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["deal_rounds"]


def deal_rounds(
    accelerator: Any,
    todo: list[int],
    work: Callable[[int], list[dict]],
    *,
    stop: Callable[[], bool] | None = None,
) -> Iterator[list[list[dict]]]:
    """``work(c)`` for every chunk ``c`` of ``todo``, in rounds of one chunk per process
    (rank ``r`` makes ``todo[start + r]``); yields each round's parts on every rank, one
    list of records per chunk made, in chunk order. ``stop()`` is asked before each round
    (every rank must give the same answer): true ends the work before the next round."""
    world, rank = accelerator.num_processes, accelerator.process_index
    for start in range(0, len(todo), world):
        if stop is not None and stop():
            return
        mine = todo[start + rank] if start + rank < len(todo) else None
        made = [] if mine is None else [(mine, work(mine))]
        if world > 1:
            from accelerate.utils import gather_object

            made = sorted(gather_object(made), key=lambda item: item[0])
        yield [records for _, records in made]
