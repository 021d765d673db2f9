"""Linear merge (model soup): a weighted average of the models' tensors.

Wortsman et al. 2022, "Model soups" (arXiv:2203.05482); mergekit's ``linear``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from karcher_lab.errors import WeightError
from karcher_lab.checks import where
from karcher_lab.methods.registry import Param, register

CANCELLING_WEIGHTS_RTOL = 1e-9
"""With ``normalize``, weights whose sum is at most this fraction of Σ|wi| count as summing to zero."""


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """Σ ci xi, accumulated in place into one new tensor (no stacked copies)."""
    out = torch.zeros_like(tensors[0])
    for x, c in zip(tensors, coefficients):
        out.add_(x, alpha=c)
    return out


@register(
    "linear",
    summary="Weighted average Σ wi θi / Σ wi (model soup).",
    params=(
        Param("normalize", bool, True, doc="divide by the sum of the weights"),
    ),
    base="unused",
    weights="any",
    min_models=1,
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
)
def linear(tensors: list[torch.Tensor], *, weights: torch.Tensor, name: str | None, normalize: bool) -> torch.Tensor:
    """θ* = Σ wi θi / Σ wi (``normalize``, the default) or Σ wi θi (``normalize: false``).

    mergekit semantics: ``weight`` is per model and may be negative (extrapolation); the base model is
    not special (mergekit merges it as one more input when it is listed among the models; here ``base``
    is ignored). Deviation: mergekit divides by Σ wi unguarded, so weights that cancel (e.g. 1 and −1)
    give Inf/NaN or a huge tensor; here a sum within 1e-9·Σ|wi| of zero raises WeightError.
    """
    total = float(weights.sum())
    if normalize and abs(total) <= CANCELLING_WEIGHTS_RTOL * float(weights.abs().sum()):
        raise WeightError(
            f"{where(name)}linear: the weights {weights.tolist()} sum to zero, so they cannot be "
            "normalized; change the weights or set normalize: false"
        )
    out = weighted_sum(tensors, weights.tolist())
    if normalize:
        out.div_(total)
    return out
