"""Zoo pools as studies.

- :func:`pool_study`: a built pool as a :class:`~karcher_lab.study.Study` in memory (the pool is a
  built-in study): experts named by their tasks, each task the built-in zoo task of that name, scored by
  the zoo's plain rules; the explorer and the sweep run every pool through it.
- :func:`export_pool_study`: a study written from a pool, laid out as a researcher's own files: the
  experts and the base as plain Hugging Face model folders, each task's held-out examples as a JSONL
  file, and the study YAML naming them (:func:`karcher_lab.load_study` reads it)::

    my_study/
      study.yml             name, base, experts, tasks; paths relative to this folder
      base/                 the pool's base model (config, safetensors weights, tokenizer)
      experts/<task>/       the expert fine-tuned on <task>
      data/<task>.jsonl     one {"prompt": ..., "answer": ...} per line

It gives notebooks and tests a study of real files without any setup beyond a built pool:

    from karcher_lab.study import export_pool_study, load_study
    study = load_study(export_pool_study("tiny", "my_study", tasks=["double", "units"], per_task=16))
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import yaml

from karcher_lab.checks import check_count
from karcher_lab.errors import EmptyInputError, ParameterError
from karcher_lab.io.output import atomic_directory, check_output_path
from karcher_lab.study.spec import Study
from karcher_lab.zoo import Pool, find_pool, get_task

STUDY_FILE = "study.yml"
BASE_DIR = "base"
EXPERTS_DIR = "experts"
DATA_DIR = "data"
"""The names of the study file and of the folders :func:`export_pool_study` writes."""


def probe_tasks(pool: Pool) -> tuple[str, ...]:
    """The tasks of a pool's probe batch: every expert's task, in pool order, whatever is merged, so that
    every merge of the pool (and a resumed sweep with a larger grid) is measured on the same probes."""
    return tuple(e["task"] for e in pool.experts)


def pool_probes(pool: Pool, per_task: int, seed: int = 0) -> list[str]:
    """The pool's probe texts: prompt + answer of ``per_task`` held-out examples of each of
    :func:`probe_tasks` (``get_task(task).examples("eval", per_task, seed=seed)``)."""
    check_count("probes_per_task", per_task)
    return [e.prompt + e.answer for task in probe_tasks(pool)
            for e in get_task(task).examples("eval", per_task, seed=seed)]


def pool_study(
    pool: Pool | str,
    *,
    tasks: Sequence[str] | None = None,
    probes_per_task: int | None = None,
    probe_seed: int = 0,
) -> Study:
    """A built pool as a :class:`~karcher_lab.study.Study`.

    Parameters
    ----------
    pool : Pool or str
        A built pool, or its name or directory (:func:`karcher_lab.zoo.find_pool`).
    tasks : sequence of str, optional
        The experts to take, by their tasks (default: every expert of the pool, in pool order).
    probes_per_task : int, optional
        Probe texts per pool task (:func:`pool_probes` with ``probe_seed``); default: the study's
        default probes (the tasks' prompts).
    probe_seed : int
        Seed of the probe examples.

    Returns
    -------
    Study
        Named as the pool; experts ``{task: expert folder}``, the pool's base when it has one, and tasks
        ``{task: task}`` (built-in zoo tasks, read with the evaluation seed and count the caller gives).

    Raises
    ------
    ParameterError
        A task the pool has no expert for (the message lists those it has).
    """
    pool = pool if isinstance(pool, Pool) else find_pool(str(pool))
    pool_tasks = [e["task"] for e in pool.experts]
    tasks = pool_tasks if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in pool_tasks]
    if unknown:
        raise ParameterError(f"task(s) {unknown} are not in pool {pool.name}: {pool_tasks}")
    probes = None if probes_per_task is None else pool_probes(pool, probes_per_task, probe_seed)
    return Study(experts={task: str(pool.expert_path(task)) for task in tasks},
                 base=str(pool.base_path) if pool.record.get("base") else None,
                 tasks={task: task for task in tasks}, probes=probes, name=pool.name)


def export_pool_study(
    pool: Pool | str,
    folder: str | os.PathLike,
    *,
    tasks: Sequence[str] | None = None,
    per_task: int = 16,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Write a pool's experts, base and task examples as a study folder (see the module docstring).

    Parameters
    ----------
    pool : Pool or str
        A built pool, or its name or directory (:func:`karcher_lab.zoo.find_pool`).
    folder : str or path-like
        The study folder to create; it must not exist yet. It appears complete or not at all.
    tasks : sequence of str, optional
        The experts to export, by their tasks (default: every expert of the pool); each becomes an
        expert and a task of the study.
    per_task : int
        Held-out examples written per task: ``get_task(task).examples("eval", per_task, seed=seed)``,
        the examples the study would read for the built-in task of that name.
    seed : int
        Seed of the examples.
    name : str, optional
        The study's name (default: ``"<pool name>-study"``).

    Returns
    -------
    Path
        The study YAML, ``folder/study.yml``.

    Raises
    ------
    PoolNotBuiltError
        The pool is not built, or has no expert for one of ``tasks`` (the message lists those it has).
    EmptyInputError
        ``tasks`` is empty.
    ParameterError
        ``per_task`` is not an int ≥ 1.
    OutputError
        ``folder`` exists.
    """
    check_count("per_task", per_task)
    pool = pool if isinstance(pool, Pool) else find_pool(str(pool))
    tasks = [e["task"] for e in pool.experts] if tasks is None else list(tasks)
    if not tasks:
        raise EmptyInputError(f"no tasks to export from pool {pool.name}")
    experts = {task: pool.expert_path(task) for task in tasks}
    folder = Path(folder).expanduser()
    check_output_path(folder, False, [])
    with atomic_directory(folder) as work:
        shutil.copytree(pool.base_path, work / BASE_DIR)
        (work / DATA_DIR).mkdir()
        for task, path in experts.items():
            shutil.copytree(path, work / EXPERTS_DIR / task)
            lines = [json.dumps({"prompt": e.prompt, "answer": e.answer}, ensure_ascii=False) + "\n"
                     for e in get_task(task).examples("eval", per_task, seed=seed)]
            (work / DATA_DIR / f"{task}.jsonl").write_text("".join(lines), encoding="utf-8")
        study = {"name": name or f"{pool.name}-study", "base": BASE_DIR,
                 "experts": {task: f"{EXPERTS_DIR}/{task}" for task in tasks},
                 "tasks": {task: f"{DATA_DIR}/{task}.jsonl" for task in tasks}}
        (work / STUDY_FILE).write_text(yaml.safe_dump(study, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return folder / STUDY_FILE
