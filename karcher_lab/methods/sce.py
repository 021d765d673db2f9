"""SCE: Select, Calculate, Erase (Wan et al. 2024, FuseChat, arXiv:2408.07990, §3.3), as mergekit 0.1.5.

With task vectors δi = θi − θ0 (i = 1…N) and τ = ``select_topk``:

1. Select (only when τ < 1): keep the positions with the largest variance across models,
   v = Var_i(δi) (population variance); k = int(nnz(v) · τ) of them, the product formed in float32
   as mergekit does (so e.g. nnz = 100, τ = 0.29 gives k = 29, not 28); τ = 0 (or k = 0) keeps none.
   Every δi is multiplied by this mask.
2. Calculate: one weight per model for the whole matrix, ŵi = mean(δi²) / Σk mean(δk²) (uniform 1/N
   when that sum is below 1e-6), computed after the selection.
3. Erase: the TIES sign election on the unweighted δi (:mod:`karcher_lab.methods.consensus`),
   mi = [sign(δi) = sign(Σ δk)].

θ = θ0 + Σ ŵi mi δi / max(Σ ŵi mi, 1e-6). No user weights (mergekit has none); ``int8_mask`` is
accepted for recipe compatibility and ignored (in mergekit it only changes the mask dtype).
"""
from __future__ import annotations

import torch

from karcher_lab.methods.consensus import sign_agreement_mask
from karcher_lab.methods.registry import Param, register
from karcher_lab.methods.sparsify import rank_window_mask
from karcher_lab.methods.stacked import per_model, stack_task_vectors

SCE_WEIGHT_SUM_EPS = 1e-6
"""Below this total mean square the matrix-level weights fall back to uniform."""
SCE_DIVISOR_FLOOR = 1e-6
"""Floor of the per-entry divisor Σ ŵi mi."""


def sce_select_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Boolean mask (shape of one task vector) of the k = int(nnz(v)·τ) largest-variance positions."""
    shape = task_vectors.shape[1:]
    if select_topk >= 1:
        return torch.ones(shape, dtype=torch.bool, device=task_vectors.device)
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(variance).to(torch.float32)
    k = int(nonzero * torch.tensor(select_topk, dtype=torch.float32)) if select_topk > 0 else 0
    return rank_window_mask(variance, 0, k)


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """ŵi = mean(δi²) / Σk mean(δk²), or 1/N each when Σk mean(δk²) < 1e-6."""
    mean_squares = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = mean_squares.sum()
    if abs(float(total)) < SCE_WEIGHT_SUM_EPS:
        return torch.full_like(mean_squares, 1.0 / mean_squares.shape[0])
    return mean_squares / total


def sce_merge(base: torch.Tensor, task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """θ0 + Σ ŵi mi δ'i / max(Σ ŵi mi, 1e-6), δ'i the selected task vectors (module docstring)."""
    selected = task_vectors * sce_select_mask(task_vectors, select_topk)
    agree = sign_agreement_mask(selected)
    w = per_model(sce_weights(selected), selected)
    kept_weights = w * agree
    merged = (selected * kept_weights).sum(dim=0)
    return base + merged / kept_weights.sum(dim=0).clamp(min=SCE_DIVISOR_FLOOR)


@register(
    "sce",
    summary="SCE: variance top-k select, matrix-level weights from mean squares, TIES sign erase",
    params=(
        Param("int8_mask", bool, False, doc="accepted for mergekit compatibility; memory-only there, ignored"),
        Param("select_topk", float, 1.0, low=0.0, high=1.0,
              doc="fraction of (nonzero-variance) positions kept by the variance selection"),
    ),
    base="required",
    weights="unused",
    min_models=1,
    paper="Wan et al. 2024, arXiv:2408.07990",
)
def sce(tensors: list[torch.Tensor], *, base: torch.Tensor, int8_mask: bool, select_topk: float) -> torch.Tensor:
    """SCE merge of one tensor (see the module docstring); ``int8_mask`` is ignored."""
    return sce_merge(base, stack_task_vectors(tensors, base), select_topk)
