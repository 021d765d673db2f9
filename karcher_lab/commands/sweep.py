"""`karcher-lab sweep`: the paper's experiment on any pool, or on a study of your own models (merge
m = 2…11 experts with every method).

    karcher-lab sweep [--pool tiny|smollm2|DIR | --study study.yml] [--methods linear ties karcher ...]
                      [--m 2..11] [--order near far] [--distance level|norm|angle] [--out runs/NAME]
                      [--per-task N] [--probes N] [--draws N] [--param ties.density=0.3 ...]
                      [--threads N] [--device cpu|cuda]
                      [--executor local|ray] [--ray-address ADDR] [--num-cpus-per-cell N] [--num-gpus-per-cell N]

One of --pool (default: the tiny pool) and --study. Resumable: rerunning the same command skips the
cells already in --out. Writes --out/results.csv and --out/report.html and prints the summary table.
--executor ray runs each cell as a Ray task (pip install 'karcher-lab[ray]'): every node must see the
experts, the data and --out by the same paths (a shared filesystem).
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


POOL_EXAMPLES = 64
"""`sweep`'s held-out examples per pool task when --per-task is not given (a study's tasks are used whole)."""


def run(args: argparse.Namespace) -> int:
    from karcher_lab import load_study
    from karcher_lab.experiment import run_sweep

    prepare_runtime(args.threads)
    source = load_study(args.study) if args.study is not None else args.pool or "tiny"
    per_task = args.per_task if args.per_task is not None or args.study is not None else POOL_EXAMPLES
    run_sweep(source, methods=args.methods, m_values=args.m, orders=args.order, distance=args.distance,
              out=args.out, per_task=per_task, probes_per_task=args.probes, draws=args.draws, sites=args.sites,
              params=parse_params(args.param), seed=args.seed, device=args.device, executor=args.executor,
              ray_address=args.ray_address, resources=ray_resources(args), progress=not args.quiet,
              report=not args.no_report)
    return 0


def ray_resources(args: argparse.Namespace) -> dict[str, float] | None:
    """Each cell's Ray resources from --num-cpus-per-cell / --num-gpus-per-cell (None: the defaults);
    refused without --executor ray."""
    given = {key: value for key, value in (("num_cpus", args.num_cpus_per_cell), ("num_gpus", args.num_gpus_per_cell))
             if value is not None}
    if (given or args.ray_address is not None) and args.executor != "ray":
        raise ParameterError("--ray-address, --num-cpus-per-cell and --num-gpus-per-cell need --executor ray")
    return given or None


def add_sweep_arguments(p: argparse.ArgumentParser, *, out: str, per_task: int | None, draws: int) -> None:
    """The measurement options shared by `sweep` and `pairwise`; ``per_task`` None: :data:`POOL_EXAMPLES`
    per pool task, a study's tasks whole."""
    from karcher_lab.diagnostics.activations import SITES

    default = (f"default {per_task}" if per_task is not None
               else f"default {POOL_EXAMPLES} per pool task; a study's tasks are used whole")
    p.add_argument("--out", default=out, help=f"run directory (default {out}); a rerun resumes it")
    p.add_argument("--per-task", type=int, default=per_task,
                   help=f"held-out examples per task for accuracy, NLL and KL ({default})")
    p.add_argument("--probes", type=int, default=8,
                   help="probe sequences per task for the activations, unless a study gives probe texts (default 8)")
    p.add_argument("--draws", type=int, default=draws, help=f"bootstrap draws for the collapse metrics (default {draws})")
    p.add_argument("--sites", nargs="+", default=list(SITES), help=f"activation sites (default: {' '.join(SITES)})")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="override a method parameter (repeatable), e.g. ties.density=0.3")
    p.add_argument("--seed", type=int, default=0, help="seed of the task examples, bootstrap and randomized methods")
    p.add_argument("--device", help="cpu or cuda (default: a study's device, else cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the zoo's small models run fastest on one thread, and "
                        "multithreaded BLAS stalls on shared cores; raise it for SmolLM2-sized pools)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="skip report.html and the summary table")


def add_parser(sub) -> None:
    from karcher_lab.experiment.grid import DEFAULT_METHODS, ORDER_DISTANCES
    from karcher_lab.experiment.sweep import EXECUTORS

    p = sub.add_parser("sweep", help="merge the first m experts of a pool or study with every method, for each m",
                       description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--pool", help="pool name (tiny, small, medium, smollm2) or directory (default tiny)")
    source.add_argument("--study", help="study YAML of your own experts, tasks and probes (karcher_lab.load_study)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="merge methods (default: the paper's baselines and karcher)")
    p.add_argument("--m", nargs="+", default=["2..11"], help="numbers of experts: 2..11 (default), or 2 3 5, or 2,3,5")
    p.add_argument("--order", nargs="+", default=["near", "far"],
                   help="expert orders: near (closest to the base first), far, pool (as given), or a comma-separated "
                        "list of experts")
    p.add_argument("--distance", choices=ORDER_DISTANCES,
                   help="what orders near and far: the zoo's heterogeneity level (default for zoo pools), the relative "
                        "task-vector norm |θ_i − θ_0| / |θ_0| (default otherwise) or the angle to the base; without a "
                        "base, distances are taken from the experts' mean")
    add_sweep_arguments(p, out="runs/sweep", per_task=None, draws=100)
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where the cells run: here, one after the other (default), or each as a Ray task on a Ray "
                        "cluster (pip install 'karcher-lab[ray]'); every node must see the experts, data and --out "
                        "by the same paths")
    p.add_argument("--ray-address", help="Ray cluster: 'auto' (a running cluster on this machine), 'ray://HOST:10001' "
                                          "(Ray Client), or none: RAY_ADDRESS, else a local cluster for this run")
    p.add_argument("--num-cpus-per-cell", type=float, help="Ray CPUs per cell (default 1; torch uses that many threads)")
    p.add_argument("--num-gpus-per-cell", type=float, help="Ray GPUs per cell (default 0; > 0 needs --device cuda)")
    p.set_defaults(func=run)
