"""`karcher-lab` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from karcher_lab.demo import format_rows, run_demo

    print(format_rows(run_demo(n_experts=args.experts, seed=args.seed), args.experts))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from karcher_lab.merge import get_method, list_methods

    for name in list_methods():
        m = get_method(name)
        params = ", ".join(f"{p.name}={p.default!r}" for p in m.params) or "-"
        print(f"{name:<18} base={m.base:<9} {m.summary}\n{'':<18} params: {params}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karcher-lab", description="Geometry-aware merging of fine-tuned LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="merge generated checkpoints with karcher and two baselines")
    demo.add_argument("--experts", type=int, default=5, help="number of generated experts (default 5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    methods = sub.add_parser("methods", help="list the registered merge methods and their parameters")
    methods.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
