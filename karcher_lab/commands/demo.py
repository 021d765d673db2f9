"""`karcher-lab demo`: the main job on the embedded default."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from karcher_lab.demo import format_rows, run_demo

    print(format_rows(run_demo(n_experts=args.experts, seed=args.seed), args.experts))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="merge generated checkpoints with karcher and two baselines")
    p.add_argument("--experts", type=int, default=5, help="number of generated experts (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
