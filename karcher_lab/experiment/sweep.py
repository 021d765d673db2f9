"""The paper's experiment (its Figure 1, Figure 2 and Table 7): merge the first m experts of a pool, or of
a study of your own models, with every method, for m = 2…11, and measure function and collapse at each
(method, m).

    from karcher_lab.experiment import run_sweep
    results = run_sweep("tiny", methods=["linear", "ties", "karcher"], m_values=["2..11"], out="runs/tiny")
    results = run_sweep("my_study.yml", methods=["linear", "karcher"], m_values=["2..4"], out="runs/mine")

The subject (pool or study) is :mod:`~karcher_lab.experiment.subject`; the grid (orders, methods, m,
parameters, the distance that orders near and far) is :mod:`~karcher_lab.experiment.grid`; what is
measured is :mod:`~karcher_lab.experiment.measure`; the results table and its resumable storage are
:mod:`~karcher_lab.experiment.results`; the HTML report is :mod:`~karcher_lab.experiment.report`.

Merges run in memory through one :class:`karcher_lab.pipeline.SubsetMerger` per order on the experts'
state dicts, with equal weights 1/m; a method that requires a base gets the pool's (or study's), and a
pair method (slerp, arcee_fusion, nearswap) takes the order's first expert as its base. karcher keeps one
session over all of the order's experts, giving weight 0 to the experts beyond m (zero-weight experts
are excluded from the Karcher mean), so every expert's Gram matrices are computed once per order and
each m only re-solves the small m × m problem. Every cell and expert is measured by one
:class:`karcher_lab.measurement.MeasurementEngine` (exact match by greedy decoding; a study's tasks with
their own scoring options).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from karcher_lab.checks import check_count
from karcher_lab.diagnostics.activations import SITES
from karcher_lab.experiment.grid import DEFAULT_METHODS, Cell, SweepGrid, describe_distance, make_grid
from karcher_lab.experiment.measure import EXPERT, expert_rows, measure_merge
from karcher_lab.experiment.results import ResultStore, cell_key, load_results
from karcher_lab.experiment.subject import SweepSubject
from karcher_lab.measurement import MeasurementSettings
from karcher_lab.methods.registry import get_method
from karcher_lab.pipeline.subsets import SubsetMerger
from karcher_lab.study import Study
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
    source: Pool | Study | str | os.PathLike = "tiny",
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    m_values: Sequence[str | int] = ("2..11",),
    orders: Sequence[str] = ("near", "far"),
    distance: str | None = None,
    out: str | os.PathLike = DEFAULT_OUT,
    per_task: int | None = None,
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

    Parameters
    ----------
    source : Pool, Study or str
        A Pool, a pool name or directory, a :class:`~karcher_lab.study.Study`, or the path of a study YAML
        (``.yml`` / ``.yaml``, :func:`karcher_lab.load_study`). A study's experts must each own a task
        (the task of the same name).
    methods, m_values, orders, params
        The grid (:func:`~karcher_lab.experiment.grid.make_grid`): merge methods; m as ints, ``"2..11"``
        or ``"2,3,5"``; orders ``near``, ``far``, ``pool`` or a comma-separated list of experts;
        {method: {parameter: value}} over :data:`~karcher_lab.experiment.grid.DEFAULT_PARAMS`.
    distance : {"level", "norm", "angle"}, optional
        What near and far are ordered by: the zoo's heterogeneity levels (the default where every expert
        has one), the relative task-vector norm ‖θ_i − θ_0‖ / ‖θ_0‖ (the default otherwise) or the angle
        to the base (:mod:`karcher_lab.experiment.grid`).
    out : str or path-like
        The run directory. Cells already in it are skipped; it holds one pool or study and one set of
        measurement settings (a rerun with others is refused, :meth:`ResultStore.check_config`).
    per_task : int, optional
        Evaluation examples per task for the function metrics: default 32 per pool task; a study's tasks
        are used whole unless this caps them (a task's own ``limit`` applies as well).
    probes_per_task : int
        Probe sequences per task for the activations (a pool's, or a study's without probe texts).
    draws : int
        Bootstrap draws (≥ 2).
    sites, seed, device
        Activation sites; seed of the examples, bootstrap and randomized methods; cpu or cuda.
    progress : bool
        Progress bars.
    report : bool
        Write ``out/report.html`` and log the summary table through ``log``.
    log : callable, optional
        Where the run's messages go (None: nowhere).

    Returns
    -------
    DataFrame
        The results table (:data:`~karcher_lab.experiment.results.RESULT_COLUMNS`); the experts' own rows
        (``method`` = "expert") hold each expert's scores on its own task. Its ``pool`` column holds the
        pool's or the study's name.

    Every argument, the counts of experts against m and a study's experts and tasks are checked before
    the run directory is written and before any model is loaded.
    """
    settings = MeasurementSettings(sites=sites, draws=draws, seed=seed, exact_match_mode="greedy",
                                   eval_batch_size=MEASURE_BATCH, probe_batch_size=MEASURE_BATCH, device=device)
    if per_task is not None:
        check_count("per_task", per_task)
    check_count("probes_per_task", probes_per_task)
    grid = make_grid(source, methods=methods, m_values=m_values, orders=orders, params=params, distance=distance)
    subject = grid.subject
    store = ResultStore(out)
    config = dict(subject.identity(per_task, probes_per_task), draws=draws, sites=list(settings.sites), seed=seed,
                  params=grid.params)
    if grid.distance != "level":  # runs ordered by the zoo's levels keep the config they always had
        config["distance"] = grid.distance
    store.check_config(config)
    cells = grid.cells()
    todo = [c for c in cells if not store.has(_key(c))]
    experts = [t for t in grid.tasks() if not store.has(_expert_key(t))]
    if log:
        ordered = [o for o in grid.orders if o in ("near", "far")]
        by = f"; {' and '.join(ordered)} by {describe_distance(subject, grid.distance)}" if ordered else ""
        log(f"sweep of {subject.label} into {store.run_dir}: {len(cells)} cells "
            f"({len(cells) - len(todo)} already done), orders {', '.join(grid.orders)}, m = {list(grid.m_values)}{by}")
    if todo or experts:
        _run_cells(grid, store, todo, experts, settings, per_task=per_task, probes_per_task=probes_per_task,
                   progress=progress)
    store.consolidate()
    results = load_results(store.run_dir)
    if report:
        from karcher_lab.experiment.report import summary_table, write_report

        path = write_report(results, subject, store.run_dir / "report.html", distance=grid.distance)
        if log:
            log(summary_table(results))
            log(f"report: {path}")
    return results


def _run_cells(grid: SweepGrid, store: ResultStore, todo: list[Cell], experts: list[str], settings: MeasurementSettings,
               *, per_task: int | None, probes_per_task: int, progress: bool) -> None:
    subject: SweepSubject = grid.subject
    engine = subject.engine(settings=settings, per_task=per_task, probes_per_task=probes_per_task, names=grid.tasks())
    for task in _progress(experts, progress, desc="experts", unit="expert"):
        store.write(_expert_key(task), expert_rows(engine, subject.name, task))
    bar = _progress(todo, progress, desc="merges", unit="cell")
    sources, _ = subject.sources()
    mergers = {order: SubsetMerger([sources[t] for t in tasks[: max(grid.m_values)]], base=subject.merge_base(),
                                   device=settings.device)
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
        identity = dict(pool=subject.name, order=cell.order, method=cell.method, m=cell.m, experts=cell.experts)
        store.write(_key(cell), measure_merge(engine, merged.state, identity, cell.tasks, seconds))
