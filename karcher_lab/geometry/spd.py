"""Symmetric positive definite matrices S++(r) with the affine-invariant metric (GeoMerge paper §2, eq. 4).

A point is a symmetric positive definite ``[..., r, r]`` tensor B; leading axes are batch axes (one
matrix per index). Tangent vectors are symmetric ``[..., r, r]`` matrices (only their symmetric part is
used). With B = P diag(λ) Pᵀ (eigh), functions of B are P diag(f(λ)) Pᵀ:

- inner product ⟨ξ, η⟩_B = tr(B⁻¹ ξ B⁻¹ η) = Σ_ij ξ̃_ij η̃_ij / (λ_i λ_j) with ξ̃ = Pᵀ ξ P;
- Exp_B(ξ) = B^½ expm(B^-½ ξ B^-½) B^½  (eq. 4a);
- Log_B(C) = B^½ logm(B^-½ C B^-½) B^½  (eq. 4b);
- d(B, C) = ‖logm(B^-½ C B^-½)‖_F = (Σ_k log² μ_k)^½, μ_k the eigenvalues of B⁻¹C; d(B, C) = d(C, B),
  and d(B, C) = ‖Log_B(C)‖_B;
- the metric is invariant under congruence, ⟨OᵀξO, OᵀηO⟩_{OᵀBO} = ⟨ξ, η⟩_B for O ∈ GL(r), which is
  why the O(r) action of the polar factorization (:mod:`karcher_lab.geometry.lowrank`) is isometric.

Points are checked (:func:`check_spd`: finite, square, symmetric to ``SYMMETRY_RTOL`` relative to the
largest entry, smallest eigenvalue > 0) before any work; violations raise ManifoldError (NonFiniteError
for NaN/Inf). Everything is computed in float64 and returned in the inputs' dtype promoted to at
least float32.
"""
from __future__ import annotations

import torch

from karcher_lab.errors import ManifoldError, NonFiniteError, ShapeMismatchError
from karcher_lab.geometry.numerics import result_dtype

SYMMETRY_RTOL = 1e-6
"""Largest accepted max|B − Bᵀ| / max|B| (float32 round trips of a symmetric matrix stay ~1e-7)."""


def sym(x: torch.Tensor) -> torch.Tensor:
    """Symmetric part (X + Xᵀ)/2 over the last two axes."""
    return 0.5 * (x + x.mT)


def _check_square(b: torch.Tensor, name: str) -> None:
    if not isinstance(b, torch.Tensor) or not b.is_floating_point():
        raise ManifoldError(f"{name} must be a floating-point tensor, got {type(b).__name__}")
    if b.ndim < 2 or b.shape[-1] != b.shape[-2] or b.shape[-1] == 0:
        raise ShapeMismatchError(f"{name} must be a non-empty square matrix [..., r, r], got shape {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")


_LAST_EIGH: tuple = (None, -1, None)
"""(B, B._version, (λ, P)) of the last :func:`eigh_spd` call. Iterative solvers ask for the same point's
eigendecomposition dozens of times per step (inner products, projections, Exp); holding a reference
to B keeps its identity unique, and its version counter changes with every in-place write, so a hit
is exact."""


def eigh_spd(b: torch.Tensor, name: str = "B") -> tuple[torch.Tensor, torch.Tensor]:
    """Check that ``b`` is SPD and return its float64 eigendecomposition (λ ascending, P) with B = P diag(λ) Pᵀ.

    Raises ManifoldError if B is not symmetric (to ``SYMMETRY_RTOL``) or not positive definite. The
    last call's result is reused when called again with the same, unmodified tensor (``_LAST_EIGH``):
    do not modify the returned tensors in place.
    """
    global _LAST_EIGH
    try:
        version = b._version
    except (AttributeError, RuntimeError):  # not a tensor (rejected below), or an inference tensor: no cache
        return _checked_eigh(b, name)
    cached, cached_version, result = _LAST_EIGH
    if cached is b and cached_version == version:
        return result
    result = _checked_eigh(b, name)
    _LAST_EIGH = (b, version, result)
    return result


