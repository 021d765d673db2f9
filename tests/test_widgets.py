"""MergeExplorer on the micro pool: controls, in-place figures, the karcher fast path against
karcher_lab.methods, subsets, errors in the panel, debouncing."""
from __future__ import annotations

import threading

import ipywidgets as widgets
import numpy as np
import pytest
import torch

import karcher_lab
from karcher_lab.diagnostics import function_distance
from karcher_lab.widgets import MergeExplorer
from karcher_lab.zoo import load

FAST = dict(quality_examples=4, activation_examples=2, draws=4, exact_match=False, debounce=0.05)


@pytest.fixture(scope="module")
def pool(micro_pool):
    return micro_pool


@pytest.fixture()
def explorer(pool):
    return MergeExplorer(pool, selected=[e["task"] for e in pool.experts], **FAST)


def paths(pool, indices):
    return [pool.experts[i]["path"] for i in indices]


def assert_same_state(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def arrays(fig):
    return [np.asarray(trace.y, dtype=float).copy() for trace in fig.data]


def test_panel_builds_with_css_classes_and_data(explorer, pool):
    assert isinstance(explorer, widgets.VBox)
    assert explorer.error == "" and not explorer.busy
    assert len(explorer.sliders) == len(pool.experts)
    assert all("kl-weight-slider" in s._dom_classes for s in explorer.sliders)
    assert "kl-eta-slider" in explorer.param_controls["eta"]._dom_classes
    assert "kl-error" in explorer.error_area._dom_classes and "kl-busy" in explorer.busy_indicator._dom_classes
    assert all("kl-figure" in f._dom_classes for f in explorer.figures)
    # every figure shown holds data (the exact-match one is not shown with exact_match=False)
    for fig in (explorer.nll_fig, explorer.kl_fig, explorer.collapse_fig, explorer.convergence_fig, explorer.norm_fig):
        assert len(fig.data) > 0
    assert [lab.value for lab in explorer.alpha_labels] == ["α = 0.250"] * 4
    # the quality figure shows the merged model and the experts on each checked task
    assert {t.name for t in explorer.nll_fig.data} == {"merged", "expert"}
    assert set(explorer.nll_fig.data[0].x) == {e["task"] for e in pool.experts}


def test_moving_a_weight_updates_normalized_values_and_figures_in_place(explorer, pool):
    figures = list(explorer.figures)
    before = {id(f): arrays(f) for f in figures}
    model = explorer.model
    explorer.sliders[0].value = 0.2  # schedules a debounced update; update() runs it now
    assert explorer.alpha_labels[0].value == f"α = {0.2 / 3.2:.3f}"
    assert explorer.alpha_labels[1].value == f"α = {1 / 3.2:.3f}"
    assert explorer.update()
    assert explorer.figures == figures and explorer.model is model  # same widgets, same preallocated model
    for fig in (explorer.nll_fig, explorer.kl_fig, explorer.collapse_fig):
        after = arrays(fig)
        assert len(after) == len(before[id(fig)])
        merged_changed = any(not np.allclose(a, b, equal_nan=True) for a, b in zip(after, before[id(fig)]))
        assert merged_changed, fig.layout.title.text
    # karcher keeps the weighted mean norm of the experts in every tensor (§3.4): no shrinkage
    np.testing.assert_allclose(explorer.norm_fig.data[0].y, 1.0, rtol=1e-5)
    assert len(explorer.norm_fig.data[0].y) == len(explorer.state)
    # KL from the cached expert log-probabilities equals running both models now
    for index, task in enumerate(explorer.tasks):
        direct = function_distance(load(paths(pool, [index])[0])[0], explorer.model, explorer.tokenizer,
                                   {task: explorer.engine.data.examples[task]}, reference_name=task)
        shown = explorer.tables["distance"].query("task == @task").reset_index(drop=True)
        np.testing.assert_allclose(shown["mean"], direct["mean"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(shown["std"], direct["std"], rtol=1e-6, atol=1e-9)


def test_karcher_fast_path_equals_karcher_lab_merge(explorer, pool):
    raw = [0.2, 1.0, 0.5, 0.7]
    for slider, w in zip(explorer.sliders, raw):
        slider.value = w
    explorer.param_controls["eta"].value = 0.5
    explorer.param_controls["block"].value = "row"
    assert explorer.update(), explorer.error
    alpha = [w / sum(raw) for w in raw]
    expected = karcher_lab.merge(paths(pool, range(4)), "karcher", weights=alpha, params={"eta": 0.5, "block": "row"})
    assert_same_state(explorer.state, expected)
    loaded = explorer.model.state_dict()
    assert_same_state({k: loaded[k] for k in expected}, expected)
    # the convergence figure is the solver's trace: its maximum over tensors at every step
    residuals = [t.residuals for t in explorer.tables["traces"].values()]
    assert len(residuals) == len(expected)
    top = [max(float(r[k]) for r in residuals if len(r) > k) for k in range(max(len(r) for r in residuals))]
    np.testing.assert_allclose(explorer.convergence_fig.data[0].y, top)
    # a second karcher update re-solves from the cached Grams: no new Gram is computed
    session = next(iter(explorer.merger._sessions.values()))
    misses = session.states.misses
    explorer.param_controls["eta"].value = 0.8
    assert explorer.update()
    assert session.states.misses == misses and session.states.hits > 0
    expected = karcher_lab.merge(paths(pool, range(4)), "karcher", weights=alpha, params={"eta": 0.8, "block": "row"})
    assert_same_state(explorer.state, expected)


@pytest.mark.parametrize("method", ["karcher", "linear"])
def test_a_subset_by_checkbox_equals_merging_just_those_experts(explorer, pool, method):
    explorer.method_dropdown.value = method
    explorer.sliders[0].value = 0.3
    explorer.checkboxes[1].value = False
    explorer.checkboxes[3].value = False
    assert explorer.sliders[1].layout.display == "none" and explorer.alpha_labels[0].value == f"α = {0.3 / 1.3:.3f}"
    assert explorer.update(), explorer.error
    expected = karcher_lab.merge(paths(pool, [0, 2]), method, weights=[0.3 / 1.3, 1 / 1.3])
    assert_same_state(explorer.state, expected)
    assert set(explorer.nll_fig.data[0].x) == {pool.experts[0]["task"], pool.experts[2]["task"]}
    assert (len(explorer.convergence_fig.data) > 0) == (method == "karcher")


def test_errors_are_shown_in_the_panel_not_raised(explorer):
    state = explorer.state
    explorer.param_controls["tol"].value = -1.0
    assert explorer.update() is False
    assert explorer.error.startswith("ParameterError") and "tol" in explorer.error
    assert explorer.state is state and not explorer.busy
    explorer.param_controls["tol"].value = 1e-7
    assert explorer.update() and explorer.error == ""

    explorer.use_base_box.value = False
    explorer.method_dropdown.value = "ties"
    assert explorer.update() is False
    assert explorer.error.startswith("MissingBaseError") and "base_model" in explorer.error
    explorer.use_base_box.value = True
    assert explorer.update(), explorer.error

    explorer.method_dropdown.value = "slerp"  # exactly two models
    assert explorer.update() is False and explorer.error.startswith("ModelCountError")

    for checkbox in explorer.checkboxes:
        checkbox.value = False
    assert explorer.update() is False and explorer.error.startswith("EmptyInputError")


def test_any_exception_is_shown_in_the_panel(explorer, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(explorer.merger, "merge", broken)
    assert explorer.update() is False
    assert explorer.error == "RuntimeError: disk on fire" and not explorer.busy


def test_busy_indicator_shows_while_work_runs_on_one_thread(explorer, monkeypatch):
    seen = []
    original = explorer.merger.merge
    monkeypatch.setattr(explorer.merger, "merge",
                        lambda *a, **k: (seen.append((explorer.busy, torch.get_num_threads())), original(*a, **k))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert explorer.single_threaded  # the micro pool's model is far below SINGLE_THREAD_PARAMETERS
        assert explorer.update()
        assert seen == [(True, 1)] and not explorer.busy and torch.get_num_threads() == 2
        explorer.single_threaded = False
        assert explorer.update() and seen[-1] == (True, 2)
    finally:
        torch.set_num_threads(threads)


def test_changes_are_debounced_into_one_update(explorer, monkeypatch):
    runs = []
    original = explorer._apply
    monkeypatch.setattr(explorer, "_apply", lambda: (runs.append(threading.current_thread().name), original()))
    for value in (0.9, 0.8, 0.7, 0.6):
        explorer.sliders[2].value = value
    explorer.wait(timeout=60)
    assert len(runs) == 1 and runs[0] != threading.main_thread().name
    assert explorer.error == ""
    assert explorer.alpha_labels[2].value == f"α = {0.6 / 3.6:.3f}"


def test_method_parameters_become_controls(explorer):
    assert {"eta", "max_iter", "tol", "block", "init", "task_vectors", "norm_average"} <= set(explorer.param_controls)
    explorer.method_dropdown.value = "ties"
    assert set(explorer.param_controls) == {p.name for p in karcher_lab.get_method("ties").params}
    assert explorer.param_box.children == tuple(explorer.param_controls.values())
    explorer.method_dropdown.value = "fisher"
    assert "fisher" not in explorer.param_controls and "cannot be set" in explorer.method_info.value


def test_bad_constructor_arguments_fail_before_loading(pool):
    with pytest.raises(karcher_lab.errors.ParameterError, match="draws"):
        MergeExplorer(pool, draws=1)
    with pytest.raises(karcher_lab.errors.ParameterError, match="exact_match_mode"):
        MergeExplorer(pool, exact_match_mode="beam")
    with pytest.raises(karcher_lab.errors.ParameterError, match="not in pool"):
        MergeExplorer(pool, selected=["no-such-task"], initial_update=False)
    with pytest.raises(karcher_lab.errors.ParameterError, match="sites"):
        MergeExplorer(pool, sites=["embeddings"])
    with pytest.raises(karcher_lab.errors.UnknownMethodError):
        MergeExplorer(pool, method="nope")
