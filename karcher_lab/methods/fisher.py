"""Fisher-weighted averaging with given per-model diagonal Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging" (arXiv:2111.09832), eq. 3.
Estimating the Fisher from data is separate; this merge takes the Fisher tensors as inputs.
"""
from __future__ import annotations

import torch

from karcher_lab.errors import NonFiniteError, ParameterError, ShapeMismatchError
from karcher_lab.checks import where
from karcher_lab.methods.registry import REQUIRED, Param, register


def check_fishers(fishers: list, shape: torch.Size, name: str | None, *, floor: float, method: str) -> None:
    """The floor is > 0 and every Fisher is a tensor of the models' shape, finite and non-negative;
    raise otherwise (``method`` names the merge method in the floor's message)."""
    if not floor > 0:
        raise ParameterError(f"{where(name)}{method}: parameter 'fisher_floor' must be > 0, got {floor}")
    label = f"{where(name)}fisher:"
    for i, f in enumerate(fishers):
        if not isinstance(f, torch.Tensor):
            raise ParameterError(f"{label} the Fisher of model {i} is a {type(f).__name__}, not a torch.Tensor")
        if f.shape != shape:
            raise ShapeMismatchError(
                f"{label} the Fisher of model {i} has shape {tuple(f.shape)} but the models have {tuple(shape)}"
            )
        if not bool(torch.isfinite(f).all()):
            raise NonFiniteError(f"{label} the Fisher of model {i} contains NaN or Inf values")
        if bool((f < 0).any()):
            raise ParameterError(
                f"{label} the Fisher of model {i} has {int((f < 0).sum())} negative entries; "
                "a diagonal Fisher (a mean of squared gradients) is non-negative"
            )


@register(
    "fisher",
    summary="Fisher-weighted average Σ λi Fi θi / Σ λi Fi with per-model diagonal Fishers.",
    params=(
        Param("fisher", object, REQUIRED, per_model=True,
              doc="per-model diagonal Fisher tensors, each of the merged tensor's shape"),
        Param("fisher_floor", float, 1e-6, doc="lower bound applied to every Fisher entry (> 0)"),
    ),
    base="unused",
    weights="nonnegative",
    min_models=1,
    paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)",
)
def fisher_merge(
    tensors: list[torch.Tensor],
    *,
    weights: torch.Tensor,
    name: str | None,
    fisher: list,
    fisher_floor: float,
) -> torch.Tensor:
    """θ* = Σ λi F̃i ⊙ θi / Σ λi F̃i, F̃i = max(Fi, fisher_floor), per entry (Matena & Raffel eq. 3).

    λi are the per-model weights (1 each by default). The floor keeps entries where every Fisher
    vanishes well defined (there the result is the λ-weighted mean); as it also bounds small Fishers
    from below, it should be small relative to the Fisher's scale. With equal Fishers the result is the
    λ-weighted mean Σ λi θi / Σ λi. Not in mergekit.
    """
    check_fishers(fisher, tensors[0].shape, name, floor=fisher_floor, method="fisher")
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for x, f, lam in zip(tensors, fisher, weights.tolist()):
        weighted = f.to(device=x.device, dtype=x.dtype).clamp_min(fisher_floor).mul_(lam)
        numerator.addcmul_(weighted, x)
        denominator.add_(weighted)
    return numerator.div_(denominator)
