"""The sweep on a Study: the micro pool's experts as plain folders and their tasks as JSONL give the pool
sweep's numbers for the same examples; near and far from the weights' geometry (checked against a direct
float64 computation); a run directory refuses another study; `karcher-lab sweep --study`; errors before
any model loads."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_micro_study
from karcher_lab import Study, load_study
from karcher_lab.cli import main
from karcher_lab.errors import InputError, ModelCountError, ParameterError
from karcher_lab.experiment import load_results, make_grid, run_sweep
from karcher_lab.experiment.report import write_report

pytestmark = pytest.mark.usefixtures("one_thread")

PER_TASK = 6
WRITTEN = 8
"""Examples per task of the pool sweep, and written to each JSONL file (the study sweep caps them at
PER_TASK; the zoo's first PER_TASK of WRITTEN are its PER_TASK examples)."""
SMALL = dict(probes_per_task=2, draws=4, sites=["residual"], progress=False, log=None)
SCORES = ["accuracy", "normalized_accuracy", "nll", "kl", "avg_accuracy", "avg_normalized_accuracy", "avg_nll", "avg_kl"]


@pytest.fixture(scope="module")
def study_file(micro_pool, tmp_path_factory):
    """study.yml naming the micro pool's base and experts as plain folders and each task's held-out
    examples as JSONL."""
    return write_micro_study(micro_pool, tmp_path_factory.mktemp("sweep_study"), WRITTEN)


@pytest.fixture(scope="module")
def both_runs(micro_pool, study_file, tmp_path_factory):
    """The same grid on the pool and on the study: (study run directory, pool results, study results)."""
    root = tmp_path_factory.mktemp("runs")
    grid = dict(methods=["linear", "karcher"], m_values=[2], orders=["pool"], report=False, **SMALL)
    pool = run_sweep(micro_pool, out=root / "pool", per_task=PER_TASK, **grid)
    study = run_sweep(study_file, out=root / "study", per_task=PER_TASK, **grid)
    return root / "study", pool, study


def _scores(results: pd.DataFrame) -> pd.DataFrame:
    rows = results[results["metric"].isin(SCORES)]
    keys = ["method", "m", "experts", "scope", "task", "metric"]
    return rows.sort_values(keys).reset_index(drop=True)[[*keys, "mean"]]


def test_a_study_of_the_pools_folders_gives_the_pool_sweeps_scores(both_runs, micro_pool):
    _, pool, study = both_runs
    assert set(study["pool"]) == {"micro-folders"}
    pd.testing.assert_frame_equal(_scores(study), _scores(pool), rtol=1e-6, atol=1e-6)
    tasks = [e["task"] for e in micro_pool.experts]
    experts = study[(study["method"] == "expert") & (study["scope"] == "task")]
    assert list(experts["experts"]) == list(experts["task"])  # each expert scored on its own task
    assert set(experts["experts"]) == set(tasks[:2]) and set(experts["metric"]) == {"accuracy", "nll"}


def test_a_run_directory_refuses_another_study(both_runs, study_file, micro_pool):
    run_dir, _, _ = both_runs
    config = json.loads((run_dir / "config.json").read_text())
    assert config["study"] == "micro-folders" and config["per_task"] == PER_TASK and config["distance"] == "norm"
    assert config["experts"][0] == ["double", str(micro_pool.expert_path("double"))]
    assert config["tasks"][0]["source"] == str(study_file.parent / "double.jsonl")
    other = load_study(study_file)
    other.name = "another"
    with pytest.raises(InputError, match="study: recorded 'micro-folders', now 'another'"):
        run_sweep(other, methods=["linear"], m_values=[2], orders=["pool"], out=run_dir, per_task=PER_TASK, **SMALL)
    fewer = Study(experts={t: str(micro_pool.expert_path(t)) for t in ("double", "units")}, base=str(micro_pool.base_path),
                  tasks={t: str(study_file.parent / f"{t}.jsonl") for t in ("double", "units")}, name="micro-folders")
    with pytest.raises(InputError, match="experts: recorded"):
        run_sweep(fewer, methods=["linear"], m_values=[2], orders=["pool"], out=run_dir, per_task=PER_TASK, **SMALL)
    with pytest.raises(InputError, match="per_task: recorded 6, now None"):
        run_sweep(study_file, methods=["linear"], m_values=[2], orders=["pool"], out=run_dir, **SMALL)


def _flat(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].to(torch.float64).reshape(-1) for n in names])


