"""Geometry core: the unit sphere, Karcher means in coefficient space, block layouts, Fisher–Rao on the simplex."""
from karcher_lab.geometry.blocks import BLOCK_GRANULARITIES, BlockLayout, block_layout
from karcher_lab.geometry.karcher_mean import (
    KarcherTrace,
    combine,
    gram_matrix,
    karcher_coefficients,
    karcher_mean,
)
from karcher_lab.geometry.simplex import fr_distance, fr_geodesic, fr_karcher_mean

__all__ = [
    "BLOCK_GRANULARITIES",
    "BlockLayout",
    "KarcherTrace",
    "block_layout",
    "combine",
    "fr_distance",
    "fr_geodesic",
    "fr_karcher_mean",
    "gram_matrix",
    "karcher_coefficients",
    "karcher_mean",
]
