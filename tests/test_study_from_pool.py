"""export_pool_study: a pool's experts as plain model folders and its tasks as JSONL files, under a study
YAML that load_study reads back to the same models and the same examples as the pool's built-in tasks."""
from __future__ import annotations

import pytest

from karcher_lab import Study, load_study
from karcher_lab.errors import EmptyInputError, OutputError, ParameterError
from karcher_lab.study import export_pool_study
from karcher_lab.study.resolve import check_vocabularies, model_dir, study_examples
from karcher_lab.zoo import PoolNotBuiltError, get_task


def test_the_study_loads_the_pools_models_and_reads_its_tasks_examples(micro_pool, tmp_path):
    tasks = [e["task"] for e in micro_pool.experts][:2]
    path = export_pool_study(micro_pool, tmp_path / "mine", tasks=tasks, per_task=5, seed=3, name="mine")
    assert path == tmp_path / "mine" / "study.yml"
    study = load_study(path)
    assert study.name == "mine" and list(study.experts) == tasks and list(study.task_specs) == tasks
    for task in tasks:
        folder = model_dir(study, study.experts[task])
        assert folder.parent.parent == (tmp_path / "mine").resolve()
        original = micro_pool.expert_path(task) / "model.safetensors"
        assert (folder / "model.safetensors").read_bytes() == original.read_bytes()
    assert (model_dir(study, study.base) / "model.safetensors").read_bytes() == \
        (micro_pool.base_path / "model.safetensors").read_bytes()
    check_vocabularies(study)

    examples = study_examples(study, seed=3)
    assert examples == {t: get_task(t).examples("eval", 5, seed=3) for t in tasks}
    built_in = Study(experts={t: str(micro_pool.expert_path(t)) for t in tasks}, tasks={t: t for t in tasks})
    assert examples == study_examples(built_in, per_task=5, seed=3)


def test_by_default_every_expert_and_the_folder_can_move(micro_pool, tmp_path):
    path = export_pool_study(str(micro_pool.path), tmp_path / "first", per_task=2)
    (tmp_path / "first").rename(tmp_path / "moved")
    study = load_study(tmp_path / "moved" / path.name)
    assert study.name == f"{micro_pool.name}-study"
    assert list(study.experts) == [e["task"] for e in micro_pool.experts]
    assert model_dir(study, study.base) == (tmp_path / "moved" / "base").resolve()
    assert all(len(examples) == 2 for examples in study_examples(study).values())


def test_bad_arguments_are_refused_before_anything_is_written(micro_pool, tmp_path):
    with pytest.raises(PoolNotBuiltError, match="has no expert for task 'nope'"):
        export_pool_study(micro_pool, tmp_path / "a", tasks=["double", "nope"])
    with pytest.raises(EmptyInputError, match="no tasks"):
        export_pool_study(micro_pool, tmp_path / "a", tasks=[])
    with pytest.raises(ParameterError, match="per_task"):
        export_pool_study(micro_pool, tmp_path / "a", per_task=0)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        export_pool_study(micro_pool, tmp_path / "taken", tasks=["double"])
    assert list((tmp_path / "taken").iterdir()) == []
