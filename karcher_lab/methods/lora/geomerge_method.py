"""``geomerge`` as a LoRA merge method: the quotient Fréchet mean of :func:`geomerge_factors`.

GeoMerge (the paper's §2.2 and §3, eq. 10–11) averages the updates ΔW_i = G_i H_iᵀ on the quotient of
the polar factorizations (U, B, V) by O(r), so the merged update does not depend on which factors
(G_i A⁻¹, H_i Aᵀ), A ∈ GL(r), represent each ΔW_i; its rank is the adapters' common rank r. The
geometry and the solver live in :mod:`karcher_lab.methods.lora.geomerge`; this module only registers
the method, with that function's own parameter defaults, and its batched form over modules
(:func:`karcher_lab.methods.lora.geomerge_batched.geomerge_modules`: the same result per module), which
:func:`karcher_lab.methods.lora.merge_factor_sets` uses. Fréchet weights are non-negative and used
normalized to sum 1.
"""
from __future__ import annotations

import inspect

import torch

from karcher_lab.methods.lora.geomerge import geomerge_factors
from karcher_lab.methods.lora.geomerge_batched import geomerge_modules
from karcher_lab.methods.lora.registry import register_lora
from karcher_lab.methods.registry import Param

_DEFAULTS = {name: p.default for name, p in inspect.signature(geomerge_factors).parameters.items()}

GEOMERGE_PARAMS = (
    Param("eta", float, _DEFAULTS["eta"], low=0.0, high=1.0, doc="Riemannian gradient step size in (0, 1] (eq. 11)"),
    Param("max_iter", int, _DEFAULTS["max_iter"], low=1, doc="iteration cap of the Fréchet-mean solver"),
    Param("tol", float, _DEFAULTS["tol"], low=0.0, doc="stop when the horizontal gradient norm falls below tol"),
    Param("init", str, _DEFAULTS["init"], choices=("mean", "first"),
          doc="start: rank-r SVD of the weighted mean ΔW, or the heaviest input"),
    Param("geodesic", bool, _DEFAULTS["geodesic"],
          doc="two adapters: start on the quotient geodesic, where their mean lies (False: iterate from init)"),
)


def geomerge_batch(modules, *, weights: torch.Tensor, names=None, device=None, **params):
    """:func:`karcher_lab.methods.lora.geomerge_batched.geomerge_modules` on many modules' factors."""
    return geomerge_modules(modules, weights / weights.sum(), names=names, device=device, **params)


@register_lora("geomerge", summary="GeoMerge: quotient Fréchet mean of the polar factors (U, B, V) / O(r)",
               rank="r (the adapters' common rank)", params=GEOMERGE_PARAMS, equal_ranks=True,
               weights="nonnegative", paper="GeoMerge (Fréchet averages on quotient manifolds), §3, eq. 10–11",
               batch_fn=geomerge_batch)
def geomerge(pairs, *, weights: torch.Tensor, name: str | None = None, **params):
    """:func:`karcher_lab.methods.lora.geomerge.geomerge_factors` on one module's factors."""
    return geomerge_factors(pairs, weights / weights.sum(), **params)
