"""`karcher-lab` command line.

Each subcommand lives in its own module under :mod:`karcher_lab.commands` and exposes
``add_parser(subparsers)``, which registers the subcommand and sets ``func`` (args -> exit code).
Modules are discovered, so adding a subcommand needs no edit here. Errors from karcher_lab (bad input,
bad recipes) print as one paragraph and exit with code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import karcher_lab.commands
from karcher_lab.errors import KarcherLabError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karcher-lab", description="Geometry-aware merging of fine-tuned LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(karcher_lab.commands.__path__), key=lambda i: i.name):
        importlib.import_module(f"karcher_lab.commands.{info.name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KarcherLabError as exc:
        if args.debug:
            raise
        print(f"karcher-lab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
