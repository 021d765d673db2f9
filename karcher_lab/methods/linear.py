"""Linear merge (model soup): a weighted average of the models' tensors.

Wortsman et al. 2022, "Model soups" (arXiv:2203.05482); mergekit's ``linear``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from karcher_lab.errors import WeightError
from karcher_lab.checks import where
from karcher_lab.methods.registry import Param, register

CANCELLING_WEIGHTS_RTOL = 1e-9
"""With ``normalize``, weights whose sum is at most this fraction of Σ|wi| count as summing to zero."""


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """Σ ci xi, accumulated in place into one new tensor (no stacked copies).

    When a product ci xi or a partial sum overflows although the inputs are finite, the sum is
    recomputed as 2^e Σ ci (xi / 2^e), with 2^e ≤ max |xi| < 2^(e+1) a power of two (representable in
    the inputs' dtype; scaling by it is exact), so it overflows only when the result itself, or some
    |ci|·max|xi|, is not representable. Coefficients beyond the dtype's range are applied in float64."""
    largest_coefficient = max(abs(c) for c in coefficients)
    if largest_coefficient > torch.finfo(tensors[0].dtype).max:  # not even representable as a factor
        out64 = torch.zeros_like(tensors[0], dtype=torch.float64)
        for x, c in zip(tensors, coefficients):
            out64.add_(x.double(), alpha=c)
        return out64.to(tensors[0].dtype)
    out = torch.zeros_like(tensors[0])
    for x, c in zip(tensors, coefficients):
        out.add_(x, alpha=c)
    if bool(torch.isfinite(out.sum())) or bool(torch.isfinite(out).all()):
        return out
    largest = max(float(x.abs().max()) for x in tensors)
    if not math.isfinite(largest) or largest == 0.0:
        return out  # non-finite inputs: refused by the caller's checks
    scale = 2.0 ** (math.frexp(largest)[1] - 1)
    out.zero_()
    for x, c in zip(tensors, coefficients):
        out.add_(x / scale, alpha=c)
    return out.mul_(scale)


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

    Overflow: the weights are compared and normalized relative to max|wi| (weights of 1e308 are not
    taken to sum to zero). The sum is computed as mergekit does, Σ wi θi / Σ wi; when that overflows
    (huge weights), it is recomputed as Σ (wi / Σ wj) θi (:func:`weighted_sum`), which is finite whenever
    the inputs are finite and the weighted mean is representable.
    """
    largest = float(weights.abs().max())
    relative = weights / largest if largest > 0 else weights
    relative_total = float(relative.sum())
    if normalize and abs(relative_total) <= CANCELLING_WEIGHTS_RTOL * float(relative.abs().sum()):
        raise WeightError(
            f"{where(name)}linear: the weights {weights.tolist()} sum to zero, so they cannot be "
            "normalized; change the weights or set normalize: false"
        )
    if not normalize:
        return weighted_sum(tensors, weights.tolist())
    total = relative_total * largest
    if math.isfinite(total) and largest <= torch.finfo(tensors[0].dtype).max:
        out = weighted_sum(tensors, weights.tolist()).div_(total)
        if bool(torch.isfinite(out.sum())) or bool(torch.isfinite(out).all()):
            return out
    return weighted_sum(tensors, (relative / relative_total).tolist())
