"""Numerical plumbing shared by the matrix-manifold modules (SPD, Stiefel, low-rank quotient).

- :func:`result_dtype`: the manifold maps compute in float64 and return the inputs' dtype promoted to
  at least float32.
- :func:`single_threaded`: the iterative maps (Stiefel log, orbit alignment, GeoMerge) consist of many
  small operations on r×r and 2r×2r matrices, which intra-op threads do not speed up while their
  synchronization costs time (much of it on a loaded machine); they run inside this context, which
  sets one intra-op thread and restores the previous count after.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


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
