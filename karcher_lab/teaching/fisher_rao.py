"""Closed forms and small explicit computations behind the teaching notebook (02_fisher_rao_geometry).

- :func:`kl_divergence` KL(p ‖ q) = Σ p_k log(p_k/q_k), and :func:`fr_versus_kl` along a mixture path
  p → q, where locally d_FR² ≈ 2 KL (the Karcher-merging paper's eq. 1).
- :func:`mixture`, the arithmetic mean Σ α_i p_i of distributions (what a linear merge of output
  distributions gives), to set against the Fisher–Rao Karcher mean
  (:func:`karcher_lab.geometry.simplex.fr_karcher_mean`).
- :func:`two_point_chord_gap`: for unit points x, y at angle θ and weights (1 − α, α), the chord point
  c = (1 − α)x + αy has norm ‖c‖ = √((1 − α)² + α² + 2α(1 − α)cos θ) (1 − ‖c‖ is the shrinkage a
  linear merge of the directions suffers) and direction at angle φ = atan2(α sin θ, 1 − α + α cos θ)
  from x, while the geodesic (SLERP) point sits at αθ; the gap |φ − αθ| grows with θ and vanishes at α = ½.
- :func:`karcher_path`: the fixed-point iteration of eq. 5, u ← Exp_u(η Σ α_i Log_u(u_i)), on explicit
  points, keeping every iterate (the coefficient-space solver in
  :mod:`karcher_lab.geometry.karcher_mean` keeps only residuals). With two points, η = 1 and started
  at u_1 one step lands on SLERP at t = α_2.
- :func:`mean_norm_ratio` and :func:`random_mean_norm_ratio`: the norm of the average of N unit vectors
  with pairwise cosine c is √((1 + (N − 1)c)/N); independent random directions in dimension D are
  nearly orthogonal (c ≈ 0 ± 1/√D), so their Euclidean average shrinks to ≈ 1/√N of the norm.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch

from karcher_lab import checks
from karcher_lab.errors import InputError, ParameterError, WeightError
from karcher_lab.geometry import simplex, sphere
from karcher_lab.geometry.karcher_mean import check_solver_params


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_k p_k log(p_k/q_k) along the last axis (0 log 0 = 0; +inf where q_k = 0 < p_k)."""
    simplex.fr_distance(p, q)  # validates both distributions and their shapes
    p64, q64 = p.to(torch.float64), q.to(torch.float64)
    terms = torch.where(p64 > 0, p64 * (p64.log() - q64.log()), torch.zeros_like(p64))
    return terms.sum(-1)


