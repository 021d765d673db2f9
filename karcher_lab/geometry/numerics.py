"""Numerical plumbing shared by the geometry modules (SPD, Stiefel, low-rank quotient, Karcher passes).

- :func:`result_dtype`: the manifold maps compute in float64 and return the inputs' dtype promoted to
  at least float32.
- :func:`all_finite`: the NaN/Inf check of the maps' inputs, one reduction instead of an entrywise mask.
- :func:`single_threaded`: the iterative maps (Stiefel log, orbit alignment, GeoMerge) consist of many
  small operations on r×r and 2r×2r matrices, which intra-op threads do not speed up while their
  synchronization costs time (much of it on a loaded machine); they run inside this context, which
  sets one intra-op thread and restores the previous count after.
- :func:`run_on_threads`: a streaming pass cut into chunks (the Karcher Gram and combining passes)
  runs its chunks on worker threads, one chunk per worker at a time. Intra-op threads meet at a
  barrier after every operation, so on shared cores each of a chunked pass's many operations waits for
  whichever of its threads the scheduler has set aside; a worker that is set aside delays only its own
  chunk while the others take the next ones.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from typing import Callable, Iterator, Sequence, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite: Σ x is non-finite if an entry is NaN or ±Inf (an Inf entry
    gives ±Inf or NaN), and the entrywise check runs only where the sum is not finite (an overflow of
    finite entries)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the manifold maps return.

    Parameters
    ----------
    *tensors : torch.Tensor
        The inputs of the map (at least one).

    Returns
    -------
    dtype : torch.dtype
        The inputs' promoted dtype, promoted further to at least float32.
    """
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch with one intra-op thread for the duration of the block.

    The previous thread count is restored on exit. Usable as a context manager or, called, as a
    function decorator (``@single_threaded()``).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_on_threads(
    work: Callable[[Item], Result],
    items: Sequence[Item],
    consume: Callable[[Result], None] | None = None,
    *,
    threads: int,
    lookahead: int | None = None,
) -> None:
    """Apply ``work`` to every item on worker threads and hand the results to ``consume`` in item order.

    ``work`` always runs with one intra-op torch thread: on ``threads`` worker threads, each taking the
    next item when it is free, or, with ``threads`` ≤ 1 or fewer than two items, in the calling thread.
    ``consume`` runs in the calling thread, in the order of ``items`` whichever worker computed a
    result, so a reduction over the results does not depend on the thread count or the schedule. The
    torch thread count is restored on return, also after an error (the first error raised by ``work``
    or ``consume`` propagates; items not started by then are dropped).

    Parameters
    ----------
    work : callable
        Maps one item to a result; called from the worker threads (at most ``threads`` at once).
    items : sequence
        The items, e.g. the chunks of a :class:`~karcher_lab.geometry.blocks.BlockLayout`.
    consume : callable, optional
        Called with each result in item order, in the calling thread (default: results are dropped).
    threads : int
        Number of worker threads, e.g. ``torch.get_num_threads()``.
    lookahead : int, optional
        Most items submitted ahead of the next result to consume (at least ``threads``): bounds the
        memory of results waiting for an earlier one. Default: no bound.
    """
    workers = min(threads, len(items))
    if workers <= 1:
        with single_threaded():
            for item in items:
                result = work(item)
                if consume is not None:
                    consume(result)
        return
    window = len(items) if lookahead is None else max(workers, lookahead)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # worker threads take the current count when they first run torch
    try:
        with ThreadPoolExecutor(workers) as pool:
            todo = iter(items)
            pending = deque(pool.submit(work, item) for item in islice(todo, window))
            try:
                while pending:
                    result = pending.popleft().result()
                    pending.extend(pool.submit(work, item) for item in islice(todo, 1))
                    if consume is not None:
                        consume(result)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    finally:
        torch.set_num_threads(before)
