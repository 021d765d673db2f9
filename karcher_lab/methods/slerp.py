"""Spherical linear interpolation of two models: mergekit's ``slerp`` and ``nuslerp``.

SLERP (Shoemake 1985) between vectors a and b at fraction t, with Ω the angle between them::

    slerp(t; a, b) = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b,    cos Ω = ⟨a, b⟩ / (‖a‖ ‖b‖)

applied to the unnormalized vectors (equal norms stay on their sphere; unequal ones are mixed too).
Where the angle is degenerate the formula falls back to the chord (1 − t) a + t b (``lerp``).
"""
from __future__ import annotations

from typing import Callable

import torch

from karcher_lab.methods.registry import REQUIRED, Param, register

SLERP_LERP_ABOVE = 0.9995
"""slerp interpolates linearly where |cos Ω| exceeds this (mergekit's ``dot_threshold``)."""
SLERP_NORM_EPS = 1e-8
"""slerp: a tensor with norm at most this has no direction (mergekit's ``eps``)."""
NUSLERP_NORM_EPS = 1e-7
"""nuslerp: a vector with norm at most this has no direction (mergekit's normalization clamp)."""
NUSLERP_CANCELLING_RTOL = 1e-9
"""nuslerp: weights whose sum is at most this fraction of Σ|wi| cancel, and give t = 0.5."""
NUSLERP_SIN_EPS = 1e-8
"""nuslerp interpolates linearly where sin² Ω = 1 − cos² Ω is at most this squared (mergekit's ``eps``)."""


