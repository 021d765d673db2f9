#!/usr/bin/env python3
"""The curvature behind geomerge's outer iteration count: the Riemannian Hessian of the quotient Fréchet objective at the mean.

    .venv/bin/python benchmarks/geomerge_hessian.py [--pool smollm2] [--n 2] [--module 0] [--seed 0]

For one module of a built LoRA pool (the ``--module``-th adapted module, sorted by name; the first ``--n``
adapters, equal weights), the merged mean μ* is computed with
:func:`karcher_lab.methods.lora.geomerge.geomerge_factors` at tol 1e-10 and mapped, with the inputs, into the
coordinates of the inputs' column and row spans (an isometric embedding that commutes with the geometry; see
:mod:`karcher_lab.methods.lora.geomerge_batched`). There the horizontal space has dimension
D = 2 (N r · r − r(r+1)/2) + r(r+1)/2 − r(r−1)/2. The gradient of F(μ) = ½ Σ w_i d([μ], [θ_i])² is
grad F(μ) = −hor(Σ w_i Log_μ θ_i*) with every input aligned to μ (eq. 8, 10); the Hessian is applied to
D + 32 seeded random horizontal directions ξ by central differences,
Hess F(μ*)[ξ] ≈ P_μ*(grad F(Exp(tξ)) − grad F(Exp(−tξ))) / 2t (t = 1e-6, P the projection onto the horizontal
space at μ*), and its spectrum is that of the D×D matrix in a metric-orthonormal basis of those directions.
With ``--fixed-representatives`` the gradient is that of the total-space objective ½ Σ w_i d(μ, θ_i*)² with the
representatives θ_i* aligned to μ* held fixed (its Hessian compressed to the horizontal space): the difference
between the two spectra is what the realignment as μ moves (the min over O(r) in F) does to the curvature.

Printed, side by side: the spectrum (min, max, condition number κ, percentiles); where the eigenvectors lie
(shares of ‖ξ‖² in the in-span Stiefel parts A_U = U_μᵀξ_U and A_V, the normal Stiefel parts N_U = (I − UUᵀ)ξ_U
and N_V, and the SPD part), per band of eigenvalues; the iterations of the outer iteration alone
(``geodesic=False``, from the truncated mean; tol 1e-6, L-BFGS memory 8) against what any method driven by
gradients alone needs on a quadratic with this κ (conjugate gradients: ln(‖g_0‖/tol) / ln((√κ + 1)/(√κ − 1))
iterations) and the floor (Newton: a few iterations); and what geomerge does today (for N = 2 it starts
on the quotient geodesic and has no outer iterations left). Its cost is 2 (D + 32) gradients, each with
tight alignments.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from geomerge_factors import _pool_modules
from karcher_lab.geometry import lowrank, spd, stiefel
from karcher_lab.geometry.lowrank import Polar, PolarTangent
from karcher_lab.methods.lora.geomerge import geomerge_factors
from karcher_lab.methods.lora.geomerge_batched import _input_span, _reduce
from karcher_lab.zoo import find_pool

STEP = 1e-6
"""The central-difference step t."""

BANDS = ((0.0, 0.1), (0.1, 0.4), (0.4, 0.8), (0.8, 0.99), (0.99, math.inf))
"""Eigenvalue bands for the composition table."""


def _batch(point: Polar, n: int) -> Polar:
    return Polar(*(t.unsqueeze(0).expand(n, *t.shape) for t in point))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default="smollm2")
    ap.add_argument("--n", type=int, default=2, help="adapters merged (the pool's first n)")
    ap.add_argument("--module", type=int, default=0, help="index of the module, in name order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixed-representatives", action="store_true",
                    help="the Hessian of ½ Σ w_i d(μ, θ_i*)² with the aligned representatives held fixed (no "
                    "realignment as μ moves), compressed to the horizontal space")
    args = ap.parse_args()

    directories = [e["adapter"] for e in find_pool(args.pool).experts]
    modules = _pool_modules(directories, args.n)
    name = sorted(modules)[args.module]
    pairs = modules[name]
    n, r = len(pairs), pairs[0][0].shape[1]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)

    start = time.perf_counter()
    _, _, today = geomerge_factors(pairs, return_trace=True)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, _, iterated = geomerge_factors(pairs, geodesic=False, return_trace=True)  # the outer iteration alone
    iterated_seconds = time.perf_counter() - start
    g_mean, h_mean = geomerge_factors(pairs, tol=1e-10, max_iter=5000)
    g, h = torch.stack([g for g, _ in pairs]), torch.stack([h for _, h in pairs])
    basis_u, basis_v = _input_span(g[None]), _input_span(h[None])  # the batched solver's coordinates
    mean = Polar(*(t[0] for t in _reduce(Polar(*(t[None] for t in lowrank.polar_from_factors(g_mean, h_mean))),
                                         basis_u, basis_v)))
    inputs = Polar(*(t[0] for t in _reduce(Polar(*(t[None] for t in lowrank.polar_from_factors(g, h))), basis_u, basis_v)))
    aligned = lowrank.align(_batch(mean, n), inputs, tol=1e-12, max_iter=500)
    inputs, log_starts = aligned.aligned, aligned.log_starts

    def gradient(mu: Polar) -> PolarTangent:
        if args.fixed_representatives:  # the total-space objective: no realignment as μ moves
            return PolarTangent(*(-torch.tensordot(w, t, dims=1) for t in lowrank.log(_batch(mu, n), inputs, tol=1e-13)))
        a = lowrank.align(_batch(mu, n), inputs, warm_start=True, log_starts=log_starts, tol=1e-12, max_iter=500)
        v = PolarTangent(*(torch.tensordot(w, t, dims=1) for t in a.log))
        return lowrank.horizontal(mu, PolarTangent(*(-t for t in v)))

    dim = 2 * (inputs.U.shape[-2] * r - r * (r + 1) // 2) + r * (r + 1) // 2 - r * (r - 1) // 2
    count = dim + 32
    gen = torch.Generator().manual_seed(args.seed)
    noise = lambda t: torch.randn(t.shape, dtype=t.dtype, generator=gen)  # noqa: E731
    directions = [
        lowrank.horizontal(mean, PolarTangent(stiefel.tangent_part(mean.U, noise(mean.U)), spd.sym(noise(mean.B)),
                                              stiefel.tangent_part(mean.V, noise(mean.V))))
        for _ in range(count)
    ]
    start = time.perf_counter()
    products = []
    for xi in directions:
        plus = gradient(lowrank.exp(mean, PolarTangent(*(STEP * t for t in xi))))
        minus = gradient(lowrank.exp(mean, PolarTangent(*(-STEP * t for t in xi))))
        difference = PolarTangent(*((a - b) / (2 * STEP) for a, b in zip(plus, minus)))
        products.append(lowrank.transport(mean, mean, difference))
    hessian_seconds = time.perf_counter() - start

    stack = lambda vectors: PolarTangent(*(torch.stack(parts) for parts in zip(*vectors)))  # noqa: E731
    xs, hs = stack(directions), stack(products)
    point = Polar(*(t.unsqueeze(0) for t in mean))
    gram = torch.stack([lowrank.inner(point, PolarTangent(*(t[i:i + 1] for t in xs)), xs) for i in range(count)])
    cross = torch.stack([lowrank.inner(point, PolarTangent(*(t[i:i + 1] for t in xs)), hs) for i in range(count)])
    asymmetry = float((cross - cross.T).norm() / cross.norm())
    values, vectors = torch.linalg.eigh(gram)
    keep = values > 1e-9 * values.max()
    frame = vectors[:, keep] / values[keep].sqrt()  # metric-orthonormal combinations of the directions
    eigenvalues, coefficients = torch.linalg.eigh(frame.T @ (0.5 * (cross + cross.T)) @ frame)
    coefficients = frame @ coefficients

    def share(t: torch.Tensor) -> torch.Tensor:
        return torch.einsum("k...,kj->j...", t, coefficients)

    eig_u, eig_b, eig_v = share(xs.U), share(xs.B), share(xs.V)
    a_u, a_v = mean.U.mT @ eig_u, mean.V.mT @ eig_v
    parts = torch.stack([
        0.5 * (a_u ** 2).sum(dim=(-2, -1)), ((eig_u - mean.U @ a_u) ** 2).sum(dim=(-2, -1)),
        spd.inner(mean.B, eig_b, eig_b), 0.5 * (a_v ** 2).sum(dim=(-2, -1)),
        ((eig_v - mean.V @ a_v) ** 2).sum(dim=(-2, -1)),
    ], dim=1)
    parts = parts / parts.sum(dim=1, keepdim=True)

    kappa = float(eigenvalues.max() / eigenvalues.min())
    g0, tol = float(iterated.frechet.residuals[0]), iterated.frechet.tol
    krylov = math.log(g0 / tol) / math.log((math.sqrt(kappa) + 1) / (math.sqrt(kappa) - 1))
    print(f"{args.pool}: {name}, N = {n}, r = {r}; "
          f"{'representatives held fixed' if args.fixed_representatives else 'quotient objective'}; horizontal dimension D = {dim} (rank found {int(keep.sum())}); "
          f"F(μ*) = {0.5 * float((w * lowrank.inner(_batch(mean, n), aligned.log, aligned.log)).sum()):.9f}, "
          f"‖grad F(μ*)‖ = {float(lowrank.norm(mean, gradient(mean))):.1e}; {2 * count} gradients in "
          f"{hessian_seconds:.0f} s; asymmetry of the finite-difference Hessian {asymmetry:.1e}")
    quantiles = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64)
    levels = torch.quantile(eigenvalues, quantiles)
    print(f"Hessian eigenvalues: min {float(eigenvalues.min()):.4f}, max {float(eigenvalues.max()):.4f}, "
          f"κ = {kappa:.1f}; quantiles {', '.join(f'{float(q):g}: {float(v):.3f}' for q, v in zip(quantiles, levels))}")
    print("where the eigenvectors lie (mean share of ‖ξ‖²):   count   A_U    N_U    B      A_V    N_V")
    for low, high in BANDS:
        band = (eigenvalues >= low) & (eigenvalues < high)
        if bool(band.any()):
            mean_share = parts[band].mean(dim=0)
            shares = "  ".join(f"{float(x):.2f}" for x in mean_share)
            print(f"    eigenvalues in [{low:g}, {high:g}){'':<16} {int(band.sum()):5d}  {shares}")
    print(f"outer iterations to ‖grad F‖ < {tol:g} from the truncated mean (‖grad F‖ = {g0:.2f}): the outer "
          f"iteration alone (geodesic=False, L-BFGS memory 8) {iterated.iterations} ({iterated_seconds:.1f} s); "
          f"conjugate gradients on a quadratic with this κ {krylov:.0f}; floor (Newton, quadratic convergence) a "
          f"few; geomerge today {today.iterations} ({seconds:.1f} s"
          + (f", after {today.geodesic_iterations} steps aligning adapter 1 to adapter 0 on the quotient geodesic)"
             if today.geodesic_iterations is not None else ")"))


if __name__ == "__main__":
    main()
