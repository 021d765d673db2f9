"""Geometry core: the unit sphere, Karcher means in coefficient space, block layouts, Fisher–Rao on the simplex.

Modules: :mod:`~karcher_lab.geometry.sphere` (Exp, Log, distance, geodesics),
:mod:`~karcher_lab.geometry.karcher_mean` (Gram pass, coefficient-space solver, combining pass, and
``karcher_mean.karcher_mean`` which chains them), :mod:`~karcher_lab.geometry.blocks` (which part of a
tensor is one point), :mod:`~karcher_lab.geometry.simplex` (Fisher–Rao geometry of distributions).
"""
from karcher_lab.geometry import blocks, karcher_mean, simplex, sphere
from karcher_lab.geometry.blocks import BLOCK_GRANULARITIES, BlockLayout, block_layout
from karcher_lab.geometry.karcher_mean import KarcherTrace, combine, gram_matrix, karcher_coefficients
from karcher_lab.geometry.simplex import fr_distance, fr_geodesic, fr_karcher_mean

__all__ = [
    "BLOCK_GRANULARITIES",
    "BlockLayout",
    "KarcherTrace",
    "block_layout",
    "blocks",
    "combine",
    "fr_distance",
    "fr_geodesic",
    "fr_karcher_mean",
    "gram_matrix",
    "karcher_coefficients",
    "karcher_mean",
    "simplex",
    "sphere",
]
