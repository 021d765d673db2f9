"""Block granularity: which part of a weight tensor is one point on the sphere.

A *block* is the unit that gets normalized onto the sphere and averaged (the paper's §3.4: "we treat
each parameter block ... as a vector and normalize it to the unit sphere"). Three granularities:

- ``'tensor'``: the whole tensor, flattened, is one point (the paper's and mergekit's choice).
- ``'row'``: each slice along axis 0 is its own point (for a 2-D weight ``[out, in]``: one point per
  output unit; trailing axes of a higher-dimensional tensor are flattened into the point).
- ``'column'``: each slice along axis 1 is its own point (for ``[out, in]``: one point per input
  feature; axis 0 and any trailing axes are flattened into the point).

A 0-D or 1-D tensor is a single block for every granularity.

Every layout is described as a view ``[P, B, Q]`` of the (contiguous) tensor: ``B`` indexes blocks
and block ``b`` is the ``P·Q`` entries ``x[:, b, :]``. ``tensor`` is ``[1, 1, numel]``, ``row`` is
``[1, rows, rest]``, ``column`` is ``[rows, cols, rest]``. :meth:`BlockLayout.chunks` cuts the view
into memory-contiguous pieces of bounded size, so that Gram matrices and combinations can be
streamed through the cache without copying whole tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterator

import torch

from karcher_lab.errors import ParameterError

BLOCK_GRANULARITIES: tuple[str, ...] = ("tensor", "row", "column")
"""The accepted values of the ``block`` parameter."""

Chunk = tuple[slice, slice, slice]
"""Index of one piece of a ``[P, B, Q]`` view: (P range, B range, Q range)."""


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of ``shape`` splits into ``blocks`` points of ``outer * inner`` entries each."""

    granularity: str
    shape: torch.Size
    outer: int
    blocks: int
    inner: int

    @property
    def block_size(self) -> int:
        """Dimension of the space each block lives in (the sphere is S^(block_size - 1))."""
        return self.outer * self.inner

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the ``[P, B, Q]`` view (a copy only if ``x`` is not contiguous)."""
        if x.shape != self.shape:
            raise ParameterError(f"tensor of shape {tuple(x.shape)} does not match layout {tuple(self.shape)}")
        return x.contiguous().view(self.outer, self.blocks, self.inner)

    def chunks(self, max_elems: int) -> Iterator[Chunk]:
        """Memory-contiguous pieces of the ``[P, B, Q]`` view with at most ``max_elems`` entries
        (at least one entry), covering it exactly once.

        Whole ``[B, Q]`` planes are grouped when they fit (column blocks: a few rows of the weight
        at a time); otherwise runs of whole blocks within one plane (row blocks); otherwise a block is
        cut along ``Q`` (tensor blocks, and very long rows).
        """
        budget = max(1, int(max_elems))
        P, B, Q = self.outer, self.blocks, self.inner
        if P * B * Q == 0:
            return
        if B * Q <= budget:
            step = budget // (B * Q)
            for p0 in range(0, P, step):
                yield slice(p0, min(P, p0 + step)), slice(0, B), slice(0, Q)
        elif Q <= budget:
            step = budget // Q
            for p in range(P):
                for b0 in range(0, B, step):
                    yield slice(p, p + 1), slice(b0, min(B, b0 + step)), slice(0, Q)
        else:
            for p in range(P):
                for b in range(B):
                    for q0 in range(0, Q, budget):
                        yield slice(p, p + 1), slice(b, b + 1), slice(q0, min(Q, q0 + budget))


def block_layout(shape: torch.Size | tuple[int, ...], block: str = "tensor") -> BlockLayout:
    """The :class:`BlockLayout` of a tensor of ``shape`` under granularity ``block``.

    Raises ParameterError for an unknown granularity name.
    """
    if block not in BLOCK_GRANULARITIES:
        raise ParameterError(f"unknown block granularity {block!r}; choose one of {list(BLOCK_GRANULARITIES)}")
    shape = torch.Size(shape)
    numel = prod(shape)
    if len(shape) <= 1 or block == "tensor":
        return BlockLayout(block, shape, 1, 1, numel)
    if block == "row":
        return BlockLayout(block, shape, 1, shape[0], numel // shape[0] if shape[0] else 0)
    rest = prod(shape[2:])
    return BlockLayout(block, shape, shape[0], shape[1], rest)
