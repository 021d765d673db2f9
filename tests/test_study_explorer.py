"""MergeExplorer over a Study of plain model folders and JSONL task files: the same numbers as over the
zoo pool the folders come from, for the same examples."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import write_micro_study
from karcher_lab import Study
from karcher_lab.errors import DeviceError, ParameterError
from karcher_lab.widgets import MergeExplorer

FAST = dict(quality_examples=4, activation_examples=2, draws=4, exact_match=True, debounce=0.05)


@pytest.fixture(scope="module")
def study_files(micro_pool, tmp_path_factory):
    """The micro pool's experts as plain folders, and their tasks' first 4 held-out examples as JSONL."""
    root = tmp_path_factory.mktemp("study_explorer")
    write_micro_study(micro_pool, root, 4)
    return root


def _scores(explorer: MergeExplorer) -> pd.DataFrame:
    table = explorer.tables["quality"]
    return table[table["metric"].isin(["accuracy", "nll"])].sort_values(["model", "task", "metric"]).reset_index(drop=True)


def test_a_study_of_folders_and_jsonl_gives_the_pool_explorers_numbers(micro_pool, study_files):
    tasks = [e["task"] for e in micro_pool.experts]
    from_pool = MergeExplorer(micro_pool, selected=tasks[:3], **FAST)
    from_study = MergeExplorer(study_files / "study.yml", selected=tasks[:3], **FAST)
    assert from_study.error == "" and from_study.label == "study micro-folders"
    assert from_study.tasks == tasks
    pd.testing.assert_frame_equal(_scores(from_study), _scores(from_pool), rtol=1e-6, atol=1e-6)
    distance = lambda e: e.tables["distance"].sort_values(["reference", "task", "metric"]).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(distance(from_study), distance(from_pool), rtol=1e-6, atol=1e-6)
    for name, tensor in from_pool.state.items():
        assert (from_study.state[name] - tensor).abs().max() <= 1e-6, name


def test_the_explorer_refuses_an_unknown_expert_of_a_study_before_loading(study_files):
    with pytest.raises(Exception, match=r"selected expert\(s\) \['nope'\] are not in study micro-folders"):
        MergeExplorer(study_files / "study.yml", selected=["nope"], initial_update=False)


def test_a_study_python_object_works_too(micro_pool, study_files):
    tasks = [e["task"] for e in micro_pool.experts][:2]
    study = Study(experts={t: str(micro_pool.expert_path(t)) for t in tasks},
                  tasks={t: str(study_files / f"{t}.jsonl") for t in tasks}, probes=["a probe text", "another one"])
    explorer = MergeExplorer(study, method="linear", **FAST)
    assert explorer.error == "" and not explorer.has_base
    assert set(explorer.tables["quality"]["task"]) == set(tasks)


def test_an_expert_without_a_task_and_a_held_out_task(micro_pool, study_files):
    """The second expert owns no task and its task file is a held-out "general" task: the merged model's
    raw scores there equal the full study's on that task; experts' rows only for the owned task."""
    first, second = [e["task"] for e in micro_pool.experts][:2]
    full = MergeExplorer(study_files / "study.yml", selected=[first, second], method="linear", **FAST)
    study = Study(experts={first: str(micro_pool.expert_path(first)), "x": str(micro_pool.expert_path(second))},
                  base=str(micro_pool.base_path),
                  tasks={first: str(study_files / f"{first}.jsonl"), "general": str(study_files / f"{second}.jsonl")})
    explorer = MergeExplorer(study, method="linear", **FAST)
    assert explorer.error == ""
    quality = explorer.tables["quality"]
    assert set(quality.loc[quality["model"] == "expert", "task"]) == {first}
    general = quality[quality["task"] == "general"].set_index("metric")["mean"]
    reference = full.tables["quality"]
    reference = reference[(reference["task"] == second) & (reference["model"] == "merged")].set_index("metric")["mean"]
    for metric in ("accuracy", "nll"):
        assert general[metric] == pytest.approx(reference[metric], rel=1e-6)
    assert set(explorer.tables["distance"]["reference"]) == {first}
    assert set(explorer.tables["collapse"]["model"]) == {"merged", first, "x"}


def test_save_this_merge_writes_a_checkpoint_whose_recipe_reproduces_its_bytes(micro_pool, study_files, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from karcher_lab.cli import main

    tasks = [e["task"] for e in micro_pool.experts]
    explorer = MergeExplorer(study_files / "study.yml", selected=tasks[:3], **FAST)
    explorer.sliders[0].value = 0.4
    explorer.update()
    explorer.save_path.value = str(tmp_path / "saved")
    explorer.save_button.click()
    assert explorer.keep_output.value == f"saved to {tmp_path / 'saved'}"
    saved = tmp_path / "saved"
    assert (saved / "merge_recipe.yml").read_text() == explorer.recipe_yaml()
    state = load_file(str(saved / "model.safetensors"))
    for name, tensor in explorer.state.items():
        assert (state[name] - tensor).abs().max() <= 1e-5, name  # the members alone: the same Karcher mean
    AutoModelForCausalLM.from_pretrained(saved)
    assert main(["merge", str(saved / "merge_recipe.yml"), str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()
    explorer.recipe_button.click()
    assert explorer.keep_output.value.startswith("<pre>") and "merge_method: karcher" in explorer.keep_output.value
    explorer.save_button.click()  # the folder exists now: refused, shown in the panel
    assert "OutputError" in explorer.keep_output.value


def test_a_study_of_one_expert_is_refused_where_the_method_needs_two(micro_pool, study_files):
    task = micro_pool.experts[0]["task"]
    study = Study(experts={task: str(micro_pool.expert_path(task))}, tasks={task: str(study_files / f"{task}.jsonl")})
    explorer = MergeExplorer(study, method="model_stock", initial_update=False, **FAST)
    assert not explorer.update()
    assert "model_stock merges at least 2 checked experts, got 1" in explorer.error


def test_a_studys_layers_path_reaches_the_capture(micro_pool, study_files):
    from karcher_lab.errors import ParameterError
    from karcher_lab.measurement import MeasurementSettings
    from karcher_lab.measurement.studies import engine_for_study

    tasks = [e["task"] for e in micro_pool.experts][:2]
    study = lambda path: Study(experts={t: str(micro_pool.expert_path(t)) for t in tasks}, layers_path=path,  # noqa: E731
                               tasks={t: str(study_files / f"{t}.jsonl") for t in tasks})
    settings = MeasurementSettings(draws=2)
    named = engine_for_study(study("model.layers"), settings=settings, probes_per_task=1)
    found = engine_for_study(study(None), settings=settings, probes_per_task=1)
    assert named.settings.layers_path == "model.layers"
    pd.testing.assert_frame_equal(named.experts.collapse(tasks[0]), found.experts.collapse(tasks[0]))
    wrong = engine_for_study(study("model.blocks"), settings=settings, probes_per_task=1)
    with pytest.raises(ParameterError, match="blocks"):
        wrong.layer_metrics(tasks)


def test_the_explorer_on_cuda_without_cuda_is_a_clear_error(study_files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        MergeExplorer(study_files / "study.yml", device="cuda", initial_update=False)


def test_a_studys_device_is_the_sessions_default_and_an_argument_overrides_it(study_files, tmp_path, monkeypatch):
    from karcher_lab import load_study
    from karcher_lab.experiment.sweep import run_sweep

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = (study_files / "study.yml").read_text()
    (study_files / "on_gpu.yml").write_text(text + "device: cuda\n")
    study = load_study(study_files / "on_gpu.yml")
    assert study.device == "cuda"
    with pytest.raises(DeviceError, match="CUDA is not available"):
        MergeExplorer(study, initial_update=False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        run_sweep(study, methods=["linear"], m_values=[2], orders=["pool"], out=tmp_path / "run", log=None)
    assert not (tmp_path / "run").exists()
    explorer = MergeExplorer(study, device="cpu", initial_update=False)
    assert explorer.engine.settings.device.type == "cpu"
    with pytest.raises(ParameterError, match="device must be a device name"):
        Study(experts=study.experts, tasks=study.tasks, device="gpu0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_explorer_on_cuda_equals_the_cpu(micro_pool, study_files):
    tasks = [e["task"] for e in micro_pool.experts]
    cpu = MergeExplorer(study_files / "study.yml", selected=tasks[:3], **FAST)
    gpu = MergeExplorer(study_files / "study.yml", selected=tasks[:3], device="cuda", **FAST)
    assert gpu.error == "" and next(gpu.model.parameters()).device.type == "cuda"
    pd.testing.assert_frame_equal(_scores(gpu), _scores(cpu), rtol=1e-4, atol=1e-5)
    for name, tensor in cpu.state.items():
        assert (gpu.state[name].cpu() - tensor).abs().max() <= 1e-5, name