def _checked_eigh(b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_square(b, name)
    b64 = b.to(torch.float64)
    scale = b64.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)
    asym = ((b64 - b64.mT).abs().amax(dim=(-2, -1)) / scale).max()
    if float(asym) > SYMMETRY_RTOL:
        raise ManifoldError(f"{name} is not symmetric: max|B − Bᵀ|/max|B| = {float(asym):.3g} > {SYMMETRY_RTOL:g}")
    lam, p = torch.linalg.eigh(sym(b64))
    if bool((lam[..., 0] <= 0).any()):
        raise ManifoldError(
            f"{name} is not positive definite: smallest eigenvalue {float(lam[..., 0].min()):.3g} ≤ 0"
        )
    return lam, p


def check_spd(b: torch.Tensor, name: str = "B") -> None:
    """Raise ManifoldError / NonFiniteError / ShapeMismatchError unless ``b`` is a batch of SPD matrices."""
    eigh_spd(b, name)


def _from_eig(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """P diag(values) Pᵀ."""
    return (p * values.unsqueeze(-2)) @ p.mT


def _tangent(xi: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(xi, torch.Tensor) or xi.shape[-2:] != b.shape[-2:]:
        shape = tuple(xi.shape) if isinstance(xi, torch.Tensor) else type(xi).__name__
        raise ShapeMismatchError(f"{name} must have the point's matrix shape {tuple(b.shape[-2:])}, got {shape}")
    if not bool(torch.isfinite(xi).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    return sym(xi.to(torch.float64))


def inner(b: torch.Tensor, xi: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """⟨ξ, η⟩_B = tr(B⁻¹ ξ B⁻¹ η) (paper §2), over the batch axes."""
    lam, p = eigh_spd(b)
    xt = p.mT @ _tangent(xi, b, "xi") @ p
    et = p.mT @ _tangent(eta, b, "eta") @ p
    inv = 1.0 / lam
    out = (xt * et * inv.unsqueeze(-1) * inv.unsqueeze(-2)).sum(dim=(-2, -1))
    return out.to(result_dtype(b, xi, eta))


def norm(b: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """‖ξ‖_B = ‖B^-½ ξ B^-½‖_F."""
    lam, p = eigh_spd(b)
    isq = lam.rsqrt()
    xt = (p.mT @ _tangent(xi, b, "xi") @ p) * isq.unsqueeze(-1) * isq.unsqueeze(-2)
    return xt.norm(dim=(-2, -1)).to(result_dtype(b, xi))


def exp(b: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """Exp_B(ξ) = B^½ expm(B^-½ ξ B^-½) B^½ (eq. 4a); SPD for every symmetric ξ (S++ is complete)."""
    lam, p = eigh_spd(b)
    half = _from_eig(p, lam.sqrt())
    ihalf = _from_eig(p, lam.rsqrt())
    mu, q = torch.linalg.eigh(sym(ihalf @ _tangent(xi, b, "xi") @ ihalf))
    out = sym(half @ _from_eig(q, mu.exp()) @ half)
    return out.to(result_dtype(b, xi))


def _relative_eig(b: torch.Tensor, c: torch.Tensor):
    """(λ, P) of B and (μ, Q) of B^-½ C B^-½ (μ = the eigenvalues of B⁻¹C), after checking both points."""
    lam, p = eigh_spd(b, "B")
    eigh_spd(c, "C")
    ihalf = _from_eig(p, lam.rsqrt())
    mu, q = torch.linalg.eigh(sym(ihalf @ c.to(torch.float64) @ ihalf))
    return lam, p, mu, q


def log(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Log_B(C) = B^½ logm(B^-½ C B^-½) B^½ (eq. 4b), the symmetric tangent at B pointing to C, ‖·‖_B = d(B, C)."""
    lam, p, mu, q = _relative_eig(b, c)
    half = _from_eig(p, lam.sqrt())
    return sym(half @ _from_eig(q, mu.log()) @ half).to(result_dtype(b, c))


def dist(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """d(B, C) = ‖logm(B^-½ C B^-½)‖_F = (Σ_k log² μ_k(B⁻¹C))^½, over the batch axes."""
    mu = _relative_eig(b, c)[2]
    return mu.log().norm(dim=-1).to(result_dtype(b, c))
