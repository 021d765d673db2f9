"""The paper's experiment (its Figure 1, Figure 2 and Table 7): merge the first m experts of a pool with
every method, for m = 2…11, and measure function and collapse at each (method, m).

    from karcher_lab.experiment import run_sweep
    results = run_sweep("tiny", methods=["linear", "ties", "karcher"], m_values=["2..11"], out="runs/tiny")

The grid (orders, methods, m, parameters) is :mod:`~karcher_lab.experiment.grid`; what is measured is
:mod:`~karcher_lab.experiment.measure`; the results table and its resumable storage are
:mod:`~karcher_lab.experiment.results`; the HTML report is :mod:`~karcher_lab.experiment.report`.

Merges run in memory through one :class:`karcher_lab.pipeline.SubsetMerger` per order on the experts'
state dicts, with equal weights 1/m; a method that requires a base gets the pool's, and a pair method
(slerp, arcee_fusion, nearswap) takes the order's first expert as its base. karcher keeps one session
over all of the order's experts, giving weight 0 to the experts beyond m (zero-weight experts are
excluded from the Karcher mean), so every expert's Gram matrices are computed once per order and each m
only re-solves the small m × m problem. Every cell and expert is measured by one
:class:`karcher_lab.measurement.MeasurementEngine` (exact match by greedy decoding).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from karcher_lab.checks import check_count
from karcher_lab.diagnostics.activations import SITES
from karcher_lab.experiment.grid import DEFAULT_METHODS, Cell, SweepGrid, make_grid
from karcher_lab.experiment.measure import EXPERT, expert_rows, measure_merge
from karcher_lab.experiment.results import ResultStore, cell_key, load_results
from karcher_lab.measurement import MeasurementSettings, engine_for_pool, probe_tasks
from karcher_lab.methods.registry import get_method
from karcher_lab.pipeline.subsets import SubsetMerger
from karcher_lab.zoo import Pool

DEFAULT_OUT = "runs/sweep"
MEASURE_BATCH = 64
"""Sequences per forward pass when measuring (evaluation examples and probes)."""


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def _key(cell: Cell) -> str:
    return cell_key(cell.order, cell.method, cell.m, cell.experts)


def _expert_key(task: str) -> str:
    return cell_key("", EXPERT, 1, task)


def run_sweep(
    pool: Pool | str = "tiny",
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    m_values: Sequence[str | int] = ("2..11",),
    orders: Sequence[str] = ("near", "far"),
    out: str | os.PathLike = DEFAULT_OUT,
    per_task: int = 32,
    probes_per_task: int = 8,
    draws: int = 100,
    sites: Sequence[str] = SITES,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    report: bool = True,
    log: Callable[[str], None] | None = print,
) -> pd.DataFrame:
    """Run (or resume) the sweep into the run directory ``out`` and return its results table.

    ``pool``: a Pool, a pool name or directory. ``methods``, ``m_values`` (ints, ``"2..11"`` or
    ``"2,3,5"``), ``orders`` (``near``, ``far``, ``pool`` or a comma-separated task list) and
    ``params`` ({method: {parameter: value}} over :data:`~karcher_lab.experiment.grid.DEFAULT_PARAMS`)
    make the grid. ``per_task``: eval examples per task for the function metrics; ``probes_per_task``:
    probe sequences per task for the activations; ``draws``: bootstrap draws (≥ 2). Cells already in
    ``out`` are skipped; a run directory holds one pool and one set of measurement settings. With
    ``report``, writes ``out/report.html`` and logs the summary table through ``log``.
    """
    settings = MeasurementSettings(sites=sites, draws=draws, seed=seed, exact_match_mode="greedy",
                                   eval_batch_size=MEASURE_BATCH, probe_batch_size=MEASURE_BATCH, device=device)
    check_count("per_task", per_task)
    check_count("probes_per_task", probes_per_task)
    grid = make_grid(pool, methods=methods, m_values=m_values, orders=orders, params=params)
    store = ResultStore(out)
    store.check_config(dict(pool=grid.pool.name, pool_key=grid.pool.record.get("key", str(grid.pool.path)),
                            per_task=per_task, probes_per_task=probes_per_task, probe_tasks=list(probe_tasks(grid.pool)),
                            draws=draws, sites=list(settings.sites),
                            seed=seed, params=grid.params))
    cells = grid.cells()
    todo = [c for c in cells if not store.has(_key(c))]
    experts = [t for t in grid.tasks() if not store.has(_expert_key(t))]
    if log:
        log(f"sweep of pool {grid.pool.name} into {store.run_dir}: {len(cells)} cells "
            f"({len(cells) - len(todo)} already done), orders {', '.join(grid.orders)}, m = {list(grid.m_values)}")
    if todo or experts:
        _run_cells(grid, store, todo, experts, settings, per_task=per_task, probes_per_task=probes_per_task,
                   progress=progress)
    store.consolidate()
    results = load_results(store.run_dir)
    if report:
        from karcher_lab.experiment.report import summary_table, write_report

        path = write_report(results, grid.pool, store.run_dir / "report.html")
        if log:
            log(summary_table(results))
            log(f"report: {path}")
    return results


def _run_cells(grid: SweepGrid, store: ResultStore, todo: list[Cell], experts: list[str], settings: MeasurementSettings,
               *, per_task: int, probes_per_task: int, progress: bool) -> None:
    engine = engine_for_pool(grid.pool, examples_per_task=per_task, probes_per_task=probes_per_task,
                             settings=settings, tasks=grid.tasks(), seed=settings.seed)
    for task in _progress(experts, progress, desc="experts", unit="expert"):
        store.write(_expert_key(task), expert_rows(engine, grid.pool.name, task))
    bar = _progress(todo, progress, desc="merges", unit="cell")
    mergers = {order: SubsetMerger([engine.experts.state(t) for t in tasks[: max(grid.m_values)]],
                                   base=grid.pool.base_path)
               for order, tasks in grid.orders.items()}
    for cell in bar:
        if progress:
            bar.set_postfix_str(f"{cell.order} m={cell.m} {cell.method}")
        method = get_method(cell.method)
        start = time.perf_counter()
        merged = mergers[cell.order].merge(cell.method, range(cell.m), [1.0 / cell.m] * cell.m,
                                           params=grid.params.get(cell.method, {}), seed=settings.seed,
                                           use_base=method.base == "required", first_as_base=method.pair)
        seconds = time.perf_counter() - start
        identity = dict(pool=grid.pool.name, order=cell.order, method=cell.method, m=cell.m, experts=cell.experts)
        store.write(_key(cell), measure_merge(engine, merged.state, identity, cell.tasks, seconds))
