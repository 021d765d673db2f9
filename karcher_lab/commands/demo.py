"""`karcher-lab demo`: the main job on the embedded default — the merging sweep on the tiny zoo, reduced grid."""
from __future__ import annotations

import argparse
import time


def run(args: argparse.Namespace) -> int:
    from karcher_lab.commands.sweep import prepare_runtime
    from karcher_lab.demo import run_demo

    prepare_runtime(args.threads)
    start = time.perf_counter()
    run_demo(args.out, progress=not args.quiet)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; open {args.out}/report.html in a browser")
    return 0


def add_parser(sub) -> None:
    from karcher_lab.demo import DEMO_M, DEMO_METHODS, DEMO_OUT

    p = sub.add_parser("demo", help="the main job: merge 2..11 tiny-zoo experts with several methods, report collapse",
                       description=f"Builds the tiny expert pool if needed, merges its first m in {list(DEMO_M)} "
                                   f"experts (near-first and far-first) with {', '.join(DEMO_METHODS)}, and writes "
                                   f"an HTML report. For the full grid use `karcher-lab sweep`.")
    p.add_argument("--out", default=DEMO_OUT, help=f"run directory (default {DEMO_OUT}); a rerun resumes it")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for the tiny models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