def _direct(experts: dict[str, dict[str, torch.Tensor]], base: dict[str, torch.Tensor] | None) -> pd.DataFrame:
    """norm and angle of every expert from its whole flattened weights, in float64."""
    names = sorted(next(iter(experts.values())))
    thetas = {e: _flat(s, names) for e, s in experts.items()}
    reference = _flat(base, names) if base is not None else torch.stack(list(thetas.values())).mean(0)
    rows = {e: {"norm": float((t - reference).norm() / reference.norm()),
                "angle": math.degrees(math.acos(min(1.0, float(t @ reference / (t.norm() * reference.norm())))))}
            for e, t in thetas.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def test_near_and_far_of_a_study_come_from_the_weights(micro_pool, study_file):
    states = {e["task"]: load_file(micro_pool.expert_path(e["task"]) / "model.safetensors") for e in micro_pool.experts}
    base = load_file(micro_pool.base_path / "model.safetensors")
    study = load_study(study_file)
    grid = make_grid(study, methods=["linear"], m_values=[2], orders=["near", "far"])
    direct = _direct(states, base)
    assert grid.distance == "norm"
    pd.testing.assert_frame_equal(grid.subject.distances, direct.loc[list(grid.subject.experts)], rtol=1e-9,
                                  check_names=False)
    assert grid.orders["near"] == tuple(direct["norm"].sort_values().index)
    assert grid.orders["far"] == tuple(reversed(grid.orders["near"]))
    by_angle = make_grid(study, methods=["linear"], m_values=[2], orders=["near"], distance="angle")
    assert by_angle.orders["near"] == tuple(direct["angle"].sort_values().index)
    # the pool keeps its levels unless asked, and then orders by the same geometry
    assert make_grid(micro_pool, methods=["linear"], m_values=[2], orders=["near"]).distance == "level"
    assert make_grid(micro_pool, methods=["linear"], m_values=[2], orders=["near"], distance="norm").orders == \
        {"near": grid.orders["near"]}
    with pytest.raises(ParameterError, match="distance 'level' needs each expert's heterogeneity level"):
        make_grid(study, methods=["linear"], m_values=[2], orders=["near"], distance="level")
    with pytest.raises(ParameterError, match="unknown distance 'cosine'"):
        make_grid(study, methods=["linear"], m_values=[2], orders=["near"], distance="cosine")


def test_without_a_base_distances_are_from_the_experts_mean(micro_pool, study_file, both_runs, tmp_path):
    tasks = [e["task"] for e in micro_pool.experts]
    states = {t: load_file(micro_pool.expert_path(t) / "model.safetensors") for t in tasks}
    study = Study(experts={t: str(micro_pool.expert_path(t)) for t in tasks},
                  tasks={t: str(study_file.parent / f"{t}.jsonl") for t in tasks}, name="no-base")
    grid = make_grid(study, methods=["linear"], m_values=[2], orders=["near", "far"], distance="angle")
    direct = _direct(states, None)
    pd.testing.assert_frame_equal(grid.subject.distances, direct.loc[tasks], rtol=1e-9, check_names=False)
    assert grid.orders["near"] == tuple(direct["angle"].sort_values().index)
    _, _, results = both_runs
    page = write_report(results, grid.subject, tmp_path / "report.html", distance="angle").read_text()
    assert "Heterogeneity of the study" in page and "angle ∠(θ_i, θ̄) to the experts&#x27; mean" in page
    assert "angles between the experts&#x27; weights (no base)" in page and "heterogeneity knob" not in page


def test_an_adapter_experts_distance_is_its_folded_weights(micro_pool, tmp_path):
    """A PEFT adapter expert is read as base + s B A, one tensor at a time."""
    module, r, alpha = "model.layers.0.self_attn.q_proj", 2, 4
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(r, 128, generator=generator) * 0.1, torch.randn(128, r, generator=generator) * 0.1
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    study = Study(experts={"double": str(adapter), "units": str(micro_pool.expert_path("units"))},
                  base=str(micro_pool.base_path), tasks={"double": "double", "units": "units"})
    base = load_file(micro_pool.base_path / "model.safetensors")
    folded = dict(base, **{f"{module}.weight": base[f"{module}.weight"] + (alpha / r) * b @ a})
    units = load_file(micro_pool.expert_path("units") / "model.safetensors")
    grid = make_grid(study, methods=["linear"], m_values=[2], orders=["near"])
    expected = _direct({"double": folded, "units": units}, base)
    pd.testing.assert_frame_equal(grid.subject.distances, expected, rtol=1e-6, check_names=False)
    with pytest.raises(InputError, match=r"\['double'\] are PEFT adapters; folding them needs the study's base"):
        make_grid(Study(experts=study.experts, tasks=study.tasks), methods=["linear"], m_values=[2], orders=["pool"])


def test_the_cli_sweeps_a_study(study_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sweep", "--study", str(study_file), "--methods", "linear", "karcher", "--m", "2", "--order", "near",
                 "--per-task", "4", "--probes", "2", "--draws", "4", "--sites", "residual", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "sweep of study micro-folders" in printed and "near by relative task-vector norm" in printed
    assert "mean normalized accuracy" in printed and f"report: {out / 'report.html'}" in printed
    results = load_results(out)
    merges = results[results["method"] != "expert"]
    assert set(merges["order"]) == {"near"} and set(merges["method"]) == {"linear", "karcher"}
    assert set(results["pool"]) == {"micro-folders"}
    page = (out / "report.html").read_text()
    for text in ("Merging sweep on study micro-folders", "Heterogeneity of the study", "relative distance",
                 "No heterogeneity levels or base accuracies", "Pairwise task-vector angles"):
        assert text in page
    assert json.loads((out / "config.json").read_text())["distance"] == "norm"
    with pytest.raises(SystemExit):  # exactly one of --pool and --study
        main(["sweep", "--pool", "tiny", "--study", str(study_file), "--out", str(tmp_path / "both")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bad_studies_are_refused_before_any_model_loads(micro_pool, study_file, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_loading)
    jsonl = str(study_file.parent / "double.jsonl")
    alone = Study(experts={"double": str(micro_pool.expert_path("double"))}, tasks={"double": jsonl}, name="alone")
    with pytest.raises(ModelCountError, match=r"m must lie in 1\.\.1 .*study alone has 1"):
        run_sweep(alone, methods=["linear"], m_values=[2], out=tmp_path / "run", **SMALL)
    with pytest.raises(ParameterError, match="unknown expert"):
        run_sweep(study_file, methods=["linear"], m_values=[2], orders=["double,nope"], out=tmp_path / "run", **SMALL)
    assert not (tmp_path / "run").exists()


def test_an_expert_without_a_task_and_a_held_out_task(both_runs, micro_pool, study_file, tmp_path):
    """The second expert renamed so that it owns no task, and its task file kept as a held-out "general"
    task: the same merge, so the owned task's rows equal the full study's, and "general" gets the
    merged model's raw scores on the second task (no KL, no normalized accuracy, no expert rows)."""
    _, _, full = both_runs
    first, second = [e["task"] for e in micro_pool.experts][:2]
    folder = study_file.parent
    study = Study(experts={first: str(micro_pool.expert_path(first)), "x": str(micro_pool.expert_path(second))},
                  base=str(micro_pool.base_path), tasks={first: str(folder / f"{first}.jsonl"),
                                                         "general": str(folder / f"{second}.jsonl")}, name="orphan")
    results = run_sweep(study, methods=["linear"], m_values=[2], orders=["pool"], out=tmp_path / "run",
                        per_task=PER_TASK, report=False, **SMALL)
    merged = results[(results["method"] == "linear") & (results["scope"] == "task")]
    reference = full[(full["method"] == "linear") & (full["scope"] == "task")]

    def value(table, task, metric):
        return table.loc[(table["task"] == task) & (table["metric"] == metric), "mean"].item()

    for metric in ("accuracy", "normalized_accuracy", "nll", "kl", "fisher_rao"):
        assert value(merged, first, metric) == pytest.approx(value(reference, first, metric), rel=1e-6, abs=1e-9)
    for metric in ("accuracy", "nll"):
        assert value(merged, "general", metric) == pytest.approx(value(reference, second, metric), rel=1e-6, abs=1e-9)
    assert set(merged.loc[merged["task"] == "general", "metric"]) == {"accuracy", "nll"}
    experts = results[results["method"] == "expert"]
    assert set(experts.loc[experts["scope"] == "task", "experts"]) == {first}
    assert not experts[(experts["experts"] == "x") & (experts["scope"] == "layer")].empty


def test_the_collapse_viewer_opens_on_a_study(both_runs, study_file):
    """CollapseViewer(study) runs the study's sweep (here resumed: every cell is in the run directory)
    and draws its per-layer rows."""
    from karcher_lab.widgets import CollapseViewer

    run_dir, _, study = both_runs
    options = dict(methods=["linear", "karcher"], m_values=[2], orders=["pool"], out=run_dir, per_task=PER_TASK,
                   probes_per_task=2, draws=4, sites=["residual"])
    viewer = CollapseViewer(study_file, sweep=options, methods=["linear"], metric="variance_ratio")
    assert viewer.error == ""
    expected = study[(study["scope"] == "layer") & (study["method"] == "linear") & (study["metric"] == "variance_ratio")]
    curve = next(trace for trace in viewer.figure.data if trace.name == "linear")
    assert list(curve.y) == pytest.approx(list(expected.sort_values("layer")["mean"]), rel=1e-12)
    with pytest.raises(InputError, match="sweep options are for a study"):
        CollapseViewer(study, sweep=options)
