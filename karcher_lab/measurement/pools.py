"""A :class:`~karcher_lab.measurement.engine.MeasurementEngine` for a zoo pool: its experts, each judged
on its own task, held-out examples of the tasks from the zoo's generators, and a probe batch of
examples of every task of the pool."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from karcher_lab.checks import check_count
from karcher_lab.errors import ParameterError
from karcher_lab.measurement.engine import MeasurementEngine
from karcher_lab.measurement.settings import MeasurementSettings
from karcher_lab.zoo import Pool, get_task, load


def probe_tasks(pool: Pool) -> tuple[str, ...]:
    """The tasks of a pool's probe batch: every expert's task, in pool order, whatever is merged, so that
    every merge of the pool (and a resumed sweep with a larger grid) is measured on the same probes."""
    return tuple(e["task"] for e in pool.experts)


def engine_for_pool(
    pool: Pool,
    *,
    examples_per_task: int,
    probes_per_task: int,
    settings: MeasurementSettings,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    probe_seed: int | None = None,
    experts: Mapping[str, torch.nn.Module] | None = None,
) -> MeasurementEngine:
    """The measurement engine of ``pool``.

    Parameters
    ----------
    pool : Pool
        A built pool; the model merged states are loaded into (and the tokenizer) is its base, or its
        first expert when it has no base (loaded now).
    examples_per_task : int
        Held-out ("eval" split) examples per task for the function metrics (≥ 1).
    probes_per_task : int
        Probe sequences (prompt + answer of held-out examples) per pool task (≥ 1; :func:`probe_tasks`).
    settings : MeasurementSettings
    tasks : sequence of str, optional
        The tasks with evaluation examples; default: every expert's task.
    seed : int
        Seed of the evaluation examples.
    probe_seed : int, optional
        Seed of the probe examples; default ``seed``.
    experts : mapping of str to model, optional
        Already loaded experts by task; default: each pool expert, loaded from its checkpoint when
        first needed.

    Returns
    -------
    MeasurementEngine
        Experts named by their task and judged on it.
    """
    check_count("examples_per_task", examples_per_task)
    check_count("probes_per_task", probes_per_task)
    pool_tasks = [e["task"] for e in pool.experts]
    tasks = pool_tasks if tasks is None else list(tasks)
    unknown = [t for t in [*tasks, *(experts or {})] if t not in pool_tasks]
    if unknown:
        raise ParameterError(f"task(s) {unknown} are not in pool {pool.name}: {pool_tasks}")
    if experts is None:
        experts = {task: (lambda path=str(pool.expert_path(task)): load(path)[0]) for task in tasks}
    model, tokenizer = load(str(pool.base_path) if pool.record.get("base") else pool.experts[0]["path"])
    examples = {task: get_task(task).examples("eval", examples_per_task, seed=seed) for task in tasks}
    probe_seed = seed if probe_seed is None else probe_seed
    probes = [e.prompt + e.answer for task in probe_tasks(pool)
              for e in get_task(task).examples("eval", probes_per_task, seed=probe_seed)]
    return MeasurementEngine(experts, tokenizer, examples, probes, model=model, settings=settings)
