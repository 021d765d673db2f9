"""`karcher-lab sweep`: the paper's experiment on any pool (merge m = 2…11 experts with every method).

    karcher-lab sweep [--pool tiny|smollm2|DIR] [--methods linear ties karcher ...] [--m 2..11]
                      [--order near far] [--out runs/NAME] [--per-task N] [--probes N] [--draws N]
                      [--param ties.density=0.3 ...] [--threads N] [--device cpu|cuda]

Resumable: rerunning the same command skips the cells already in --out. Writes --out/results.csv and
--out/report.html and prints the summary table.
"""
from __future__ import annotations

import argparse
import json

from karcher_lab.errors import ParameterError


def parse_params(items: list[str]) -> dict[str, dict[str, object]]:
    """``["ties.density=0.3", ...]`` → ``{"ties": {"density": 0.3}}`` (values read as JSON where possible)."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            raise ParameterError(f"--param expects METHOD.NAME=VALUE (e.g. ties.density=0.3), got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def prepare_runtime(threads: int | None) -> None:
    """torch's intra-op threads (validated; None leaves torch's default), and no per-model loading bars
    from transformers (the sweep loads every expert: its own progress bars say what is happening)."""
    if threads is not None and threads < 1:
        raise ParameterError(f"--threads must be >= 1, got {threads}")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if threads is not None:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    from karcher_lab.experiment import run_sweep

    prepare_runtime(args.threads)
    run_sweep(args.pool, methods=args.methods, m_values=args.m, orders=args.order, out=args.out,
              per_task=args.per_task, probes_per_task=args.probes, draws=args.draws, sites=args.sites,
              params=parse_params(args.param), seed=args.seed, device=args.device, progress=not args.quiet,
              report=not args.no_report)
    return 0


def add_sweep_arguments(p: argparse.ArgumentParser, *, out: str, per_task: int, draws: int) -> None:
    """The measurement options shared by `sweep`, `pairwise` and `demo`."""
    from karcher_lab.diagnostics.activations import SITES

    p.add_argument("--out", default=out, help=f"run directory (default {out}); a rerun resumes it")
    p.add_argument("--per-task", type=int, default=per_task,
                   help=f"held-out examples per task for accuracy, NLL and KL (default {per_task})")
    p.add_argument("--probes", type=int, default=8, help="probe sequences per task for the activations (default 8)")
    p.add_argument("--draws", type=int, default=draws, help=f"bootstrap draws for the collapse metrics (default {draws})")
    p.add_argument("--sites", nargs="+", default=list(SITES), help=f"activation sites (default: {' '.join(SITES)})")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="override a method parameter (repeatable), e.g. ties.density=0.3")
    p.add_argument("--seed", type=int, default=0, help="seed of the task examples, bootstrap and randomized methods")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the zoo's small models run fastest on one thread, and "
                        "multithreaded BLAS stalls on shared cores; raise it for SmolLM2-sized pools)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="skip report.html and the summary table")


def add_parser(sub) -> None:
    from karcher_lab.experiment.grid import DEFAULT_METHODS

    p = sub.add_parser("sweep", help="merge the first m experts of a pool with every method, for each m",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", default="tiny", help="pool name (tiny, small, medium, smollm2) or directory (default tiny)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="merge methods (default: the paper's baselines and karcher)")
    p.add_argument("--m", nargs="+", default=["2..11"], help="numbers of experts: 2..11 (default), or 2 3 5, or 2,3,5")
    p.add_argument("--order", nargs="+", default=["near", "far"],
                   help="expert orders: near (closest to the base first), far, pool, or a comma-separated task list")
    add_sweep_arguments(p, out="runs/sweep", per_task=64, draws=100)
    p.set_defaults(func=run)
