"""Where a sweep's cells run: in this process, or as Ray tasks on a Ray cluster.

Both executors run the same units (an expert's own rows, or one merge and its measurement) through a
:class:`~karcher_lab.experiment.sweep.CellRunner`, which writes each finished unit to the run's
:class:`~karcher_lab.experiment.results.ResultStore` and records each failed one there; a failure never
stops the run.

- :func:`run_here`: one runner in this process, the units one after the other.
- :func:`run_on_ray`: each unit is one Ray task (``num_cpus`` / ``num_gpus`` per task from
  ``resources``). A task receives the :class:`~karcher_lab.experiment.sweep.SweepJob` (the grid, the
  settings and the run directory: references, no weights) and reads the experts and data by path, so
  every node must see the same paths: a shared filesystem, or the same models in each node's hub cache.
  The task writes its cell into the run directory itself (a filesystem every node shares; the store
  needs no lock, :mod:`~karcher_lab.experiment.results`), and returns only its error message, or None.
  A worker process keeps the runner of the last run it served (its engine, the experts' measurements,
  each order's merger), so the cells a worker runs after its first reuse what it has loaded. The
  progress bar advances as Ray reports each task finished. A task whose worker died (out of memory, a
  lost node) is retried by Ray, and if it still fails it is recorded like a cell that raised.

Ray is an optional dependency: ``pip install 'karcher-lab[ray]'``.
"""
from __future__ import annotations

import os
from numbers import Real
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from karcher_lab.errors import InputError, NotSupportedError, ParameterError
from karcher_lab.experiment.subject import IN_MEMORY

if TYPE_CHECKING:
    from karcher_lab.experiment.sweep import CellRunner, SweepJob, Unit

RAY_HINT = "pip install 'karcher-lab[ray]'"
DEFAULT_RESOURCES: dict[str, Any] = {"num_cpus": 1, "num_gpus": 0}
"""The Ray resources of one cell unless ``resources`` says otherwise."""
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")
"""The Ray task options ``resources`` may set."""

_WORKER_RUNNER: dict[str, "CellRunner"] = {}
"""In a Ray worker process: the runner of the run it last served, by the run's token (at most one)."""


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cells", unit="cell")


def run_here(runner: "CellRunner", units: Iterable["Unit"], *, progress: bool) -> None:
    """Run every unit in this process, one after the other (failures are recorded and skipped over)."""
    from karcher_lab.experiment.sweep import unit_label

    units = list(units)
    bar = _bar(progress, len(units))
    for unit in units:
        if bar is not None:
            bar.set_postfix_str(unit_label(unit))
        runner.run(unit)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def require_ray() -> Any:
    """The ``ray`` module.

    Raises
    ------
    NotSupportedError
        Ray is not installed (the message says how to install it).
    """
    try:
        import ray
    except ImportError as err:
        raise NotSupportedError(f"executor 'ray' needs Ray ({err}): {RAY_HINT}") from None
    return ray


def held_in_memory(config: Any, where: str = "") -> list[str]:
    """The entries of a run's config that name a model or data held in memory (``"in memory"``)."""
    if isinstance(config, str):
        return [where] if config.startswith(IN_MEMORY) else []
    if isinstance(config, Mapping):
        return [w for k, v in config.items() for w in held_in_memory(v, f"{where}.{k}" if where else str(k))]
    if isinstance(config, (list, tuple)):
        return [w for i, v in enumerate(config) for w in held_in_memory(v, f"{where}[{i}]")]
    return []


