"""mergekit's ``multislerp``: barycentric "interpolation on the hypersphere" of N models, one step.

What it computes, in closed form: the normalized weighted mean of the models' unit directions, scaled
to the weighted mean of their norms (the extrinsic, or projected, mean on the sphere). The iterated
intrinsic mean is ``karcher``.
"""
from __future__ import annotations

import math

import torch

from karcher_lab.errors import AntipodalError, ParameterError
from karcher_lab.checks import where
from karcher_lab.methods.linear import weighted_sum
from karcher_lab.methods.registry import Param, register


def cancellation_tolerance(weights: torch.Tensor, dtype: torch.dtype) -> float:
    """Rounding noise in s = Σ wi ui: each entry carries up to about N ulps of Σ wi |ui|, so a ‖s‖ below
    4 N u Σ wi (u the dtype's machine epsilon) is a cancellation whose direction is rounding noise."""
    return 4 * len(weights) * torch.finfo(dtype).eps * float(weights.sum())


@register(
    "multislerp",
    summary="Normalized weighted mean of unit directions × weighted mean norm (mergekit's one-step multislerp).",
    params=(
        Param("normalize_weights", bool, True, doc="divide the weights by their sum"),
        Param("eps", float, 1e-8, doc="padding of norms and the degeneracy threshold (> 0)"),
    ),
    base="optional",
    weights="nonnegative",
    min_models=1,
    paper="Goddard, multislerp (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
)
def multislerp(
    tensors: list[torch.Tensor],
    *,
    weights: torch.Tensor,
    base: torch.Tensor | None,
    name: str | None,
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """x* = cos(ε) · m · Σ wi ‖xi‖ (+ θ0), m = s/‖s‖, s = Σ wi xi/(‖xi‖ + ε), on whole flattened tensors.

    xi = θi, or δi = θi − θ0 with a base; wi are the weights, divided by Σ wi when
    ``normalize_weights`` (default). A single model is returned unchanged (as mergekit does).

    mergekit semantics: mergekit's steps are ui = xi/(‖xi‖ + ε), m = normalize(Σ wi ui), a "tangent"
    τ = Σ wi (ui − ⟨ui, m⟩ m), out = (cos(‖τ‖ + ε) m + sin(‖τ‖ + ε) τ/(‖τ‖ + ε)) Σ wi‖xi‖. Because m
    is parallel to Σ wi ui, τ = Σ wi ui − ⟨Σ wi ui, m⟩ m = 0 identically, so the step reduces exactly to
    the formula above (checked against mergekit 0.1.5 in float64: relative difference ≤ 1e-15 for
    N = 2, 3, 5 with and without a base). It is not one Karcher (Log-map) step and equals SLERP only
    at t ∈ {0, ½, 1} for two equal-norm inputs. Where the directions cancel (‖s‖ small, below): two
    models fall back to Σ wi xi (+ θ0) as in mergekit; more raise AntipodalError.

    Deviations: (1) cancellation is ‖s‖ < max(ε, 4 N u Σ wi), u the compute dtype's machine epsilon
    (about 1e-6 for two float32 models), not only ‖s‖ < ε: in float32 an exactly cancelling pair such
    as (a, −2a) leaves ‖s‖ ≈ 3e-8 > ε of rounding noise, and mergekit then normalizes that noise into
    the output direction (checked on mergekit 0.1.5: cos(out, a) = −0.83 for that pair, instead of
    its documented linear fallback −a/2). (2) If every model with positive weight has ‖xi‖ ≤ ε (e.g.
    a parameter no fine-tune changed, so all task vectors are zero), we return Σ wi xi (+ θ0), i.e.
    the base for zero task vectors; mergekit raises "the weighted sum of the input tensors is zero"
    there for N ≥ 3.
    """
    if not eps > 0:
        raise ParameterError(f"{where(name)}multislerp: parameter 'eps' must be > 0, got {eps}")
    if len(tensors) == 1:
        return tensors[0]
    w = weights / weights.sum() if normalize_weights else weights
    xs = [(x if base is None else x - base).reshape(-1) for x in tensors]
    norms = torch.stack([torch.linalg.vector_norm(x).double() for x in xs])
    direction = weighted_sum(xs, [wi / (ni + eps) for wi, ni in zip(w.tolist(), norms.tolist())])
    direction_norm = float(torch.linalg.vector_norm(direction))
    if direction_norm < max(eps, cancellation_tolerance(w, direction.dtype)):
        if len(xs) > 2 and bool((norms[w > 0] > eps).any()):
            raise AntipodalError(
                f"{where(name)}multislerp: the weighted directions of the {len(xs)} models cancel "
                f"(‖Σ wi xi/‖xi‖‖ = {direction_norm:.3g} < eps = {eps:g}), so there is no mean direction; "
                "the models are (nearly) antipodal for these weights: change the weights"
            )
        out = weighted_sum(xs, w.tolist())
    else:
        out = direction.mul_(math.cos(eps) * float(w @ norms) / direction_norm)
    out = out.reshape(tensors[0].shape)
    return out if base is None else base + out
