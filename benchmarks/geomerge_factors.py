#!/usr/bin/env python3
"""GeoMerge of one module's LoRA factors: solver cost, convergence and the GL(r) symmetry, one run.

    .venv/bin/python benchmarks/geomerge_factors.py [--d1 576] [--d2 576] [--r 16] [--n 5] [--seed 0]
                                                    [--memory 8 0] [--tol 1e-6]
    .venv/bin/python benchmarks/geomerge_factors.py --pool tiny-lora      # real adapters, every module
    .venv/bin/python benchmarks/geomerge_factors.py --modules 210 --n 2 3 5 [--sequential-modules 14] \
                                                    [--workers 2]          # SmolLM2-shaped synthetic set

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
(G A⁻¹, H Aᵀ); then the totals, and the same modules merged by the batched solver
(:func:`karcher_lab.methods.lora.geomerge_batched.geomerge_modules`, all modules in one call): its wall
time, the speed-up and the largest relative ΔW difference from the sequential solver's.

With ``--modules K`` the inputs are K synthetic modules with the shapes of the SmolLM2-135M LoRA pool
(per layer q, k, v, o, gate, up, down: ΔW of 576×576, 192×576, 192×576, 576×576, 1536×576, 1536×576,
576×1536; rank ``--r``; 210 modules = 30 layers), Gaussian factors as above, for each merge size m in
``--n``: the sequential solver (one module after the other, :func:`geomerge_factors`) on the first
``--sequential-modules`` modules, its per-module mean scaled to K modules (the sequential time per
module does not depend on the others); the batched solver on all K modules (``--workers`` processes,
:func:`karcher_lab.methods.lora.merge_factor_sets`, as ``merge_lora`` runs it), its speed-up over the
scaled sequential time and the largest relative ΔW difference on the modules both merged; and the floor:
the rank-r truncation of the mean update of every module (the start of the solver; what any merge of
these updates to rank r costs at least).
"""
from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import torch

from karcher_lab.io.lora import read_adapter
from karcher_lab.methods.lora import merge_factor_sets
from karcher_lab.methods.lora.geomerge import geomerge_factors, truncated_means
from karcher_lab.methods.lora.geomerge_batched import geomerge_modules
from karcher_lab.pipeline.lora import module_workers

