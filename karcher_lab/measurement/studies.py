"""A :class:`~karcher_lab.measurement.engine.MeasurementEngine` for a :class:`~karcher_lab.study.Study`:
its experts (loaded lazily, adapters folded on the base), each judged on its own task, the study's
evaluation examples and its probe texts."""
from __future__ import annotations

from dataclasses import replace

from karcher_lab.checks import check_count
from karcher_lab.diagnostics.scoring import TaskScoring, check_scoring
from karcher_lab.errors import NotSupportedError
from karcher_lab.measurement.engine import MeasurementEngine
from karcher_lab.measurement.settings import MeasurementSettings
from karcher_lab.study import Study
from karcher_lab.study.resolve import (
    check_vocabularies, expert_loader, load_model, model_dir, probe_texts, study_examples,
)


def check_own_tasks(study: Study) -> None:
    """Check that every expert of ``study`` owns a task (a task of its name) to be judged on.

    Raises
    ------
    NotSupportedError
        Naming the experts that own none.
    """
    without = [name for name in study.experts if study.own_task(name) is None]
    if without:
        raise NotSupportedError(f"expert(s) {without} own no task of the study (a task of the same name); "
                                "the explorer and the sweep judge every expert on its own task")


def engine_for_study(
    study: Study,
    *,
    settings: MeasurementSettings,
    examples_per_task: int | None = None,
    probes_per_task: int = 4,
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

    Returns
    -------
    MeasurementEngine
        Experts by their study names; the model merged states are loaded into is the base (or the first
        expert), loaded now with its tokenizer.

    Every expert must own a task (a task of its name) and share the base's vocabulary, and a task with
    ``chat_template`` needs a tokenizer that has one; all are checked, and the tasks and probes read,
    before any model is loaded. Each task is scored with its :class:`~karcher_lab.study.spec.TaskSpec`'s
    ``chat_template``, ``case_sensitive`` and ``max_new_tokens``
    (:class:`~karcher_lab.diagnostics.scoring.TaskScoring`).
    """
    if examples_per_task is not None:
        check_count("examples_per_task", examples_per_task)
    check_count("probes_per_task", probes_per_task)
    check_own_tasks(study)
    examples = study_examples(study, examples_per_task, settings.seed)
    probes = probe_texts(study, examples, probes_per_task)
    check_vocabularies(study)
    from transformers import AutoTokenizer

    experts = {name: expert_loader(study, name) for name in study.experts}
    first = study.base if study.base is not None else next(iter(study.experts.values()))
    directory = model_dir(study, first)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    scoring = check_scoring(tokenizer, {name: TaskScoring(spec.chat_template, spec.case_sensitive, spec.max_new_tokens)
                                        for name, spec in study.task_specs.items()}, examples)
    if study.layers_path is not None and settings.layers_path is None:
        settings = replace(settings, layers_path=study.layers_path)
    return MeasurementEngine(experts, tokenizer, examples, probes, model=load_model(directory), scoring=scoring,
                             expert_tasks={name: study.own_task(name) for name in experts}, settings=settings)