def check_ray(config: Mapping[str, Any], device: str, resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check that a run can go to Ray and return each cell's Ray resources.

    Parameters
    ----------
    config : mapping
        The run's config (what is swept, :meth:`SweepSubject.identity` and the settings).
    device : str
        The sweep's device.
    resources : mapping, optional
        Ray resources per cell over :data:`DEFAULT_RESOURCES` (keys :data:`RESOURCE_KEYS`).

    Returns
    -------
    dict
        The Ray options of each cell's task.

    Raises
    ------
    NotSupportedError
        Ray is not installed.
    InputError
        A model or data held in memory: Ray's workers reach them by path only.
    ParameterError
        An unknown resource, a negative amount, GPUs with ``device="cpu"`` or ``device="cuda"`` without
        GPUs.
    """
    require_ray()
    memory = held_in_memory(config)
    if memory:
        raise InputError(f"executor 'ray' reaches experts and data by path, but {', '.join(memory)} "
                         "is held in memory: save it to a folder or file every node can read, and name that")
    merged = dict(DEFAULT_RESOURCES)
    if resources is not None:
        if not isinstance(resources, Mapping):
            raise ParameterError(f"resources must be a mapping such as {DEFAULT_RESOURCES}, got {resources!r}")
        unknown = sorted(set(resources) - set(RESOURCE_KEYS))
        if unknown:
            raise ParameterError(f"resources: unknown key(s) {unknown}; known: {list(RESOURCE_KEYS)}")
        merged.update(resources)
    for key in ("num_cpus", "num_gpus", "memory"):
        value = merged.get(key)
        if value is not None and (not isinstance(value, Real) or isinstance(value, bool) or value < 0):
            raise ParameterError(f"resources: {key} must be a number >= 0, got {value!r}")
    if merged["num_cpus"] <= 0:
        raise ParameterError("resources: num_cpus must be > 0 (each cell runs torch on its CPUs)")
    gpus = merged["num_gpus"] or 0
    if gpus > 0 and not device.startswith("cuda"):
        raise ParameterError(f"resources ask for {gpus} GPU(s) per cell, but device is {device!r}: use device='cuda'")
    if device.startswith("cuda") and gpus <= 0:
        raise ParameterError("device 'cuda' with executor 'ray' needs GPUs per cell: resources={'num_gpus': 1} "
                             "(--num-gpus-per-cell 1), so that Ray places each cell on a GPU of its own")
    return merged


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to Ray unless already connected; True when this call connected (and so must disconnect)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"at {address!r}" if address else "(RAY_ADDRESS, or a new local one)"
        raise InputError(f"could not connect to a Ray cluster {where}: {err}") from err
    return True


def _run_unit(job: "SweepJob", unit: "Unit") -> str | None:
    """A Ray task: run one unit with this worker's runner of ``job`` (made on first use)."""
    import torch

    runner = _WORKER_RUNNER.get(job.token)
    if runner is None:
        _WORKER_RUNNER.clear()
        if job.cwd.is_dir():
            os.chdir(job.cwd)  # relative paths resolve as in the driver (this worker serves this driver only)
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        runner = _WORKER_RUNNER[job.token] = job.runner()
    return runner.run(unit)


def run_on_ray(job: "SweepJob", units: Iterable["Unit"], *, address: str | None, resources: Mapping[str, Any],
               progress: bool) -> None:
    """Run every unit as one Ray task (see the module docstring) and wait for all of them.

    Parameters
    ----------
    job : SweepJob
    units : iterable of Unit
    address : str, optional
        The Ray cluster (:func:`ray.init`'s ``address``); ignored when this process is already connected.
        A cluster this call starts (``address`` None and no ``RAY_ADDRESS``) is shut down at the end.
    resources : mapping
        Each task's Ray options (:func:`check_ray`).
    progress : bool
        A progress bar that advances as tasks finish.

    On an interrupt (Ctrl-C) the tasks not yet finished are cancelled; the cells already written stay.
    """
    from karcher_lab.experiment.results import ResultStore
    from karcher_lab.experiment.sweep import unit_identity, unit_key, unit_label

    ray = require_ray()
    units = list(units)
    connected = _connect(ray, address)
    pending: dict = {}
    try:
        task = ray.remote(_run_unit).options(**resources)
        job_ref = ray.put(job)
        pending = {task.remote(job_ref, unit): unit for unit in units}
        store, bar = ResultStore(job.run_dir), _bar(progress, len(units))
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                unit = pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as err:  # the task itself died (worker lost): recorded like a cell's error
                    store.write_failure(unit_key(unit), unit_identity(job.grid.subject.name, unit), err)
                if bar is not None:
                    bar.set_postfix_str(unit_label(unit))
                    bar.update(1)
        if bar is not None:
            bar.close()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if connected:
            ray.shutdown()
