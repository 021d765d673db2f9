"""TIES on the dense LoRA updates ΔW_i = G_i H_iᵀ, with mergekit's semantics.

TIES (Yadav et al. 2023, arXiv:2306.01708, Alg. 1) trims each update to its ``density`` largest
entries, elects a sign per entry and takes the disjoint mean; it runs here through the tensor method
``merge_tensors("ties")`` on the dense updates with a zero base (mergekit 0.1.5's parameters and
defaults: density 1.0, normalize true, lambda 1.0). Trimming acts entry by entry, so the result is in
general of full rank: it is returned as the factors of its SVD truncated at the numerical rank
(σ_k > max(d1, d2) · ε · σ_1, ε the dtype's machine epsilon), ΔW = (U Σ) Vᵀ.
"""
from __future__ import annotations

import torch

from karcher_lab.methods.api import merge_tensors
from karcher_lab.methods.lora.registry import register_lora
from karcher_lab.methods.registry import get_method

TIES_PARAMS = tuple(p for p in get_method("ties").params if p.name in ("density", "normalize", "lambda"))


def dense_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k Σ_k, V_k) with k the numerical rank of ``delta`` (at least 1): ΔW = G Hᵀ to rounding."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    tol = max(delta.shape) * torch.finfo(delta.dtype).eps * (s[0] if s.numel() else 0.0)
    k = max(1, int((s > tol).sum()))
    return u[:, :k] * s[:k], vh[:k].T.contiguous()


def ties_on(tensors: list[torch.Tensor], weights: torch.Tensor, params: dict) -> torch.Tensor:
    """merge_tensors("ties") of ``tensors`` around a zero base with the given TIES parameters."""
    return merge_tensors("ties", tensors, base=torch.zeros_like(tensors[0]), weights=weights,
                         **{p.name: params[p.name] for p in TIES_PARAMS})


@register_lora("ties", summary="TIES (trim, elect sign, disjoint mean) on the dense ΔWi, refactored by SVD",
               rank="numerical rank of the dense result (typically full)", params=TIES_PARAMS, weights="any",
               paper="Yadav et al. 2023, arXiv:2306.01708")
def lora_ties(pairs, *, weights: torch.Tensor, name: str | None = None, **params):
    """TIES on the dense updates G_i H_iᵀ, returned as SVD factors (module docstring)."""
    return dense_factors(ties_on([g @ h.T for g, h in pairs], weights, params))