def mixture(ps: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Σ_i α_i p_i, the arithmetic (Euclidean) mean of distributions, α normalized to sum 1."""
    alpha = checks.check_weights(weights, len(ps), label="mixture: ", normalize=True, what="distributions")
    for p in ps:
        simplex.fr_distance(p, ps[0])  # validates each against the first (shape and simplex)
    return sum(a * p.to(torch.float64) for a, p in zip(alpha, ps))


def fr_versus_kl(p: torch.Tensor, q: torch.Tensor, steps: int = 50) -> pd.DataFrame:
    """Along the mixture path p_t = (1 − t)p + tq, t ∈ (0, 1]: ``t``, ``fisher_rao`` = d_FR(p, p_t),
    ``sqrt_2kl`` = √(2 KL(p ‖ p_t)) and their ``ratio`` (→ 1 as t → 0: d_FR² ≈ 2 KL, eq. 1)."""
    checks.check_count("steps", steps)
    ts = torch.linspace(1.0 / steps, 1.0, steps, dtype=torch.float64)
    p64, q64 = p.to(torch.float64), q.to(torch.float64)
    path = (1 - ts).unsqueeze(-1) * p64 + ts.unsqueeze(-1) * q64
    start = p64.expand_as(path)
    fr = simplex.fr_distance(start, path)
    root = (2 * kl_divergence(start, path)).sqrt()
    return pd.DataFrame({"t": ts.numpy(), "fisher_rao": fr.numpy(), "sqrt_2kl": root.numpy(), "ratio": (fr / root).numpy()})


def two_point_chord_gap(theta, alpha: float = 0.5) -> pd.DataFrame:
    """For two unit points at angle(s) ``theta`` (radians, in [0, π)) and weights (1 − α, α): ``theta``,
    ``chord_norm`` ‖(1 − α)x + αy‖, ``chord_angle`` φ (the chord point's angle from x), ``geodesic_angle``
    αθ (SLERP's), ``gap`` φ − αθ (radians) — closed forms, see the module docstring."""
    th = torch.as_tensor(theta, dtype=torch.float64).reshape(-1)
    if bool(((th < 0) | (th >= math.pi)).any()) or not bool(torch.isfinite(th).all()):
        raise ParameterError(f"theta must lie in [0, π) (antipodal points have no unique mean), got {th.tolist()}")
    if not 0.0 <= alpha <= 1.0:
        raise WeightError(f"alpha must lie in [0, 1], got {alpha!r}")
    norm = ((1 - alpha) ** 2 + alpha**2 + 2 * alpha * (1 - alpha) * th.cos()).sqrt()
    phi = torch.atan2(alpha * th.sin(), 1 - alpha + alpha * th.cos())
    return pd.DataFrame({"theta": th.numpy(), "chord_norm": norm.numpy(), "chord_angle": phi.numpy(),
                         "geodesic_angle": (alpha * th).numpy(), "gap": (phi - alpha * th).numpy()})


def karcher_path(
    points: torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    eta: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-10,
    init: str = "chord",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every iterate of u ← Exp_u(η Σ α_i Log_u(u_i)) (eq. 5) for unit points ``[N, D]`` (rows normalized
    here). Starts at the normalized weighted chord mean ('chord') or at the first point ('first'); stops
    when ‖v‖ < tol or after max_iter steps. Returns (iterates ``[K + 1, D]``, residuals ‖v‖ ``[K + 1]``), float64."""
    check_solver_params(eta=eta, max_iter=max_iter, tol=tol, init=init)
    x = torch.as_tensor(points, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"points must be [N, D] with N >= 1, got shape {tuple(x.shape)}")
    norms = x.norm(dim=-1, keepdim=True)
    if not bool(torch.isfinite(x).all()) or bool((norms == 0).any()):
        raise InputError("points must be finite and non-zero")
    units = x / norms
    alpha = checks.check_weights(weights, x.shape[0], normalize=True, what="points")
    u = alpha @ units if init == "chord" else units[0].clone()
    u = u / u.norm()
    iterates, residuals = [u], []
    for step in range(max_iter + 1):
        logs = sphere.log(u.expand_as(units), units, batch_dims=1)
        v = alpha @ logs
        residuals.append(v.norm())
        if float(residuals[-1]) < tol or step == max_iter:
            break
        u = sphere.exp(u, eta * v)
        iterates.append(u)
    return torch.stack(iterates), torch.stack(residuals)


def mean_norm_ratio(n: int, cos) -> torch.Tensor:
    """‖(1/N) Σ u_i‖ for N unit vectors with equal pairwise cosine c: √((1 + (N − 1)c)/N)."""
    checks.check_count("n", n)
    c = torch.as_tensor(cos, dtype=torch.float64)
    if bool((c < -1.0 / max(n - 1, 1)).any()) or bool((c > 1).any()):
        raise ParameterError(f"N = {n} unit vectors cannot all have pairwise cosine {c.tolist()} (need -1/(N-1) <= c <= 1)")
    return ((1 + (n - 1) * c) / n).sqrt()


def random_mean_norm_ratio(dims: Sequence[int], n: int, trials: int = 20, seed: int = 0) -> pd.DataFrame:
    """Monte Carlo: ‖(1/N) Σ u_i‖ for N independent uniform unit vectors in each dimension D; rows
    ``dim``, ``mean``, ``std`` (over trials) and ``limit`` = 1/√N (c = 0), approached as D grows."""
    checks.check_count("n", n)
    checks.check_count("trials", trials)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for dim in dims:
        checks.check_count("dimension", dim)
        u = torch.randn(trials, n, dim, generator=gen, dtype=torch.float64)
        ratios = (u / u.norm(dim=-1, keepdim=True)).mean(1).norm(dim=-1)
        rows.append(dict(dim=dim, mean=float(ratios.mean()), std=float(ratios.std()) if trials > 1 else 0.0,
                         limit=float(mean_norm_ratio(n, 0.0))))
    return pd.DataFrame(rows)
