"""The GL(r) gauge symmetry of LoRA factors, and how much a merge method depends on the gauge.

A rank-r update ΔW = G Hᵀ is unchanged by (G, H) → (G A⁻¹, H Aᵀ) for any A ∈ GL(r) (the GeoMerge
paper's §2.2, parameterization (A)). A merge that is a function of the updates alone (geomerge, task
arithmetic, KnOTS) gives the same merged ΔW whichever factors represent the inputs; one that averages
factors (peft's ``linear``) does not. :func:`symmetry_gap` measures that dependence for one input.
"""
from __future__ import annotations

from typing import Sequence

import torch

from karcher_lab.errors import ParameterError
from karcher_lab.methods.lora.api import merge_factor_sets


def gauge_transform(g: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G A⁻¹, H Aᵀ): other factors of the same update G Hᵀ (computed in float64, returned in G's dtype)."""
    a64 = a.double()
    return (torch.linalg.solve(a64.T, g.double().T).T.to(g.dtype), (h.double() @ a64.T).to(h.dtype))


def random_gauge(r: int, condition: float = 4.0, seed: int = 0) -> torch.Tensor:
    """A ∈ GL(r) (float64) with singular values spread evenly over [1/√κ, √κ], κ = ``condition``: Q diag(σ),
    Q a random orthogonal matrix (QR of a seeded Gaussian)."""
    if r < 1 or condition < 1:
        raise ParameterError(f"random_gauge needs r >= 1 and condition >= 1, got r={r}, condition={condition}")
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    half = condition ** 0.5
    return q @ torch.diag(torch.linspace(1 / half, half, r, dtype=torch.float64))


def symmetry_gap(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], method: str, *, index: int = 1,
                 condition: float = 4.0, seed: int = 0, **params) -> float:
    """‖ΔW' − ΔW‖_F / ‖ΔW‖_F, with ΔW the merge of ``pairs`` by ``method`` and ΔW' the merge after input
    ``index``'s factors are replaced by :func:`gauge_transform` with :func:`random_gauge` (same updates).
    0 (to rounding) for a gauge-invariant method."""
    moved = list(pairs)
    g, h = moved[index]
    moved[index] = gauge_transform(g, h, random_gauge(g.shape[1], condition, seed))
    merged = [merge_factor_sets({"w": p}, method, **params)["w"] for p in (pairs, moved)]
    before, after = (g.double() @ h.double().T for g, h in merged)
    return float((after - before).norm() / before.norm())
