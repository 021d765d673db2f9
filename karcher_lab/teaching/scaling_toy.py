"""The GeoMerge paper's §4 toy: a scalar two-layer linear net f_θ(x) = θ₁θ₂x with a scaling symmetry.

Parameters θ = (θ₁, θ₂) ∈ M = (ℝ*)² (eq. 12); the gauge a ∈ ℝ* acts by θ·a = (aθ₁, θ₂/a) and leaves the
predictor w(θ) = θ₁θ₂ unchanged, so the intrinsic object is the orbit [θ] ∈ M/ℝ*. Everything here is
in closed form:

- the symmetry-invariant metric (eq. 13) g_θ(η, ζ) = θ₂² η₁ζ₁ + θ₁² η₂ζ₂;
- the vertical (orbit) direction v(θ) = (θ₁, −θ₂); η is horizontal iff η₁/θ₁ = η₂/θ₂ (eq. 14);
- horizontal geodesics (eq. 15–16): θ_k(t) = θ_k √(1 + 2βt) with β = η₁/θ₁ = η₂/θ₂, so the
  predictor moves linearly, w(t) = w(0)(1 + 2βt);
- the quotient distance (eq. 17): with w = θ₁θ₂ and s = log|θ₁/θ₂| the metric reads
  g = ½(dw² + w² ds²), flat polar coordinates of radius w and angle s, whose s-shift is the gauge; the
  orbit minimum is d([θ], [κ]) = |w(θ) − w(κ)|/√2 when w(θ), w(κ) have the same sign (the orbits with
  w > 0 and w < 0 lie in different connected components of M/ℝ*);
- the quotient Fréchet mean (eq. 18–19): w* = Σ αᵢ wᵢ, returned as the balanced representative
  (sign(w*)√|w*|, √|w*|) or in the gauge of a reference point;
- the failure the paper points out: the Euclidean mean Σ αᵢ θᵢ and Fisher merging
  (Σ Fᵢ θᵢ) ⊘ (Σ Fᵢ) with the diagonal Fisher Fᵢ = diag(I(θᵢ)) (appendix A, eq. 30:
  I(θ) = S_xx/σ² [[θ₂², θ₁θ₂], [θ₁θ₂, θ₁²]]) depend on the representatives: θ and −θ = θ·(−1) are the
  same function, yet both averages send them to (0, 0), the zero predictor, which is not even in M.

Points are float64 tensors of shape ``[2]`` or ``[N, 2]`` (one point per row).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from karcher_lab import checks
from karcher_lab.errors import InputError, ParameterError


def _points(theta, what: str = "theta") -> torch.Tensor:
    """θ as a float64 tensor [..., 2] with finite, non-zero coordinates (a point of M = (ℝ*)²)."""
    t = torch.as_tensor(theta, dtype=torch.float64)
    if t.ndim == 0 or t.shape[-1] != 2:
        raise InputError(f"{what} must have the two parameters (θ1, θ2) along the last axis, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} contains NaN or Inf")
    if bool((t == 0).any()):
        raise InputError(f"{what} has a zero coordinate: M = (R*)^2 excludes θ1 = 0 and θ2 = 0")
    return t


def _tangent(eta, theta: torch.Tensor, what: str) -> torch.Tensor:
    v = torch.as_tensor(eta, dtype=torch.float64)
    if v.shape != theta.shape:
        raise InputError(f"{what} must have the shape of theta {tuple(theta.shape)}, got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise InputError(f"{what} contains NaN or Inf")
    return v


def _rows(thetas) -> torch.Tensor:
    t = _points(thetas, "thetas")
    if t.ndim != 2 or t.shape[0] == 0:
        raise InputError(f"thetas must be [N, 2] with N >= 1 points, got shape {tuple(t.shape)}")
    return t


def _alpha(weights: Sequence[float] | None, n: int) -> torch.Tensor:
    """α = w / Σ w over the N points (None: equal), checked."""
    return checks.check_weights(weights, n, normalize=True, what="points")


def predictor(theta) -> torch.Tensor:
    """w(θ) = θ₁θ₂, the function f_θ(x) = w x (eq. 12); invariant under the gauge."""
    t = _points(theta)
    return t[..., 0] * t[..., 1]


def gauge(theta, a: float) -> torch.Tensor:
    """θ·a = (aθ₁, θ₂/a), the same function through another representative (a ∈ ℝ*)."""
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a != 0):
        raise ParameterError(f"the gauge a must be a finite non-zero number, got {a!r}")
    t = _points(theta)
    return torch.stack([a * t[..., 0], t[..., 1] / a], dim=-1)


def metric(theta, eta, zeta) -> torch.Tensor:
    """g_θ(η, ζ) = θ₂² η₁ζ₁ + θ₁² η₂ζ₂ (eq. 13)."""
    t = _points(theta)
    e, z = _tangent(eta, t, "eta"), _tangent(zeta, t, "zeta")
    return t[..., 1] ** 2 * e[..., 0] * z[..., 0] + t[..., 0] ** 2 * e[..., 1] * z[..., 1]


def vertical(theta) -> torch.Tensor:
    """v(θ) = d/ds (θ·eˢ)|ₛ₌₀ = (θ₁, −θ₂): the direction along the orbit (changes only the gauge)."""
    t = _points(theta)
    return torch.stack([t[..., 0], -t[..., 1]], dim=-1)


def horizontal_part(theta, eta) -> torch.Tensor:
    """The g-orthogonal projection of η onto the horizontal space {η : η₁/θ₁ = η₂/θ₂} (eq. 14):
    η − g(η, v)/g(v, v) · v, which equals β(θ₁, θ₂) with β = (η₁/θ₁ + η₂/θ₂)/2."""
    t = _points(theta)
    v = vertical(t)
    coef = metric(t, eta, v) / metric(t, v, v)
    return _tangent(eta, t, "eta") - coef.unsqueeze(-1) * v


def horizontal_geodesic(theta, beta: float, t) -> torch.Tensor:
    """γ(t) = θ √(1 + 2βt), the geodesic with horizontal initial velocity β θ (eq. 15), for t with
    1 + 2βt > 0. The ratio θ₁/θ₂ stays fixed and w(γ(t)) = w(θ)(1 + 2βt) (eq. 16). Shape [*t.shape, 2]."""
    p = _points(theta)
    if p.shape != (2,):
        raise InputError(f"horizontal_geodesic takes one point of shape (2,), got {tuple(p.shape)}")
    tt = torch.as_tensor(t, dtype=torch.float64)
    scale = 1 + 2 * float(beta) * tt
    if bool((scale <= 0).any()):
        raise ParameterError(f"horizontal_geodesic: 1 + 2βt must stay positive (β = {beta}); the geodesic "
                             f"reaches the excluded predictor w = 0 at t = {-1 / (2 * float(beta)):.6g}")
    return scale.sqrt().unsqueeze(-1) * p


def quotient_distance(theta, kappa) -> torch.Tensor:
    """d([θ], [κ]) = min_a d(θ, κ·a) = |w(θ) − w(κ)|/√2 (eq. 17, with the constant of the metric of eq. 13).

    Raises ParameterError when the predictors have opposite signs (different components of M/ℝ*: no path)."""
    w, v = predictor(theta), predictor(kappa)
    if bool((w * v < 0).any()):
        raise ParameterError("the two orbits lie in different components of M/R* (predictors of opposite sign): "
                             "no path joins them, the quotient distance is infinite")
    return (w - v).abs() / math.sqrt(2)


def fisher_information(theta, s_xx: float = 1.0, sigma: float = 1.0) -> torch.Tensor:
    """I(θ) = S_xx/σ² [[θ₂², θ₁θ₂], [θ₁θ₂, θ₁²]] for y = θ₁θ₂x + N(0, σ²), S_xx = Σ xᵢ² (appendix A, eq. 30).
    Singular (det = 0): the gauge direction carries no information. Shape [..., 2, 2]."""
    if not (s_xx > 0 and sigma > 0):
        raise ParameterError(f"s_xx and sigma must be positive, got s_xx={s_xx!r}, sigma={sigma!r}")
    t = _points(theta)
    outer = t.flip(-1).unsqueeze(-1) * t.flip(-1).unsqueeze(-2)  # (θ₂, θ₁)ᵀ(θ₂, θ₁)
    return s_xx / sigma**2 * outer


def euclidean_mean(thetas, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Σ αᵢ θᵢ: parameter averaging in the ambient coordinates (representative-dependent)."""
    t = _rows(thetas)
    return _alpha(weights, t.shape[0]) @ t