def cosines(a: torch.Tensor, b: torch.Tensor, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vector along the last axis: (cos Ω as float64 [..., 1], whether both norms exceed norm_eps)."""
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    dot = (a * b).sum(dim=-1, keepdim=True)
    cos = (dot.double() / (na.double() * nb.double()).clamp_min(norm_eps * norm_eps)).clamp(-1.0, 1.0)
    return cos, (na > norm_eps) & (nb > norm_eps)


def slerp_vectors(
    a: torch.Tensor, b: torch.Tensor, t: float, cos: torch.Tensor, lerp: torch.Tensor
) -> torch.Tensor:
    """slerp(t; a, b) per vector along the last axis, given cos Ω; (1 − t) a + t b where ``lerp``.

    The coefficients sin((1 − t) Ω)/sin Ω and sin(t Ω)/sin Ω are computed in float64.
    """
    omega = torch.acos(torch.where(lerp, 0.0, cos))  # Ω = π/2 on the discarded branch keeps it finite
    sin_omega = torch.sin(omega)
    coef_a = torch.where(lerp, 1.0 - t, torch.sin((1.0 - t) * omega) / sin_omega)
    coef_b = torch.where(lerp, t, torch.sin(t * omega) / sin_omega)
    return coef_a.to(a.dtype) * a + coef_b.to(b.dtype) * b


@register(
    "slerp",
    summary="Spherical interpolation between two models (t = 0 gives the first, the base in recipes).",
    params=(
        Param("t", float, REQUIRED, doc="interpolation fraction: 0 gives tensors[0], 1 gives tensors[1]",
              low=0.0, high=1.0),
    ),
    base="first",
    weights="unused",
    min_models=2,
    max_models=2,
    paper="Shoemake 1985, Animating rotation with quaternion curves",
)
def slerp(tensors: list[torch.Tensor], *, t: float) -> torch.Tensor:
    """slerp(t; θ0, θ1) on the whole flattened tensor; t = 0 gives tensors[0], t = 1 gives tensors[1].

    mergekit semantics: its ``slerp`` needs ``base_model`` plus exactly one other model and interpolates
    from the base (t = 0) to the other (t = 1); here the two tensors come in that order (the recipe
    layer passes [base, other]). Where |cos Ω| > 0.9995 (nearly collinear, and also nearly antipodal,
    where the great circle is not unique) it uses (1 − t) θ0 + t θ1, as mergekit does.

    Deviation: where either tensor has norm ≤ 1e-8 (no direction) we interpolate linearly; mergekit
    instead treats the zero tensor as orthogonal to the other, giving sin(tπ/2)·θ1 for θ0 = 0 (0.707·θ1
    at t = 0.5, checked by running mergekit 0.1.5), which depends on nothing but that artefact.
    """
    a, b = tensors[0].reshape(-1), tensors[1].reshape(-1)
    cos, has_direction = cosines(a, b, SLERP_NORM_EPS)
    lerp = ~has_direction | (cos.abs() > SLERP_LERP_ABOVE)
    return slerp_vectors(a, b, t, cos, lerp).reshape(tensors[0].shape)


def _as_vectors(
    x: torch.Tensor, flatten: bool, row_wise: bool
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The vectors nuslerp interpolates, along the last axis (the whole tensor, each x[..., :] or each
    x[:, ...]), and the map that puts a result in that layout back into x's shape."""
    if flatten or x.dim() < 2:
        return x.reshape(-1), lambda v: v.reshape(x.shape)
    if row_wise:
        return x.transpose(0, -1), lambda v: v.transpose(0, -1)
    return x, lambda v: v


@register(
    "nuslerp",
    summary="SLERP at t = w2/(w1 + w2) (0.5 when the weights cancel), per tensor, row or column, optionally of task vectors.",
    params=(
        Param("nuslerp_flatten", bool, True, doc="interpolate the whole tensor as one vector"),
        Param("nuslerp_row_wise", bool, False,
              doc="without flattening: interpolate the vectors along the first axis instead of the last"),
    ),
    base="optional",
    weights="any",
    min_models=2,
    max_models=2,
    paper="mergekit nuslerp",
)
def nuslerp(
    tensors: list[torch.Tensor],
    *,
    weights: torch.Tensor,
    base: torch.Tensor | None,
    nuslerp_flatten: bool,
    nuslerp_row_wise: bool,
) -> torch.Tensor:
    """slerp(t; x1, x2) with t = w2/(w1 + w2); with a base, θ0 + slerp(t; θ1 − θ0, θ2 − θ0).

    mergekit semantics: ``nuslerp_flatten`` (default true) treats the tensor as one vector. With
    ``nuslerp_flatten: false`` every vector x[..., :] along the last axis (each row of a 2-D weight) is
    interpolated on its own, and ``nuslerp_row_wise: true`` switches to the vectors x[:, ...] along the
    first axis (each column of a 2-D weight); a 1-D tensor is one vector either way. It falls back to
    (1 − t) x1 + t x2 only where sin² Ω ≤ 1e-16 (exactly collinear or antipodal in float32), so nearly
    antipodal pairs follow their (ill-conditioned) great circle, as in mergekit.

    Deviations: where either vector has norm ≤ 1e-7 we interpolate linearly, whereas mergekit divides by
    1e-7 instead of the norm, which for a zero vector (e.g. an untouched parameter's task vector) gives
    sin(tπ/2)·x2 (checked: 0.7071·δ2 at t = 0.5 in mergekit 0.1.5).

    Weights, as in mergekit: any sign; t = w2/(w1 + w2), which lies outside [0, 1] (extrapolation along
    the great circle) when the weights differ in sign, and t = 0.5 (the spherical midpoint) when the
    weights cancel, |w1 + w2| ≤ 1e-9 (|w1| + |w2|), e.g. −0.5 and 0.5 (mergekit's own test). Deviation:
    mergekit also takes t = 0.5 for small positive weights (w1 + w2 < 1e-6); we keep their ratio.
    All-zero weights are refused.
    """
    w1, w2 = weights.tolist()
    cancel = abs(w1 + w2) <= NUSLERP_CANCELLING_RTOL * (abs(w1) + abs(w2))
    t = 0.5 if cancel else w2 / (w1 + w2)
    xs = tensors if base is None else [x - base for x in tensors]
    a, restore = _as_vectors(xs[0], nuslerp_flatten, nuslerp_row_wise)
    b, _ = _as_vectors(xs[1], nuslerp_flatten, nuslerp_row_wise)
    cos, has_direction = cosines(a, b, NUSLERP_NORM_EPS)
    lerp = ~has_direction | (1.0 - cos.square() <= NUSLERP_SIN_EPS**2)
    out = restore(slerp_vectors(a, b, t, cos, lerp))
    return out if base is None else base + out