SMOLLM2_SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
"""(d1, d2) of ΔW for q, k, v, o, gate, up, down in one SmolLM2-135M layer."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gauge(r: int, gen: torch.Generator) -> torch.Tensor:
    """A seeded well-conditioned A ∈ GL(r)."""
    return torch.randn(r, r, dtype=torch.float64, generator=gen) + 3 * torch.eye(r, dtype=torch.float64)


def _real_adapters(directories: list[str], tol: float, memory: int, gen: torch.Generator) -> None:
    adapters = [read_adapter(d) for d in directories]
    names = sorted(adapters[0].modules)
    print(f"{len(adapters)} adapters, {len(names)} modules, tol={tol:g}, memory {memory}")
    total, total_cpu, iterations, worst, merged = 0.0, 0.0, [], 0.0, {}
    for name in names:
        pairs = [a.modules[name].factors(torch.float64) for a in adapters]
        start, cpu = time.perf_counter(), _cpu_seconds()
        g, h, trace = geomerge_factors(pairs, tol=tol, memory=memory, return_trace=True)
        seconds = time.perf_counter() - start
        total_cpu += _cpu_seconds() - cpu
        a = _gauge(pairs[0][0].shape[1], gen)
        g2, h2 = geomerge_factors([(pairs[0][0] @ torch.linalg.inv(a), pairs[0][1] @ a.T)] + pairs[1:], tol=tol)
        change = _rel(g2 @ h2.T, g @ h.T)
        total, worst = total + seconds, max(worst, change)
        merged[name] = g @ h.T
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
    start, cpu = time.perf_counter(), _cpu_seconds()
    batched = geomerge_modules([[a.modules[name].factors(torch.float64) for a in adapters] for name in names],
                               tol=tol, memory=memory, names=names)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    difference = max(_rel(g @ h.T, merged[name]) for name, (g, h) in zip(names, batched))
    print(f"batched (geomerge_modules, one call): {seconds:.1f} s, speed-up {total / seconds:.1f}x over the "
          f"sequential {total:.1f} s; largest relative ΔW difference from the sequential solver {difference:.1e}; "
          f"CPU time {cpu:.1f} s against {total_cpu:.1f} s ({total_cpu / cpu:.1f}x less)")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker processes), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _synthetic_modules(k: int, n: int, r: int, gen: torch.Generator) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """K modules of SmolLM2-135M LoRA shapes (cycling q, k, v, o, gate, up, down), N Gaussian pairs each."""
    modules = []
    for index in range(k):
        d1, d2 = SMOLLM2_SHAPES[index % len(SMOLLM2_SHAPES)]
        modules.append([(torch.randn(d1, r, dtype=torch.float64, generator=gen) / d1**0.5,
                         torch.randn(d2, r, dtype=torch.float64, generator=gen) / d2**0.5) for _ in range(n)])
    return modules


def _synthetic_pool(args: argparse.Namespace, gen: torch.Generator) -> None:
    print(f"{args.modules} modules of SmolLM2-135M LoRA shapes, r={args.r}, tol={args.tol:g}, memory {args.memory[0]}; "
          f"sequential on the first {args.sequential_modules}, batched on all with {args.workers} worker(s)")
    for n in args.n:
        modules = _synthetic_modules(args.modules, n, args.r, gen)
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        start = time.perf_counter()
        for pairs in modules:  # the floor: the solver's start, the truncated mean update of every module
            g, h = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            truncated_means(g, h, w, torch.ones((), dtype=torch.float64))
        floor = time.perf_counter() - start
        start, cpu = time.perf_counter(), _cpu_seconds()
        sequential = [geomerge_factors(pairs, tol=args.tol, memory=args.memory[0], max_iter=args.max_iter)
                      for pairs in modules[: args.sequential_modules]]
        per_module = (time.perf_counter() - start) / len(sequential)
        cpu_per_module = (_cpu_seconds() - cpu) / len(sequential)
        named = {f"module.{k}": pairs for k, pairs in enumerate(modules)}
        start, cpu = time.perf_counter(), _cpu_seconds()
        with module_workers(args.workers, len(named)) as executor:
            batched = merge_factor_sets(named, "geomerge", tol=args.tol, max_iter=args.max_iter, executor=executor,
                                        chunks=args.workers)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        difference = max(_rel(batched[f"module.{k}"][0] @ batched[f"module.{k}"][1].T, g @ h.T)
                         for k, (g, h) in enumerate(sequential))
        print(f"m = {n}: sequential {per_module:.2f} s/module → {per_module * len(modules):.0f} s for "
              f"{len(modules)} modules; batched {seconds:.1f} s ({seconds / len(modules):.3f} s/module), speed-up "
              f"{per_module * len(modules) / seconds:.1f}x; largest relative ΔW difference {difference:.1e}; "
              f"floor (truncated mean of every module) {floor:.2f} s", flush=True)
        print(f"        CPU time: sequential {cpu_per_module:.2f} s/module → {cpu_per_module * len(modules):.0f} s; "
              f"batched {cpu:.1f} s (all processes; {cpu_per_module * len(modules) / cpu:.1f}x less)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d1", type=int, default=576)
    ap.add_argument("--d2", type=int, default=576)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--n", type=int, nargs="+", default=[5], help="adapters merged (several with --modules)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory", type=int, nargs="+", default=[8, 0])
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--pool", help="a built LoRA pool (e.g. tiny-lora): merge its experts' adapters")
    ap.add_argument("--adapters", nargs="+", help="PEFT adapter directories to merge instead")
    ap.add_argument("--modules", type=int, help="synthetic modules of SmolLM2-135M LoRA shapes (e.g. 210)")
    ap.add_argument("--sequential-modules", type=int, default=14, help="modules the sequential solver merges")
    ap.add_argument("--workers", type=int, default=1, help="processes for the batched solver (--modules)")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    if args.pool or args.adapters:
        from karcher_lab.zoo import find_pool

        directories = args.adapters or [e["adapter"] for e in find_pool(args.pool).experts]
        print(f"load average before: {os.getloadavg()[0]:.2f}  (torch threads {torch.get_num_threads()})")
        _real_adapters(directories, args.tol, args.memory[0], gen)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return
    if args.modules:
        print(f"load average before: {os.getloadavg()[0]:.2f}  (torch threads {torch.get_num_threads()})")
        _synthetic_pool(args, gen)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return
    args.n = args.n[0]
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
