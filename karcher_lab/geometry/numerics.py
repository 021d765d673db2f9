"""Numerical plumbing shared by the matrix-manifold modules (SPD, Stiefel, low-rank quotient).

- :func:`result_dtype`: the manifold maps compute in float64 and return the inputs' dtype promoted to
  at least float32.
- :func:`single_threaded`: the iterative maps (Stiefel log, orbit alignment, GeoMerge) are thousands
  of operations on r×r and 2r×2r matrices, which intra-op threads do not speed up; on a loaded 2-core
  machine their synchronization made them ~50× slower (a batch of three St(30, 4) logs: 3.6 s with 2
  threads, 0.07 s with 1). They run inside this context, which restores the thread count after
  (a call costs ~2 µs).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The promoted dtype of the inputs, at least float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch with one intra-op thread for the duration of the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
