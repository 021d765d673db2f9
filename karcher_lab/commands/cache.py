"""`karcher-lab cache`: where the lab caches things, and clearing the experts' cached measurements."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from karcher_lab.measurement.cache import clear_measurements, measurements_dir

    directory = measurements_dir(args.cache_dir)
    if args.action == "clear":
        freed = clear_measurements(args.cache_dir)
        print(f"cleared {directory}: {freed / 2**20:.1f} MiB of cached expert measurements")
        return 0
    files = [f for f in directory.rglob("*.pt") if f.is_file()] if directory.is_dir() else []
    size = sum(f.stat().st_size for f in files)
    print(f"{directory}: {len(files)} cached expert measurement(s), {size / 2**20:.1f} MiB")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("cache", help="show or clear the experts' cached measurements")
    parser.add_argument("action", choices=["info", "clear"], nargs="?", default="info",
                        help="info (default): where the cache is and its size; clear: delete every entry")
    parser.add_argument("--cache-dir", help="cache root (default: $KARCHER_LAB_CACHE or ~/.cache/karcher_lab)")
    parser.set_defaults(func=run)
