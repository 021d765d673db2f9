"""`karcher-lab pairwise`: the paper's Table 2 analog (two experts per model scale, every method).

    karcher-lab pairwise [--sizes tiny small medium] [--methods ...] [--order near] [--out runs/pairwise]
"""
from __future__ import annotations

import argparse

from karcher_lab.commands.sweep import add_sweep_arguments, parse_params, prepare_runtime


def run(args: argparse.Namespace) -> int:
    from karcher_lab.experiment.pairwise import run_pairwise

    prepare_runtime(args.threads)
    run_pairwise(args.sizes, methods=args.methods, order=args.order, out=args.out, params=parse_params(args.param),
                 per_task=args.per_task, probes_per_task=args.probes, draws=args.draws, sites=args.sites,
                 seed=args.seed, device=args.device, progress=not args.quiet)
    return 0


def add_parser(sub) -> None:
    from karcher_lab.experiment.grid import DEFAULT_METHODS

    p = sub.add_parser("pairwise", help="pairwise merges of two experts at each model scale (Table 2 analog)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"],
                   help="pools, one per scale: names or directories (default tiny small medium)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="merge methods (default: all of the paper's)")
    p.add_argument("--order", default="near", help="which two experts: the first two of this order (default near)")
    add_sweep_arguments(p, out="runs/pairwise", per_task=64, draws=100)
    p.set_defaults(func=run)
