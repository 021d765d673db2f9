"""KnOTS: align LoRA updates in one joint SVD basis, then merge their coefficients (Stoica et al. 2024).

KnOTS (arXiv:2410.19735, §4) stacks the N updates of a module side by side and takes one SVD,

    [ΔW_1 | … | ΔW_N] = U Σ [V_1ᵀ | … | V_Nᵀ],    ΔW_i = U Σ V_iᵀ,

so every update is a coefficient matrix V_iᵀ [k, d2] in the shared basis U Σ (k ≤ Σ r_i after dropping
singular values below ``rtol`` · σ_1). A merge method then combines the aligned coefficients,
V_mergedᵀ = merge(V_1ᵀ, …, V_Nᵀ), and the merged update is ΔW = U Σ V_mergedᵀ, of rank ≤ Σ r_i:

- ``knots_ta``: task arithmetic, V_mergedᵀ = λ Σ w_i V_iᵀ (equal to task arithmetic on the ΔW_i);
- ``knots_ties``: TIES (mergekit's semantics, :mod:`karcher_lab.methods.lora.ties`) on the V_iᵀ.

As in KnOTS's reference implementation, the merge acts on the singular-vector coefficients V_iᵀ, not on
Σ V_iᵀ (the two agree for task arithmetic; TIES trims by magnitude, so they differ there).

The SVD is computed in float64 from the factors, never forming [ΔW_1 | … | ΔW_N]: with the thin QR
decompositions [G_1 … G_N] = Q R and H_i = P_i T_i,

    [ΔW_1 | … | ΔW_N] = Q · R diag(T_1ᵀ, …, T_Nᵀ) · diag(P_1ᵀ, …, P_Nᵀ),

and the SVD of the small core C = R diag(T_iᵀ) = Ũ Σ [W̃_1ᵀ | … | W̃_Nᵀ] gives U = Q Ũ, V_iᵀ = W̃_iᵀ P_iᵀ.
"""
from __future__ import annotations

import torch

from karcher_lab.methods.lora.registry import register_lora
from karcher_lab.methods.lora.task_arithmetic import LAMBDA
from karcher_lab.methods.lora.ties import TIES_PARAMS, ties_on
from karcher_lab.methods.registry import Param

RTOL = Param("rtol", float, 1e-5, low=0.0, high=1.0,
             doc="joint singular values at or below rtol · σ_1 are dropped (KnOTS drops s ≤ 1e-5)")


def joint_svd(pairs: list[tuple[torch.Tensor, torch.Tensor]], rtol: float = 1e-5
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(U [d1, k], σ [k], [V_1ᵀ, …, V_Nᵀ] each [k, d2]) in float64, with ΔW_i = U diag(σ) V_iᵀ."""
    q, r = torch.linalg.qr(torch.cat([g.double() for g, _ in pairs], dim=1))
    bases, blocks, start = [], [], 0
    for g, h in pairs:
        p, t = torch.linalg.qr(h.double())
        bases.append(p)
        blocks.append(r[:, start:start + g.shape[1]] @ t.T)
        start += g.shape[1]
    u_core, sigma, wh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    k = max(1, int((sigma > rtol * sigma[0]).sum()))
    coefficients, start = [], 0
    for p in bases:
        coefficients.append(wh[:k, start:start + p.shape[1]] @ p.T)
        start += p.shape[1]
    return q @ u_core[:, :k], sigma[:k], coefficients


def _reconstruct(u, sigma, merged, like: torch.Tensor):
    return (u * sigma).to(like.dtype), merged.T.to(like.dtype).contiguous()


@register_lora("knots_ta", summary="KnOTS: joint-SVD alignment, task arithmetic on the aligned coefficients",
               rank="≤ Σ r_i", params=(LAMBDA, RTOL), weights="any", paper="Stoica et al. 2024, arXiv:2410.19735")
def knots_ta(pairs, *, weights: torch.Tensor, name: str | None = None, **params):
    """U Σ (λ Σ w_i V_iᵀ) (module docstring)."""
    u, sigma, coefficients = joint_svd(pairs, params["rtol"])
    merged = params["lambda"] * sum(float(w) * v for w, v in zip(weights, coefficients))
    return _reconstruct(u, sigma, merged, pairs[0][0])


@register_lora("knots_ties", summary="KnOTS: joint-SVD alignment, TIES on the aligned coefficients",
               rank="≤ Σ r_i", params=(*TIES_PARAMS, RTOL), weights="any", paper="Stoica et al. 2024, arXiv:2410.19735")
def knots_ties(pairs, *, weights: torch.Tensor, name: str | None = None, **params):
    """U Σ TIES(V_1ᵀ, …, V_Nᵀ) (module docstring)."""
    u, sigma, coefficients = joint_svd(pairs, params["rtol"])
    return _reconstruct(u, sigma, ties_on(coefficients, weights, params), pairs[0][0])