def fisher_mean(thetas, weights: Sequence[float] | None = None, s_xx: float = 1.0, sigma: float = 1.0) -> torch.Tensor:
    """Fisher merging (Σ αᵢ Fᵢ ⊙ θᵢ) ⊘ (Σ αᵢ Fᵢ) with the diagonal Fisher Fᵢ = diag I(θᵢ) (§5; Matena & Raffel)."""
    t = _rows(thetas)
    alpha = _alpha(weights, t.shape[0]).unsqueeze(-1)
    diag = fisher_information(t, s_xx, sigma).diagonal(dim1=-2, dim2=-1)
    return (alpha * diag * t).sum(0) / (alpha * diag).sum(0)


def quotient_mean(thetas, weights: Sequence[float] | None = None, *, reference=None) -> torch.Tensor:
    """The quotient Fréchet mean (eq. 18–19): the orbit of w* = Σ αᵢ w(θᵢ), as one representative.

    The predictors must share one sign (one component of M/ℝ*; ParameterError otherwise). The
    representative is the balanced one (sign(w*)√|w*|, √|w*|) or, with ``reference``, the point of the
    orbit with the reference's ratio θ₁/θ₂ (on the horizontal geodesic through the reference)."""
    t = _rows(thetas)
    alpha = _alpha(weights, t.shape[0])
    w = predictor(t)
    signs = torch.sign(w[alpha > 0])
    if bool((signs != signs[0]).any()):
        raise ParameterError(f"the predictors {w.tolist()} have mixed signs: they lie in different components of "
                             "M/R*, so their quotient Fréchet mean is not defined")
    mean = float(alpha @ w)
    if reference is None:
        root = math.sqrt(abs(mean))
        return torch.tensor([math.copysign(root, mean), root], dtype=torch.float64)
    ref = _points(reference, "reference")
    if ref.shape != (2,) or float(predictor(ref)) * mean < 0:
        raise ParameterError("reference must be one point (θ1, θ2) whose predictor has the sign of the mean")
    return horizontal_geodesic(ref, 1.0, (mean / float(predictor(ref)) - 1) / 2)
