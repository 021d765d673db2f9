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
least float32. :func:`inner`, :func:`norm`, :func:`exp`, :func:`log` and :func:`dist` take ``cache``, an
:class:`EighCache` through which a solver reuses the eigendecomposition of the point B across calls
(the second point C of Log and the distance is decomposed on every call).
"""
from __future__ import annotations

import torch

from karcher_lab import checks
from karcher_lab.errors import ManifoldError, NonFiniteError, ShapeMismatchError
from karcher_lab.geometry.numerics import all_finite, result_dtype

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
    if not all_finite(b):
        raise NonFiniteError(f"{name} contains NaN or Inf")


class EighCache:
    """Checked eigendecompositions of the SPD points a solver visits, reused across calls.

    An iterative solver asks for one point's eigendecomposition many times per step (inner products,
    projections, Exp, Log). Pass one cache as ``cache=`` to the functions of this module and of
    :mod:`~karcher_lab.geometry.lowrank` for the duration of one solve: :func:`eigh_spd` then computes
    (λ, P) of a tensor once and returns the stored result while the tensor is unmodified.

    Parameters
    ----------
    size : int
        Number of tensors kept; the least recently used entry is dropped first.

    Notes
    -----
    Entries are keyed by the tensor's identity and its version counter, which every in-place write
    increments, and hold a reference to the tensor, so an identity is not reused while its entry lives
    and a hit is exact. A cache belongs to one solve on one thread: it is not safe to share between
    threads. Do not modify the returned tensors in place.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = checks.check_count("size", size)
        self._entries: dict[int, tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def eigh(self, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ, P) of ``b`` as :func:`eigh_spd`, from the cache when ``b`` is stored and unmodified."""
        try:
            version = b._version
        except (AttributeError, RuntimeError):  # not a tensor (rejected by the check), or an inference tensor
            return _checked_eigh(b, name)
        entry = self._entries.pop(id(b), None)
        if entry is None or entry[1] != version:
            entry = (b, version, _checked_eigh(b, name))
        self._entries[id(b)] = entry  # most recently used last
        while len(self._entries) > self.size:
            del self._entries[next(iter(self._entries))]
        return entry[2]


def eigh_spd(b: torch.Tensor, name: str = "B", *, cache: EighCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that ``b`` is SPD and return its float64 eigendecomposition B = P diag(λ) Pᵀ.

    Parameters
    ----------
    b : torch.Tensor, shape [..., r, r]
        Symmetric (to ``SYMMETRY_RTOL``) positive definite matrices.
    name : str
        Name of ``b`` in error messages.
    cache : EighCache, optional
        Reuse the result of an earlier call on the same, unmodified tensor.

    Returns
    -------
    lam : torch.Tensor, float64 [..., r]
        Eigenvalues, ascending.
    p : torch.Tensor, float64 [..., r, r]
        Orthonormal eigenvectors (columns).

    Raises
    ------
    ManifoldError
        ``b`` is not symmetric or not positive definite (NonFiniteError for NaN/Inf, ShapeMismatchError
        unless square).
    """
    if cache is not None:
        return cache.eigh(b, name)
    return _checked_eigh(b, name)


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
    if not all_finite(xi):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    return sym(xi.to(torch.float64))


def inner(b: torch.Tensor, xi: torch.Tensor, eta: torch.Tensor, *, cache: EighCache | None = None) -> torch.Tensor:
    """⟨ξ, η⟩_B = tr(B⁻¹ ξ B⁻¹ η) (paper §2), over the batch axes."""
    lam, p = eigh_spd(b, cache=cache)
    xt = p.mT @ _tangent(xi, b, "xi") @ p
    et = p.mT @ _tangent(eta, b, "eta") @ p
    inv = 1.0 / lam
    out = (xt * et * inv.unsqueeze(-1) * inv.unsqueeze(-2)).sum(dim=(-2, -1))
    return out.to(result_dtype(b, xi, eta))


def norm(b: torch.Tensor, xi: torch.Tensor, *, cache: EighCache | None = None) -> torch.Tensor:
    """‖ξ‖_B = ‖B^-½ ξ B^-½‖_F."""
    lam, p = eigh_spd(b, cache=cache)
    isq = lam.rsqrt()
    xt = (p.mT @ _tangent(xi, b, "xi") @ p) * isq.unsqueeze(-1) * isq.unsqueeze(-2)
    return xt.norm(dim=(-2, -1)).to(result_dtype(b, xi))


def exp(b: torch.Tensor, xi: torch.Tensor, *, cache: EighCache | None = None) -> torch.Tensor:
    """Exp_B(ξ) = B^½ expm(B^-½ ξ B^-½) B^½ (eq. 4a); SPD for every symmetric ξ (S++ is complete)."""
    lam, p = eigh_spd(b, cache=cache)
    half = _from_eig(p, lam.sqrt())
    ihalf = _from_eig(p, lam.rsqrt())
    mu, q = torch.linalg.eigh(sym(ihalf @ _tangent(xi, b, "xi") @ ihalf))
    out = sym(half @ _from_eig(q, mu.exp()) @ half)
    return out.to(result_dtype(b, xi))


def _relative_eig(b: torch.Tensor, c: torch.Tensor, cache: EighCache | None):
    """(λ, P) of B and (μ, Q) of B^-½ C B^-½ (μ = the eigenvalues of B⁻¹C), after checking both points."""
    lam, p = eigh_spd(b, "B", cache=cache)
    eigh_spd(c, "C")
    ihalf = _from_eig(p, lam.rsqrt())
    mu, q = torch.linalg.eigh(sym(ihalf @ c.to(torch.float64) @ ihalf))
    return lam, p, mu, q


def log(b: torch.Tensor, c: torch.Tensor, *, cache: EighCache | None = None) -> torch.Tensor:
    """Log_B(C) = B^½ logm(B^-½ C B^-½) B^½ (eq. 4b), the symmetric tangent at B pointing to C, ‖·‖_B = d(B, C)."""
    lam, p, mu, q = _relative_eig(b, c, cache)
    half = _from_eig(p, lam.sqrt())
    return sym(half @ _from_eig(q, mu.log()) @ half).to(result_dtype(b, c))


def dist(b: torch.Tensor, c: torch.Tensor, *, cache: EighCache | None = None) -> torch.Tensor:
    """d(B, C) = ‖logm(B^-½ C B^-½)‖_F = (Σ_k log² μ_k(B⁻¹C))^½, over the batch axes."""
    mu = _relative_eig(b, c, cache)[2]
    return mu.log().norm(dim=-1).to(result_dtype(b, c))
