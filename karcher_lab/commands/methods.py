"""`karcher-lab methods`: list the registered merge methods and their parameters."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from karcher_lab.methods import get_method, list_methods

    for name in list_methods():
        m = get_method(name)
        params = ", ".join(
            f"{p.name}{'[per model]' if p.per_model else ''}={p.default!r}" for p in m.params
        ) or "-"
        print(f"{name:<18} base={m.base:<9} {m.summary}\n{'':<18} params: {params}")
    return 0


def add_parser(sub) -> None:
    sub.add_parser("methods", help="list the merge methods and their parameters").set_defaults(func=run)
