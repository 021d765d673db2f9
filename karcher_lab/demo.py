"""The main job: the sweep (:func:`karcher_lab.experiment.run_sweep`) on the tiny zoo with a reduced grid.

Builds the tiny pool first when it is not cached (a few minutes on 2 CPU cores, with a progress bar),
then merges the first m ∈ :data:`DEMO_M` experts with each of :data:`DEMO_METHODS`, with the experts in
near-first and in far-first order (the zoo's heterogeneity knob), measures function and collapse, and
writes ``runs/demo/report.html``. The grid and the measurement sizes are chosen so that the whole demo,
zoo build and virtual-environment set-up included, stays within 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import os
from typing import Callable

import pandas as pd

from karcher_lab.experiment import run_sweep
from karcher_lab.zoo import PoolNotBuiltError, build_pool, config_for, find_pool

DEMO_METHODS = ("linear", "slerp", "multislerp", "model_stock", "ties", "dare_ties", "della", "karcher")
DEMO_M = (2, 3, 5, 8, 11)
DEMO_ORDERS = ("near", "far")
DEMO_MEASURE = dict(per_task=32, probes_per_task=8, draws=50)
DEMO_OUT = "runs/demo"


def demo_pool(size: str = "tiny", log: Callable[[str], None] | None = print, progress: bool = True):
    """The pool of ``size``, built (and cached) first when it is not."""
    try:
        return find_pool(size)
    except PoolNotBuiltError:
        if log:
            log(f"building the {size} expert pool (cached afterwards) ...")
        return build_pool(config_for(size), progress=progress)


def run_demo(out: str | os.PathLike = DEMO_OUT, *, progress: bool = True,
             log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Build the tiny pool if needed, run the reduced sweep into ``out`` and return its results."""
    pool = demo_pool(log=log, progress=progress)
    return run_sweep(pool, methods=DEMO_METHODS, m_values=DEMO_M, orders=DEMO_ORDERS, out=out, progress=progress,
                     log=log, **DEMO_MEASURE)
