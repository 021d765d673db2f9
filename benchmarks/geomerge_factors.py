#!/usr/bin/env python3
"""GeoMerge of one module's LoRA factors: solver cost, convergence and the GL(r) symmetry, one run.

    .venv/bin/python benchmarks/geomerge_factors.py [--d1 576] [--d2 576] [--r 16] [--n 5] [--seed 0]
                                                    [--memory 8 0] [--tol 1e-6]
    .venv/bin/python benchmarks/geomerge_factors.py --pool smollm2 --n 2 3 5 [--sequential-modules 14] \
                                                    [--workers 2] [--gauge]  # a LoRA pool's adapters
    .venv/bin/python benchmarks/geomerge_factors.py --modules 210 --n 2 3 5 [--sequential-modules 14] \
                                                    [--workers 2] [--gauge]  # SmolLM2-shaped synthetic set

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

With ``--pool NAME`` (a built LoRA pool, e.g. ``smollm2`` or ``tiny-lora``; or ``--adapters DIR …``) the
inputs of merge size m are the first m of the pool's PEFT adapters, every adapted module, read with
:func:`karcher_lab.io.lora.read_adapter` (G = s·lora_B, H = lora_Aᵀ, float64). With ``--modules K``
they are K synthetic modules with the shapes of the SmolLM2-135M LoRA pool (per layer q, k, v, o, gate,
up, down: ΔW of 576×576, 192×576, 192×576, 576×576, 1536×576, 1536×576, 576×1536; rank ``--r``;
210 modules = 30 layers), Gaussian factors as above. For each merge size m in ``--n``: the sequential
solver (one module after the other, :func:`geomerge_factors`) on the first ``--sequential-modules``
modules, its per-module mean scaled to all modules (the sequential time per module does not depend on
the others); the batched solver on all modules (``--workers`` processes,
:func:`karcher_lab.methods.lora.merge_factor_sets`, as ``merge_lora`` runs it), its speed-up over the
scaled sequential time and the largest relative ΔW difference on the modules both merged; wall and CPU
times; and the floor: the rank-r truncation of the mean update of every module (the start of the
solver; what any merge of these updates to rank r costs at least). ``--gauge`` adds the GL(r) check
above on the sequentially merged modules.
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


def _pool_modules(directories: list[str], n: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every adapted module's factors (float64) of the first ``n`` adapters, by module name."""
    adapters = [read_adapter(d) for d in directories[:n]]
    return {name: [a.modules[name].factors(torch.float64) for a in adapters] for name in sorted(adapters[0].modules)}


def _compare(modules: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], n: int, args: argparse.Namespace,
             gen: torch.Generator) -> None:
    """Floor, sequential solver on the first ``--sequential-modules`` modules (scaled to all), batched solver
    on all (``--workers`` processes, as merge_lora runs it), their ΔW difference; with ``--gauge`` the
    GL(r) change of the sequential modules' ΔW."""
    names = list(modules)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    start = time.perf_counter()
    for pairs in modules.values():  # the floor: the solver's start, the truncated mean update of every module
        g, h = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        truncated_means(g, h, w, torch.ones((), dtype=torch.float64))
    floor = time.perf_counter() - start
    head = names[: max(1, args.sequential_modules)]
    start, cpu = time.perf_counter(), _cpu_seconds()
    sequential = {name: geomerge_factors(modules[name], tol=args.tol, memory=args.memory[0], max_iter=args.max_iter)
                  for name in head}
    per_module = (time.perf_counter() - start) / len(head)
    cpu_per_module = (_cpu_seconds() - cpu) / len(head)
    start, cpu = time.perf_counter(), _cpu_seconds()
    with module_workers(args.workers, len(modules)) as executor:
        batched = merge_factor_sets(modules, "geomerge", tol=args.tol, max_iter=args.max_iter, executor=executor,
                                    chunks=args.workers)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    difference = max(_rel(batched[name][0] @ batched[name][1].T, g @ h.T) for name, (g, h) in sequential.items())
    print(f"m = {n}: sequential {per_module:.2f} s/module (on {len(head)}) → {per_module * len(names):.0f} s for "
          f"{len(names)} modules; batched {seconds:.1f} s ({seconds / len(names):.3f} s/module, {args.workers} "
          f"worker(s)), speed-up {per_module * len(names) / seconds:.1f}x; largest relative ΔW difference on the "
          f"{len(head)} {difference:.1e}; floor (truncated mean update of every module) {floor:.2f} s", flush=True)
    print(f"        CPU time: sequential {cpu_per_module:.2f} s/module → {cpu_per_module * len(names):.0f} s; "
          f"batched {cpu:.1f} s (all processes; {cpu_per_module * len(names) / cpu:.1f}x less)", flush=True)
    if args.gauge:
        changes = []
        for name in head:
            pairs = modules[name]
            a = _gauge(pairs[0][0].shape[1], gen)
            g2, h2 = geomerge_factors([(pairs[0][0] @ torch.linalg.inv(a), pairs[0][1] @ a.T)] + pairs[1:],
                                      tol=args.tol, memory=args.memory[0], max_iter=args.max_iter)
            changes.append(_rel(g2 @ h2.T, sequential[name][0] @ sequential[name][1].T))
        print(f"        GL(r) reparametrization of adapter 0: geomerge ΔW changes by at most {max(changes):.1e} "
              f"(relative) over the {len(head)} modules", flush=True)


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
    ap.add_argument("--workers", type=int, default=1, help="processes for the batched solver (--modules, --pool)")
    ap.add_argument("--gauge", action="store_true", help="with --modules / --pool: the GL(r) check on the "
                    "sequential modules")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    if args.pool or args.adapters or args.modules:
        from karcher_lab.zoo import find_pool

        directories = args.adapters or ([e["adapter"] for e in find_pool(args.pool).experts] if args.pool else None)
        print(f"load average before: {os.getloadavg()[0]:.2f}  (torch threads {torch.get_num_threads()})")
        print(f"{'synthetic modules of SmolLM2-135M LoRA shapes' if directories is None else 'adapters ' + str(directories)}"
              f", tol={args.tol:g}, memory {args.memory[0]}")
        for n in args.n:
            if directories is None:
                modules = {f"module.{k}": pairs for k, pairs in enumerate(_synthetic_modules(args.modules, n, args.r, gen))}
            else:
                modules = _pool_modules(directories, n)
            _compare(modules, n, args, gen)
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
