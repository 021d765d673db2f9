"""Arcee Fusion: take the fine-tuned model's entries only where its change is an outlier in importance.

mergekit's ``arcee_fusion`` (arcee.ai): importance = |Δ| × the KL divergence between the softmax of the
fine-tuned and the base weights; entries at or above median + 1.5·IQR of the importance are fused.
"""
from __future__ import annotations

import torch

from karcher_lab.methods.registry import register

QUANTILE_SAMPLE_SIZE = 1_000_000
"""Above this many entries the quantiles come from this many entries drawn with replacement (mergekit's
sample size); at or below it they are exact."""
SOFTMAX_EPS = 1e-8
"""Added to both softmax distributions before the KL divergence (mergekit's eps)."""


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """I = |θ1 − θ0| ⊙ KL(p ‖ q) with p = softmax(θ1) + ε, q = softmax(θ0) + ε over the last axis.

    The KL is one number per vector along the last axis (per row of a 2-D weight), broadcast over the
    row. A 1-D tensor (bias, norm scale) is one distribution, so its KL is a single factor common to all
    entries and the selection depends on |θ1 − θ0| alone.
    """
    p = torch.softmax(model, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * kl


def lower_quantiles(values: torch.Tensor, qs: tuple[float, ...], generator: torch.Generator) -> list[torch.Tensor]:
    """The order statistics x_(⌊q (n − 1)⌋) of ``values`` (no interpolation, as mergekit).

    Exact for n ≤ QUANTILE_SAMPLE_SIZE; above, from QUANTILE_SAMPLE_SIZE entries drawn with replacement
    using ``generator`` (mergekit draws them unseeded).
    """
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=generator, device=flat.device)
        flat = flat[picks]
    ordered = flat.sort().values
    return [ordered[int(q * (ordered.numel() - 1))] for q in qs]


@register(
    "arcee_fusion",
    summary="Base plus the model's changes whose importance |Δ|·KL is ≥ median + 1.5·IQR.",
    base="required",
    weights="unused",
    min_models=1,
    max_models=1,
    randomized=True,
    paper="Arcee AI, Arcee Fusion (mergekit arcee_fusion)",
)
def arcee_fusion(tensors: list[torch.Tensor], *, base: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """θ* = θ1 where I ≥ τ, θ0 elsewhere; I from :func:`fusion_importance`, τ = Q2 + 1.5 (Q3 − Q1).

    The quartiles Q1, Q2, Q3 of I are :func:`lower_quantiles`. mergekit semantics otherwise: entries
    are selected by ≥, so when more than three quarters of I is zero (a sparse change) τ = 0 and θ1 is
    taken whole. A change that is constant along a row is invisible to softmax (KL ≈ 0 up to
    rounding), so such rows get near-zero importance.

    Deviation: for tensors above 1e6 entries mergekit estimates the quartiles from an unseeded sample, so
    its output is not reproducible; ours draws the same-size sample from the seeded generator (same
    seed, bit-identical output). At or below 1e6 entries both are exact and agree.
    """
    model = tensors[0]
    importance = fusion_importance(model, base)
    q1, median, q3 = lower_quantiles(importance, (0.25, 0.5, 0.75), generator)
    return torch.where(importance >= median + 1.5 * (q3 - q1), model, base)
