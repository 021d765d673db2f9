"""TIES sign election ("consensus"), shared by ties, dare_ties, della, breadcrumbs_ties and sce.

Yadav et al. 2023 (arXiv:2306.01708), §3 "Elect" and "Disjoint merge", with mergekit's ``sum``
consensus: the elected sign of each parameter is that of the summed (already weighted) task vectors,
s = sign(Σ_i x_i) with a zero sum counted as +; model i takes part in parameter j iff
sign(x_ij) = s_j. An exactly zero entry (e.g. one trimmed away) never agrees, so it is excluded both
from the sum and from the divisor of a disjoint mean.
"""
from __future__ import annotations

import torch


def elected_sign(stacked: torch.Tensor) -> torch.Tensor:
    """s = +1 where Σ_i x_i ≥ 0, else −1, for x stacked along dimension 0 (dtype of the input)."""
    return torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)


def sign_agreement_mask(stacked: torch.Tensor) -> torch.Tensor:
    """Boolean [N, …] mask m_i = [sign(x_i) = s] with s = :func:`elected_sign` (zeros never agree)."""
    return stacked.sign() == elected_sign(stacked)
