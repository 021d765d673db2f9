"""Model Stock: interpolate from the base toward the models' average by their agreement.

Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models" (arXiv:2403.19522),
eq. for the interpolation ratio t = N cos θ / (1 + (N − 1) cos θ); mergekit's ``model_stock``.
"""
from __future__ import annotations

import torch

from karcher_lab.methods.registry import Param, register
from karcher_lab.methods.stacked import stack_task_vectors

COSINE_NORM_FLOOR = 1e-6
"""cos(δi, δj) divides by max(‖δi‖‖δj‖, this), as mergekit does; a zero task vector has cosine 0."""


def mean_pairwise_cosine(deltas: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i < j of cos(δi, δj) per row; ``deltas`` is [N, R, L] (N ≥ 2), result float64 [R].

    Computed from the per-row Gram matrices δi·δj (one batched matmul, no pairwise loops).
    """
    n = deltas.shape[0]
    gram = torch.einsum("irl,jrl->rij", deltas, deltas).double()
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    cos = (gram / (norms[:, :, None] * norms[:, None, :]).clamp_min(COSINE_NORM_FLOOR)).clamp(-1, 1)
    upper = torch.triu_indices(n, n, offset=1)
    return cos[:, upper[0], upper[1]].mean(dim=-1)


@register(
    "model_stock",
    summary="θ0 + t·mean(θi − θ0), t = N c/(1 + (N − 1) c) from the mean pairwise cosine c (clamped to ≥ 0).",
    params=(
        Param("filter_wise", bool, False, doc="one ratio t per row (vector along the last axis) instead of per tensor"),
    ),
    base="required",
    weights="unused",
    min_models=2,
    paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
)
def model_stock(tensors: list[torch.Tensor], *, base: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """θ* = t·mean(θi) + (1 − t)·θ0 with t = N c⁺ / (1 + (N − 1) c⁺), c⁺ = max(c, 0).

    c is the mean over model pairs of cos(δi, δj), δi = θi − θ0, taken over the whole flattened tensor,
    or, with ``filter_wise``, per vector along the last axis (each row of a 2-D weight; a 1-D tensor is
    one row). Weights are not used (as in mergekit).

    Deviation: mergekit does not clamp c, so models whose task vectors disagree (c < 0) give t < 0,
    an extrapolation from the base away from the models, and t → −∞ as 1 + (N − 1) c → 0 (mergekit
    keeps the base only where |1 + (N − 1) c| < 1e-6). Checked by running mergekit 0.1.5: two task
    vectors 120° apart (c = −0.5) give t = −2, and three with c ≈ −0.49 give t ≈ −11268. The paper's
    ratio is an interpolation, t ∈ [0, 1]; clamping c to ≥ 0 gives exactly that (t = 0, the base, for
    disagreeing models; t is increasing in c ∈ [0, 1]), and leaves every c ≥ 0 result unchanged.
    """
    rows = (-1, base.shape[-1]) if filter_wise and base.dim() >= 2 else (1, -1)
    n = len(tensors)
    deltas = stack_task_vectors(tensors, base).reshape(n, *rows)
    c = mean_pairwise_cosine(deltas).clamp_min(0.0)
    t = (n * c / (1.0 + (n - 1) * c)).to(deltas.dtype)
    return base + (t[:, None] * deltas.mean(dim=0)).reshape(base.shape)
