"""What a sweep runs on: a zoo pool or a :class:`~karcher_lab.study.Study`, behind one interface.

- :class:`StudySubject`: a study of the user's own experts (model folders, cached hub ids, PEFT adapters
  folded onto the base, models in memory), each judged on its own task where it owns one, with the
  study's task files and probe texts (:func:`~karcher_lab.measurement.studies.engine_for_study`).
  Studies carry no levels.
- :class:`PoolSubject`: a built zoo pool, run as its built-in study
  (:func:`~karcher_lab.study.pool_study`): experts named by their task, measured on held-out examples
  from the zoo's task generators, plus the zoo's heterogeneity ``level``, accuracy and base accuracy
  (pool.json).

Both give the sweep the same things: the experts in their given order, the measurement engine, the base
the merges use, the entries of the run's ``config.json`` that identify them, and the experts opened as
:mod:`karcher_lab.io` sources for the weight-space geometry (:mod:`karcher_lab.experiment.distances`,
computed once per subject). :func:`sweep_subject` makes one from a Pool, a pool name or directory, a
Study or the path of a study YAML (``.yml`` / ``.yaml``).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from karcher_lab.experiment.distances import reference_distances
from karcher_lab.io import Source
from karcher_lab.measurement import MeasurementEngine, MeasurementSettings, engine_for_study
from karcher_lab.measurement.cache import MeasurementCache
from karcher_lab.study import TASK_OPTIONS, Study, as_study, pool_study
from karcher_lab.study.from_pool import probe_tasks
from karcher_lab.study.resolve import check_adapters_have_base, merge_sources, model_folder
from karcher_lab.zoo import Pool, find_pool

DEFAULT_POOL_EXAMPLES = 32
"""Held-out examples per task of a pool when the sweep is not told how many (a study's tasks are used whole)."""
IN_MEMORY = "in memory"
"""How a model or data given in memory is named in the run's config (it has no path to check on resume)."""


class SweepSubject(ABC):
    """The experts a sweep merges and what they are measured on (see the module docstring).

    Attributes
    ----------
    kind : str
        ``"pool"`` or ``"study"``.
    name : str
        The pool's or study's name: the ``pool`` column of the results.
    experts : tuple of str
        The experts' names in their given order (the ``pool`` order); each is judged on the task of its name.
    """

    kind: str
    name: str
    experts: tuple[str, ...]

    @property
    def label(self) -> str:
        """``"pool NAME"`` or ``"study NAME"``, for messages."""
        return f"{self.kind} {self.name}"

    @property
    def levels(self) -> dict[str, float] | None:
        """Each expert's heterogeneity level, or None unless every expert has one."""
        return None

    def metadata(self) -> pd.DataFrame | None:
        """What the zoo recorded per expert (level, accuracy, base accuracy), indexed by expert; None
        when there is no such record."""
        return None

    def examples_per_task(self, per_task: int | None) -> int | None:
        """The evaluation examples per task the sweep uses when asked for ``per_task`` (None: the default)."""
        return per_task

    @abstractmethod
    def identity(self, per_task: int | None, probes_per_task: int) -> dict[str, Any]:
        """The entries of the run's config that identify the subject and its evaluation data."""

    @abstractmethod
    def engine(self, *, settings: MeasurementSettings, per_task: int | None, probes_per_task: int,
               names: tuple[str, ...]) -> MeasurementEngine:
        """The measurement engine of at least the experts ``names`` (a study's engine holds all of its
        experts; only those measured are loaded, one at a time, their numbers kept in the disk cache of
        :mod:`karcher_lab.measurement.cache`), with ``per_task`` evaluation examples per task
        (:meth:`examples_per_task`); loads the model merged states go into and the tokenizer."""

    @abstractmethod
    def merge_base(self) -> Any:
        """The base the merges get (a checkpoint folder or a model in memory), or None."""

    @abstractmethod
    def sources(self, names: Sequence[str] | None = None) -> tuple[dict[str, Source], Source | None]:
        """The experts ``names`` (default: every one) by name and the base (None without one), opened as
        :mod:`karcher_lab.io` sources (only the named experts' files are opened)."""

    @cached_property
    def distances(self) -> pd.DataFrame:
        """Each expert's ``norm`` and ``angle`` distance from the base, or from the experts' mean without
        one (:func:`~karcher_lab.experiment.distances.reference_distances`; computed on first use)."""
        experts, base = self.sources()
        return reference_distances(experts, base)

    @property
    def has_base(self) -> bool:
        """Whether the experts have a base (else distances are taken from their mean)."""
        return self.merge_base() is not None


class StudySubject(SweepSubject):
    """A :class:`~karcher_lab.study.Study` (see the module docstring). Every model folder, cached hub id
    and adapter must resolve: checked when the subject is made, before any model is loaded."""

    kind = "study"

    def __init__(self, study: Study):
        self.study = study
        self.name = study.name
        self.experts = tuple(study.experts)
        self._folders = {name: model_folder(study, source) for name, source in study.experts.items()}
        self._base_folder = model_folder(study, study.base) if study.base is not None else None
        check_adapters_have_base(study)

    def identity(self, per_task: int | None, probes_per_task: int) -> dict[str, Any]:
        study = self.study
        tasks = [{"name": spec.name, "source": _data_reference(study, spec.source),
                  **{key: getattr(spec, key) for key in TASK_OPTIONS if key != "source"}}
                 for spec in study.task_specs.values()]
        probes = study.probes
        if probes is not None:
            probes = _data_reference(study, probes) if isinstance(probes, (str, os.PathLike)) else [str(p) for p in probes]
        return dict(study=self.name, experts=[[name, _model_reference(folder)] for name, folder in self._folders.items()],
                    base=None if study.base is None else _model_reference(self._base_folder), tasks=tasks, probes=probes,
                    layers_path=study.layers_path, per_task=per_task,
                    probes_per_task=probes_per_task if study.probes is None else None)

    def engine(self, *, settings: MeasurementSettings, per_task: int | None, probes_per_task: int,
               names: tuple[str, ...]) -> MeasurementEngine:
        return engine_for_study(self.study, settings=settings, examples_per_task=per_task,
                                probes_per_task=probes_per_task, cache=MeasurementCache())

    def merge_base(self) -> Any:
        if self.study.base is None:
            return None
        return self.study.base if self._base_folder is None else str(self._base_folder)

    def sources(self, names: Sequence[str] | None = None) -> tuple[dict[str, Source], Source | None]:
        return merge_sources(self.study, names)


class PoolSubject(StudySubject):
    """A built zoo pool: its built-in study (:func:`~karcher_lab.study.pool_study`) with the zoo's
    levels and records (see the module docstring)."""

    kind = "pool"

    def __init__(self, pool: Pool):
        super().__init__(pool_study(pool))
        self.pool = pool

    @property
    def levels(self) -> dict[str, float] | None:
        if any("level" not in e for e in self.pool.experts):
            return None
        return {e["task"]: e["level"] for e in self.pool.experts}

    def metadata(self) -> pd.DataFrame:
        return pd.DataFrame([{"task": e["task"], "level": e.get("level"), "accuracy": e.get("accuracy"),
                              "base accuracy": e.get("base_accuracy")} for e in self.pool.experts]).set_index("task")

    def examples_per_task(self, per_task: int | None) -> int:
        return DEFAULT_POOL_EXAMPLES if per_task is None else per_task

    def identity(self, per_task: int | None, probes_per_task: int) -> dict[str, Any]:
        return dict(pool=self.name, pool_key=self.pool.record.get("key", str(self.pool.path)),
                    per_task=self.examples_per_task(per_task), probes_per_task=probes_per_task,
                    probe_tasks=list(probe_tasks(self.pool)))

    def engine(self, *, settings: MeasurementSettings, per_task: int | None, probes_per_task: int,
               names: tuple[str, ...]) -> MeasurementEngine:
        study = pool_study(self.pool, tasks=names, probes_per_task=probes_per_task, probe_seed=settings.seed)
        return engine_for_study(study, settings=settings, examples_per_task=self.examples_per_task(per_task),
                                cache=MeasurementCache())


def _model_reference(folder: Path | None) -> str:
    """How a model is named in the run's config: its resolved folder, or "in memory"."""
    return IN_MEMORY if folder is None else str(folder)


def _data_reference(study: Study, source: Any) -> Any:
    """How a task or probe source is named in the run's config: its resolved path, a zoo task's name, or
    "in memory (TYPE)" for data given in memory."""
    if isinstance(source, (str, os.PathLike)):
        return str(study.path(source))
    return f"{IN_MEMORY} ({type(source).__name__})"


def sweep_subject(source: SweepSubject | Pool | Study | str | os.PathLike) -> SweepSubject:
    """The subject of a sweep.

    Parameters
    ----------
    source : SweepSubject, Pool, Study, str or path-like
        A subject (returned as it is), a Pool, a Study, the path of a study YAML
        (:func:`karcher_lab.study.as_study`), or a pool name (tiny, small, ...) or directory
        (:func:`karcher_lab.zoo.find_pool`).

    Returns
    -------
    SweepSubject

    Raises
    ------
    PoolNotBuiltError
        No such pool.
    DataError, ParameterError, EmptyInputError
        A study file that cannot be read or holds a bad study (:func:`karcher_lab.load_study`).
    CheckpointError, InputError
        A study model that does not resolve to a folder, or adapter experts without a base folder.
    """
    if isinstance(source, SweepSubject):
        return source
    if isinstance(source, Study):
        return StudySubject(source)
    if isinstance(source, Pool):
        return PoolSubject(source)
    study = as_study(source)
    return StudySubject(study) if study is not None else PoolSubject(find_pool(str(source)))
