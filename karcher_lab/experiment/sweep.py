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

Merges run through one :class:`karcher_lab.pipeline.SubsetMerger` per order, reading the experts'
checkpoints one tensor at a time, with equal weights 1/m; a method that requires a base gets the pool's (or study's), and a
pair method (slerp, arcee_fusion, nearswap) takes the order's first expert as its base. karcher keeps one
session over all of the order's experts, giving weight 0 to the experts beyond m (zero-weight experts
are excluded from the Karcher mean), so every expert's Gram matrices are computed once per order and
each m only re-solves the small m × m problem. Every cell and expert is measured by one
:class:`karcher_lab.measurement.MeasurementEngine` (exact match by greedy decoding; a study's tasks with
their own scoring options). A study's lm-evaluation-harness tasks (``lm_eval:TASK``) are scored on every
expert and merge through :mod:`karcher_lab.diagnostics.lm_eval_bridge`, their metrics (``mean``) and
standard errors (``std``) as scope ``task`` rows.

Where the cells run is the *executor* (:mod:`karcher_lab.experiment.executors`): ``local`` (the
default) runs them one after the other in this process; ``ray`` runs each cell (one merge and its
measurement, or one expert's measurement) as a Ray task on a Ray cluster. Either way each cell is
written to the run directory's :class:`~karcher_lab.experiment.results.ResultStore` as it finishes, a
cell that raises is recorded there with its error and the others go on, and a rerun skips every cell
already done. The cells are the same computation under both executors (:class:`CellRunner`), so their
numbers agree value for value.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from karcher_lab.checks import check_count
from karcher_lab.diagnostics.activations import SITES
from karcher_lab.errors import InputError
from karcher_lab.experiment.grid import DEFAULT_METHODS, Cell, SweepGrid, describe_distance, make_grid
from karcher_lab.experiment.measure import EXPERT, expert_rows, measure_merge
from karcher_lab.experiment.results import RESULT_COLUMNS, ResultStore, cell_key, load_results
from karcher_lab.experiment.subject import StudySubject, SweepSubject
from karcher_lab.measurement import MeasurementEngine, MeasurementSettings
from karcher_lab.methods.registry import get_method
from karcher_lab.pipeline.subsets import SubsetMerger
from karcher_lab.study import Study, as_study
from karcher_lab.zoo import Pool

DEFAULT_OUT = "runs/sweep"
MEASURE_BATCH = 64
"""Sequences per forward pass when measuring (evaluation examples and probes)."""


EXECUTORS = ("local", "ray")
"""Where the cells run (:mod:`karcher_lab.experiment.executors`)."""

Unit = Cell | str
"""One unit of work of a sweep: a merge :class:`~karcher_lab.experiment.grid.Cell`, or an expert's name
(its own rows)."""


def _key(cell: Cell) -> str:
    return cell_key(cell.order, cell.method, cell.m, cell.experts)


def _expert_key(task: str) -> str:
    return cell_key("", EXPERT, 1, task)


def unit_key(unit: Unit) -> str:
    """The store key of a cell or of an expert's rows."""
    return _expert_key(unit) if isinstance(unit, str) else _key(unit)


def unit_label(unit: Unit) -> str:
    """A short description of a unit, for progress bars and messages."""
    return f"expert {unit}" if isinstance(unit, str) else f"{unit.order} m={unit.m} {unit.method}"


def unit_identity(subject_name: str, unit: Unit) -> dict[str, Any]:
    """The pool, order, method, m and experts of a unit's rows."""
    if isinstance(unit, str):
        return dict(pool=subject_name, order="", method=EXPERT, m=1, experts=unit)
    return dict(pool=subject_name, order=unit.order, method=unit.method, m=unit.m, experts=unit.experts)


@dataclass(frozen=True)
class SweepJob:
    """What every cell of one run shares, by reference only (the subject names its experts and data by
    path; no weights): it is what a Ray task receives. ``run_dir`` is absolute; ``cwd`` is the driver's
    working directory (relative paths of a study made in Python resolve against it on the workers too);
    ``token`` tells apart the runs a worker process serves, so that it keeps one :class:`CellRunner`
    per run."""

    grid: SweepGrid
    settings: MeasurementSettings
    per_task: int | None
    probes_per_task: int
    run_dir: Path
    cwd: Path
    token: str

    def runner(self) -> "CellRunner":
        return CellRunner(self)


class CellRunner:
    """Runs the cells of a :class:`SweepJob` in this process: the measurement engine and each order's
    :class:`~karcher_lab.pipeline.SubsetMerger` (over the order's first max(m) experts, so that karcher's
    session and its numbers are the same whichever cells a process runs; the experts are read from their
    checkpoints one tensor at a time) are made on first use; each
    finished cell is written to the run's store, each failed one recorded there."""

    def __init__(self, job: SweepJob):
        self.job = job
        self.store = ResultStore(job.run_dir)
        self._engine: MeasurementEngine | None = None
        self._mergers: dict[str, SubsetMerger] = {}

    @property
    def engine(self) -> MeasurementEngine:
        if self._engine is None:
            job = self.job
            self._engine = job.grid.subject.engine(settings=job.settings, per_task=job.per_task,
                                                   probes_per_task=job.probes_per_task, names=job.grid.tasks())
        return self._engine

    def merger(self, order: str) -> SubsetMerger:
        if order not in self._mergers:
            grid = self.job.grid
            experts = grid.orders[order][: max(grid.m_values)]
            sources, _ = grid.subject.sources(experts)
            self._mergers[order] = SubsetMerger([sources[t] for t in experts], base=grid.subject.merge_base(),
                                                device=self.job.settings.device)
        return self._mergers[order]

    def merge(self, cell: Cell) -> tuple[dict[str, torch.Tensor], float]:
        """The cell's merge (equal weights 1/m), written into the engine's model: its tensors by name (the
        model's own), and the seconds the merge took."""
        method, merger = get_method(cell.method), self.merger(cell.order)  # the experts are opened before timing
        writer = self.engine.merge_writer()
        start = time.perf_counter()
        merger.merge(cell.method, range(cell.m), [1.0 / cell.m] * cell.m,
                     params=self.job.grid.params.get(cell.method, {}), seed=self.job.settings.seed,
                     use_base=method.base == "required", first_as_base=method.pair, sink=writer)
        seconds = time.perf_counter() - start
        writer.check_complete()
        return writer.written, seconds

    def rows(self, unit: Unit) -> pd.DataFrame:
        """Every result row of a unit (the expert's own rows, or the merge's)."""
        engine, subject = self.engine, self.job.grid.subject
        identity = unit_identity(subject.name, unit)
        if isinstance(unit, str):
            rows = expert_rows(engine, subject.name, unit)
            if _lm_eval_tasks(subject):
                engine.load_state(dict(engine.experts.state(unit)))
        else:
            state, seconds = self.merge(unit)
            rows = measure_merge(engine, state, identity, unit.tasks, seconds)  # the merge stays in engine.model
        if _lm_eval_tasks(subject):
            rows = pd.concat([rows, lm_eval_rows(subject.study, engine, identity)], ignore_index=True)
        return rows

    def run(self, unit: Unit) -> str | None:
        """Run one unit and write its rows to the store; on an exception, record it in the store and
        return it as ``"Type: message"`` (None on success)."""
        key = unit_key(unit)
        try:
            rows = self.rows(unit)
        except Exception as err:  # a failed cell is recorded and the run goes on (module docstring)
            self.store.write_failure(key, unit_identity(self.job.grid.subject.name, unit), err)
            return f"{type(err).__name__}: {err}"
        self.store.write(key, rows)
        return None


def _lm_eval_tasks(subject: SweepSubject) -> dict:
    """The lm-eval tasks of a study subject ({} for a pool)."""
    return subject.study.lm_eval_tasks if isinstance(subject, StudySubject) else {}


def lm_eval_rows(study: Study, engine: MeasurementEngine, identity: dict) -> pd.DataFrame:
    """The rows of the model in ``engine.model`` on the study's lm-eval tasks: scope ``task``, lm-eval's
    metric names, ``mean`` its value and ``std`` its standard error. Tasks with the same ``limit`` are
    scored in one lm-eval run."""
    from karcher_lab.diagnostics.lm_eval_bridge import lm_eval_scores

    by_limit: dict[int | None, dict[str, str]] = {}
    for spec in study.lm_eval_tasks.values():
        by_limit.setdefault(spec.limit, {})[spec.name] = spec.task
    settings = engine.settings
    tables = [lm_eval_scores(engine.model, engine.data.tokenizer, tasks, include=study.lm_eval_include, limit=limit,
                             batch_size=settings.eval_batch_size) for limit, tasks in by_limit.items()]
    table = pd.concat(tables, ignore_index=True)
    return pd.DataFrame([dict(identity, scope="task", task=r.task, site="", layer=-1, metric=r.metric, mean=r.mean,
                              std=r.std) for r in table.itertuples()], columns=RESULT_COLUMNS)


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
    device: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    resources: Mapping[str, Any] | None = None,
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
        Activation sites; seed of the examples, bootstrap and randomized methods; cpu or cuda (default:
        a study's ``device``, else cpu).
    executor : {"local", "ray"}
        Where the cells run: one after the other in this process (default), or each as a Ray task on a
        Ray cluster (:func:`karcher_lab.experiment.executors.run_on_ray`; needs ``pip install
        'karcher-lab[ray]'``). Ray's workers read the experts and data by the paths the pool or study
        gives (a shared filesystem, or the same hub cache on each node) and write their cells into
        ``out``, which must be on a filesystem every node shares.
    ray_address : str, optional
        The Ray cluster (``executor="ray"``): None connects to the cluster this process is already
        connected to, or to ``RAY_ADDRESS``, or else starts a local one for the run; ``"auto"`` an
        existing cluster on this machine; ``"ray://HOST:10001"`` a remote one through Ray Client.
    resources : mapping, optional
        Ray resources of each cell (``executor="ray"``): default ``{"num_cpus": 1, "num_gpus": 0}``;
        ``num_gpus`` > 0 needs ``device="cuda"``, and ``device="cuda"`` needs ``num_gpus`` > 0.
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

    Every argument, the counts of experts against m, a study's experts and tasks, its lm-eval tasks
    and their data, the executor and its resources are checked before the run directory is written and
    before any model is loaded. Cells that raised are listed through ``log`` and recorded in
    ``out/failed/`` (:meth:`ResultStore.failures`); the run still returns every finished cell.
    """
    from karcher_lab.checks import check_choice
    from karcher_lab.experiment import executors

    check_choice("executor", executor, EXECUTORS)
    study = as_study(source)
    device = device or (study.device if study is not None else None) or "cpu"
    settings = MeasurementSettings(sites=sites, draws=draws, seed=seed, exact_match_mode="greedy",
                                   eval_batch_size=MEASURE_BATCH, probe_batch_size=MEASURE_BATCH, device=device)
    if per_task is not None:
        check_count("per_task", per_task)
    check_count("probes_per_task", probes_per_task)
    grid = make_grid(study or source, methods=methods, m_values=m_values, orders=orders, params=params, distance=distance)
    subject = grid.subject
    store = ResultStore(out)
    config = dict(subject.identity(per_task, probes_per_task), draws=draws, sites=list(settings.sites), seed=seed,
                  params=grid.params)
    if grid.distance != "level":  # runs ordered by the zoo's levels keep the config they always had
        config["distance"] = grid.distance
    lm_eval = _lm_eval_tasks(subject)
    if lm_eval:
        from karcher_lab.diagnostics.lm_eval_bridge import check_tasks

        include = subject.study.lm_eval_include
        config["lm_eval"] = dict(tasks={name: [spec.task, spec.limit] for name, spec in lm_eval.items()},
                                 include=[str(folder) for folder in include])
        check_tasks([spec.task for spec in lm_eval.values()], include)
    ray_resources = executors.check_ray(config, device, resources) if executor == "ray" else None
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
        job = SweepJob(grid, settings, per_task, probes_per_task, store.run_dir.resolve(), Path.cwd(), uuid.uuid4().hex)
        units: list[Unit] = [*experts, *todo]
        if executor == "ray":
            executors.run_on_ray(job, units, address=ray_address, resources=ray_resources, progress=progress)
        else:
            executors.run_here(job.runner(), units, progress=progress)
    failed = store.failures()
    if log and len(failed):
        log(f"{len(failed)} cell(s) failed (recorded in {store.failed_dir}; a rerun tries them again):")
        for row in failed.itertuples():
            log(f"  {row.order or 'expert'} m={row.m} {row.method} {row.experts}: {row.error}: {row.message}")
    if not store.done():
        raise InputError(f"no cell of the sweep finished: every one failed (recorded in {store.failed_dir}); "
                         f"first: {failed.iloc[0]['error']}: {failed.iloc[0]['message']}")
    store.consolidate()
    results = load_results(store.run_dir)
    if report:
        from karcher_lab.experiment.report import summary_table, write_report

        path = write_report(results, subject, store.run_dir / "report.html", distance=grid.distance)
        if log:
            log(summary_table(results))
            log(f"report: {path}")
    return results
