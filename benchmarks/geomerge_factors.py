#!/usr/bin/env python3
"""GeoMerge of one module's LoRA factors: solver cost, convergence and the GL(r) symmetry, one run.

    .venv/bin/python benchmarks/geomerge_factors.py [--d1 576] [--d2 576] [--r 16] [--n 5] [--seed 0]
                                                    [--memory 8 0] [--tol 1e-6]
    .venv/bin/python benchmarks/geomerge_factors.py --pool tiny-lora      # real adapters, every module

Inputs: N seeded Gaussian factor pairs G_i [d1, r], H_i [d2, r] (entries N(0, 1/d)), so the column and
row spaces of the ΔW_i are nearly orthogonal to each other: the hard case for the quotient Fréchet mean
(its objective is nearly flat along the Stiefel directions). For each L-BFGS ``--memory`` (0 = the
paper's plain horizontal gradient step, eq. 11) it prints the wall time of
:func:`karcher_lab.methods.lora.geomerge.geomerge_factors`, the outer iterations, the alignment steps
(cold start and total), the final gradient norm and Fréchet objective, and the relative difference of
the merged ΔW from the first memory's. Then the symmetry check of the paper: adapter 0 replaced by
(G A⁻¹, H Aᵀ) for a seeded well-conditioned A ∈ GL(r): the relative change of geomerge's ΔW, against
the relative change of the factor average (mean G)(mean H)ᵀ. Everything is float64; the load average
is printed before and after (the machine may be shared).

With ``--pool NAME`` (a built LoRA pool, e.g. ``tiny-lora``; or ``--adapters DIR …``) the inputs are the
pool's PEFT adapters instead, read with :func:`karcher_lab.io.lora.read_adapter` (G = s·lora_B,
H = lora_Aᵀ, float64): one line per adapted module with the time, the iterations, whether it converged
and the relative change of the merged ΔW when the first adapter's factors are replaced by
(G A⁻¹, H Aᵀ); then the totals.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from karcher_lab.io.lora import read_adapter
from karcher_lab.methods.lora.geomerge import geomerge_factors


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gauge(r: int, gen: torch.Generator) -> torch.Tensor:
    """A seeded well-conditioned A ∈ GL(r)."""
    return torch.randn(r, r, dtype=torch.float64, generator=gen) + 3 * torch.eye(r, dtype=torch.float64)


def _real_adapters(directories: list[str], tol: float, memory: int, gen: torch.Generator) -> None:
    adapters = [read_adapter(d) for d in directories]
    names = sorted(adapters[0].modules)
    print(f"{len(adapters)} adapters, {len(names)} modules, tol={tol:g}, memory {memory}")
    total, iterations, worst = 0.0, [], 0.0
    for name in names:
        pairs = [a.modules[name].factors(torch.float64) for a in adapters]
        start = time.perf_counter()
        g, h, trace = geomerge_factors(pairs, tol=tol, memory=memory, return_trace=True)
        seconds = time.perf_counter() - start
        a = _gauge(pairs[0][0].shape[1], gen)
        g2, h2 = geomerge_factors([(pairs[0][0] @ torch.linalg.inv(a), pairs[0][1] @ a.T)] + pairs[1:], tol=tol)
        change = _rel(g2 @ h2.T, g @ h.T)
        total, worst = total + seconds, max(worst, change)
        iterations.append(trace.iterations)
        print(
            f"  {name:45s} {tuple(pairs[0][0].shape)}·{tuple(pairs[0][1].shape)}ᵀ {seconds:6.2f} s, "
            f"{trace.iterations:3d} iterations (converged {trace.converged}), GL(r) change {change:.1e}"
        )
    iterations.sort()
    print(
        f"total {total:.1f} s; iterations median {iterations[len(iterations) // 2]}, max {iterations[-1]}; "
        f"largest GL(r) change {worst:.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d1", type=int, default=576)
    ap.add_argument("--d2", type=int, default=576)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory", type=int, nargs="+", default=[8, 0])
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--pool", help="a built LoRA pool (e.g. tiny-lora): merge its experts' adapters")
    ap.add_argument("--adapters", nargs="+", help="PEFT adapter directories to merge instead")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    if args.pool or args.adapters:
        from karcher_lab.zoo import find_pool

        directories = args.adapters or [e["adapter"] for e in find_pool(args.pool).experts]
        print(f"load average before: {os.getloadavg()[0]:.2f}  (torch threads {torch.get_num_threads()})")
        _real_adapters(directories, args.tol, args.memory[0], gen)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return
    f64 = torch.float64
    pairs = [
        (
            torch.randn(args.d1, args.r, dtype=f64, generator=gen) / args.d1**0.5,
            torch.randn(args.d2, args.r, dtype=f64, generator=gen) / args.d2**0.5,
        )
        for _ in range(args.n)
    ]
    print(f"load average before: {os.getloadavg()[0]:.2f}  (torch threads {torch.get_num_threads()})")
    print(f"d1={args.d1} d2={args.d2} r={args.r} N={args.n} tol={args.tol:g}")
    reference = None
    for memory in args.memory:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            g, h, trace = geomerge_factors(
                pairs, tol=args.tol, max_iter=args.max_iter, memory=memory, return_trace=True
            )
        seconds = time.perf_counter() - start
        merged = g @ h.T
        reference = merged if reference is None else reference
        print(
            f"memory {memory:2d}: {seconds:7.2f} s, {trace.iterations:4d} iterations "
            f"(converged {trace.converged}), alignment steps cold {trace.align_iterations[0]} / total "
            f"{sum(trace.align_iterations)}, gradient {trace.residual:.2e}, objective "
            f"{float(trace.frechet.objectives[-1]):.9f}, ΔW vs first {_rel(merged, reference):.1e}"
        )

    a = _gauge(args.r, gen)
    changed = [(pairs[0][0] @ torch.linalg.inv(a), pairs[0][1] @ a.T)] + pairs[1:]
    g2, h2 = geomerge_factors(changed, tol=args.tol, max_iter=args.max_iter, memory=args.memory[0])

    def factor_average(ps):
        return (sum(p[0] for p in ps) / len(ps)) @ (sum(p[1] for p in ps) / len(ps)).T

    print(
        f"GL(r) reparametrization of adapter 0 (cond A = {float(torch.linalg.cond(a)):.1f}): geomerge ΔW changes "
        f"by {_rel(g2 @ h2.T, reference):.1e} (relative), the factor average by "
        f"{_rel(factor_average(changed), factor_average(pairs)):.2f}"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
