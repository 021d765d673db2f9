"""Fisher–Rao geometry of categorical distributions, through the square-root map onto a sphere.

The Fisher information metric on the open probability simplex is g_p(u, v) = Σ_k u_k v_k / p_k.
The map φ(p) = 2√p sends the simplex isometrically onto the positive orthant of the sphere of
radius 2, so every Fisher–Rao quantity is a spherical one (reference: geometry-and-diagnostics.md):

- d_FR(p, q) = 2 arccos Σ_k √(p_k q_k)  (twice the angle between √p and √q); locally
  d_FR² ≈ 2 KL(p ‖ q), the paper's eq. 1 link between function distance and KL.
- the FR geodesic is γ(t) = s(t)², where s is the great-circle arc from √p to √q; it stays in the
  simplex for t ∈ [0, 1] (the positive orthant of the sphere is geodesically convex).
- the weighted FR Karcher mean is the squared spherical Karcher mean of the √p_i (unique: the
  points lie in one open hemisphere).

Distributions lie along the last axis; leading axes are batch axes (one distribution per index).
Inputs are checked to be finite, non-negative and to sum to 1 (within ``SUM_TOL``); √p is then
projected exactly onto the unit sphere.
"""
from __future__ import annotations

from typing import Sequence

import torch

from karcher_lab.errors import InputError, ParameterError, ShapeMismatchError
from karcher_lab.geometry import sphere
from karcher_lab.geometry.karcher_mean import KarcherTrace, karcher_mean

SUM_TOL = 1e-4
"""Largest accepted |Σ_k p_k − 1| (float32 softmax outputs over large vocabularies drift by ~1e-5)."""


def _sqrt_point(p: torch.Tensor, what: str) -> torch.Tensor:
    """√p normalized to unit length along the last axis, after checking that p is a distribution."""
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor of probabilities")
    if p.ndim == 0 or p.shape[-1] == 0:
        raise InputError(f"{what} must have the categories along a non-empty last axis, got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise InputError(f"{what} contains NaN or Inf")
    if bool((p < 0).any()):
        raise InputError(f"{what} has negative entries (min {float(p.min()):.3g}); probabilities must be >= 0")
    sums = p.to(torch.float64).sum(-1)
    worst = float((sums - 1).abs().max())
    if worst > SUM_TOL:
        raise InputError(
            f"{what} is not a probability distribution along the last axis: a row sums to "
            f"{float(sums.flatten()[(sums - 1).abs().flatten().argmax()]):.6g} (|sum - 1| > {SUM_TOL:g})"
        )
    root = p.to(torch.promote_types(p.dtype, torch.float32)).sqrt()
    return root / root.norm(dim=-1, keepdim=True)


def _pair(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sp, sq = _sqrt_point(p, "p"), _sqrt_point(q, "q")
    if sp.shape != sq.shape:
        raise ShapeMismatchError(f"p has shape {tuple(p.shape)} but q has {tuple(q.shape)}")
    return sp, sq


def fr_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d_FR(p, q) = 2 arccos Σ_k √(p_k q_k) ∈ [0, π], one value per distribution (shape ``p.shape[:-1]``).

    Evaluated as 2 × the spherical distance of √p and √q (accurate also for nearby p, q).
    """
    sp, sq = _pair(p, q)
    return 2.0 * sphere.dist(sp, sq, batch_dims=sp.ndim - 1)


def fr_geodesic(p: torch.Tensor, q: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """The Fisher–Rao geodesic from p (t = 0) to q (t = 1) at t ∈ [0, 1]: γ(t) = slerp(√p, √q; t)².

    ``t`` is a number or a tensor of the batch shape ``p.shape[:-1]``.
    """
    tt = torch.as_tensor(t)
    if bool(((tt < 0) | (tt > 1)).any()):
        raise ParameterError(f"fr_geodesic: t must lie in [0, 1], got {tt.tolist()}")
    sp, sq = _pair(p, q)
    return sphere.geodesic(sp, sq, t, batch_dims=sp.ndim - 1).square()


def fr_karcher_mean(
    ps: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    eta: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-10,
    init: str = "chord",
) -> tuple[torch.Tensor, KarcherTrace]:
    """Weighted Fisher–Rao Karcher mean argmin_p Σ α_i d_FR²(p, p_i) of same-shape distributions.

    = (spherical Karcher mean of √p_i)², computed per distribution (each index of the leading axes is
    its own block) with :func:`karcher_lab.geometry.karcher_mean.karcher_mean`. Returns the mean
    distributions (shape of the inputs) and the solver trace.
    """
    if len(ps) == 0:
        raise InputError("fr_karcher_mean: no distributions given")
    roots = [_sqrt_point(p, f"distribution {i}") for i, p in enumerate(ps)]
    for i, r in enumerate(roots[1:], start=1):
        if r.shape != roots[0].shape:
            raise ShapeMismatchError(f"distribution {i} has shape {tuple(r.shape)} but distribution 0 has {tuple(roots[0].shape)}")
    shape = roots[0].shape
    rows = [r.reshape(-1, shape[-1]) for r in roots]
    mean, trace = karcher_mean(rows, weights, block="row", eta=eta, max_iter=max_iter, tol=tol, init=init)
    mean = mean.square()
    return (mean / mean.sum(-1, keepdim=True)).reshape(shape), trace
