"""A :class:`~karcher_lab.measurement.engine.MeasurementEngine` for a :class:`~karcher_lab.study.Study`:
its experts (loaded lazily, adapters folded on the base), each judged on its own task, the study's
evaluation examples and its probe texts. A zoo pool is a built-in study
(:func:`~karcher_lab.study.from_pool.pool_study`)."""
from __future__ import annotations

from dataclasses import replace

from karcher_lab.checks import check_count
from karcher_lab.diagnostics.scoring import check_scoring
from karcher_lab.measurement.cache import MeasurementCache
from karcher_lab.measurement.engine import MeasurementEngine
from karcher_lab.measurement.settings import MeasurementSettings
from karcher_lab.study import Study
from karcher_lab.study.resolve import (
    check_adapters_have_base, check_vocabularies, expert_loader, load_model, merge_sources, model_dir, probe_texts,
    study_examples, task_scoring,
)


def engine_for_study(
    study: Study,
    *,
    settings: MeasurementSettings,
    examples_per_task: int | None = None,
    probes_per_task: int = 4,
    cache: MeasurementCache | None = None,
) -> MeasurementEngine:
    """The measurement engine of ``study``.

    Parameters
    ----------
    study : Study
    settings : MeasurementSettings
    examples_per_task : int, optional
        At most this many examples per task (default: every example, or the task's ``limit``).
    probes_per_task : int
        Prompts per task in the probe batch when the study gives no probe texts (≥ 1).
    cache : MeasurementCache, optional
        A disk cache of the experts' measurements (:mod:`karcher_lab.measurement.cache`), keyed by each
        expert's content fingerprint.

    Returns
    -------
    MeasurementEngine
        Experts by their study names, loaded one at a time when first measured, in the settings' dtype,
        their tensors read from their checkpoints (:func:`~karcher_lab.study.resolve.merge_sources`); the
        model merged states are loaded into is the base (or the first expert), loaded now with its
        tokenizer.

    Every expert must share the base's vocabulary, and a task with ``chat_template`` needs a tokenizer
    that has one; both are checked, and the tasks and probes read, before any model is loaded. An
    expert is judged on its own task (the task of its name); one that owns none is merged and measured
    in the layer metrics only, and tasks no expert owns are held-out tasks every merge is measured on.
    Each task is scored as :func:`~karcher_lab.study.resolve.task_scoring` says.
    """
    if examples_per_task is not None:
        check_count("examples_per_task", examples_per_task)
    check_count("probes_per_task", probes_per_task)
    examples = study_examples(study, examples_per_task, settings.seed)
    probes = probe_texts(study, examples, probes_per_task)
    check_vocabularies(study)
    from transformers import AutoTokenizer

    experts = {name: expert_loader(study, name, settings.dtype) for name in study.experts}
    check_adapters_have_base(study)
    sources = {name: (lambda name=name: merge_sources(study, [name])[0][name]) for name in study.experts}
    first = study.base if study.base is not None else next(iter(study.experts.values()))
    directory = model_dir(study, first)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    scoring = check_scoring(tokenizer, {name: options for name, spec in study.task_specs.items()
                                        if (options := task_scoring(study, spec)) is not None}, examples)
    if study.layers_path is not None and settings.layers_path is None:
        settings = replace(settings, layers_path=study.layers_path)
    return MeasurementEngine(experts, tokenizer, examples, probes, model=load_model(directory, settings.dtype),
                             scoring=scoring, expert_tasks={name: study.own_task(name) for name in experts},
                             settings=settings, sources=sources, cache=cache)
