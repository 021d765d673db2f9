"""The measurement engine on the micro pool: its numbers equal the diagnostics called directly on the same
models (known answers), the experts' side is computed once, the merged model runs one teacher-forced
pass per measurement, and bad input fails before any model is loaded or run."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import karcher_lab
from karcher_lab import diagnostics
from karcher_lab.diagnostics.examples import Example
from karcher_lab.errors import CheckpointError, EmptyInputError, InputError, ParameterError, WeightError
from karcher_lab.measurement import MeasurementEngine, MeasurementSettings, engine_for_study
from karcher_lab.measurement import engine as engine_module
from karcher_lab.measurement import experts as experts_module
from karcher_lab.study import pool_study
from karcher_lab.study.from_pool import probe_tasks
from karcher_lab.zoo import get_task, load

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(draws=4, seed=3, eval_batch_size=64, probe_batch_size=64)
COMPARED = ["metric", "mean", "std"]


@pytest.fixture(scope="module")
def models(micro_pool):
    """The micro pool's experts by task, the tokenizer, and a model holding a linear merge of the first two."""
    experts = {}
    for expert in micro_pool.experts:
        experts[expert["task"]], tokenizer = load(expert["path"])
    tasks = list(experts)[:2]
    state = karcher_lab.merge([str(micro_pool.expert_path(t)) for t in tasks], "linear", weights=[0.3, 0.7])
    merged = load(str(micro_pool.base_path))[0]
    merged.load_state_dict(state)
    return experts, tokenizer, tasks, state, merged


@pytest.fixture(scope="module")
def data(models):
    experts, _, _, _, _ = models
    examples = {task: get_task(task).examples("eval", 5, seed=1) for task in experts}
    probes = [e.prompt + e.answer for task in experts for e in get_task(task).examples("eval", 2, seed=2)]
    return examples, probes


def make_engine(models, data, micro_pool, **settings) -> MeasurementEngine:
    experts, tokenizer, _, _, _ = models
    examples, probes = data
    return MeasurementEngine(experts, tokenizer, examples, probes, model=lambda: load(str(micro_pool.base_path))[0],
                             settings=MeasurementSettings(**{**SETTINGS, **settings}))


def assert_same(actual: pd.DataFrame, expected: pd.DataFrame, rtol=1e-6, atol=1e-9):
    actual, expected = actual.reset_index(drop=True), expected.reset_index(drop=True)
    assert list(actual["metric"]) == list(expected["metric"])
    pd.testing.assert_frame_equal(actual[["mean", "std"]], expected[["mean", "std"]], rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["teacher_forced", "greedy"])
def test_numbers_equal_the_diagnostics_on_the_same_models(models, data, micro_pool, mode):
    experts, tokenizer, tasks, state, merged = models
    examples, probes = data
    engine = make_engine(models, data, micro_pool, exact_match_mode=mode)
    measured = engine.measure(state, tasks, [0.3, 0.7])
    own = {t: {t: examples[t]} for t in tasks}

    quality = diagnostics.task_quality(merged, tokenizer, {t: examples[t] for t in tasks}, exact_match=mode)
    assert_same(measured.function.quality, quality)
    for task in tasks:
        expert = diagnostics.task_quality(experts[task], tokenizer, own[task], exact_match=mode)
        assert_same(measured.function.expert_quality.query("task == @task"), expert)
        distance = diagnostics.function_distance(experts[task], merged, tokenizer, own[task], reference_name=task)
        assert_same(measured.function.distance.query("reference == @task"), distance)
    accuracy = quality.query("metric == 'accuracy'").set_index("task")["mean"]
    expert_accuracy = measured.function.expert_quality.query("metric == 'accuracy'").set_index("task")["mean"]
    normalized = measured.function.normalized_accuracy.set_index("task")["mean"]
    pd.testing.assert_series_equal(normalized, accuracy / expert_accuracy, check_names=False)

    ids, mask = diagnostics.encode_probes(tokenizer, probes)
    stats = diagnostics.capture_activations(merged, ids, mask, batch_size=64)
    expert_stats = [diagnostics.capture_activations(experts[t], ids, mask, batch_size=64) for t in tasks]
    assert_same(measured.layers.merged, diagnostics.collapse_metrics(stats, draws=4, seed=3), rtol=1e-5)
    assert_same(measured.layers.experts.query("model == @tasks[1]"),
                diagnostics.collapse_metrics(expert_stats[1], draws=4, seed=3), rtol=1e-5)
    assert_same(measured.layers.ratios, diagnostics.collapse_ratios(stats, expert_stats, [0.3, 0.7], draws=4, seed=3),
                rtol=1e-5)

    expert_states = [experts[t].state_dict() for t in tasks]
    table = diagnostics.weight_metrics(state, expert_states, weights=[0.3, 0.7], names=tasks)
    assert_same(measured.weights, table)
    norms = engine.weight_metrics(state, tasks, [3, 7], norm_only=True)  # weights are normalized to α
    assert_same(norms, diagnostics.weight_metrics(state, expert_states, weights=[0.3, 0.7], norm_only=True), rtol=1e-9)


def test_expert_side_runs_once_and_the_merged_model_once_per_measurement(models, data, micro_pool, monkeypatch):
    experts, _, tasks, state, _ = models
    calls = {"expert log-probs": [], "expert activations": [], "merged log-probs": 0, "other log-probs": 0, "loads": 0}

    def counted(store, function):
        def wrapper(model, *args, **kwargs):
            store.append(id(model))
            return function(model, *args, **kwargs)
        return wrapper

    def count(key, function):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(experts_module, "answer_log_probs", counted(calls["expert log-probs"], experts_module.answer_log_probs))
    monkeypatch.setattr(experts_module, "capture_activations",
                        counted(calls["expert activations"], experts_module.capture_activations))
    monkeypatch.setattr(engine_module, "answer_log_probs", count("merged log-probs", engine_module.answer_log_probs))
    monkeypatch.setattr(diagnostics.function, "answer_log_probs", count("other log-probs", diagnostics.function.answer_log_probs))
    examples, probes = data
    loaders = {task: count("loads", lambda model=model: model) for task, model in experts.items()}
    engine = MeasurementEngine(loaders, models[1], examples, probes, model=lambda: load(str(micro_pool.base_path))[0],
                               settings=MeasurementSettings(**SETTINGS))
    assert calls["loads"] == 0  # experts load lazily
    everyone = list(experts)
    for members in (tasks, everyone[1:], everyone):
        engine.measure(state, members)
    assert calls["loads"] == len(everyone)
    assert sorted(calls["expert log-probs"]) == sorted(id(m) for m in experts.values())
    assert sorted(calls["expert activations"]) == sorted(id(m) for m in experts.values())
    assert calls["merged log-probs"] == 3 and calls["other log-probs"] == 0  # one teacher-forced pass each
    assert engine.experts.quality(tasks[0]) is engine.experts.quality(tasks[0])


def test_stages_give_what_measure_gives(models, data, micro_pool):
    _, _, tasks, state, _ = models
    engine = make_engine(models, data, micro_pool, exact_match=False)
    measured = engine.measure(state, tasks, norm_only=True, ratios=False)
    assert measured.layers.ratios is None
    assert set(measured.function.quality["metric"]) == {"nll", "perplexity"}  # no exact match
    assert measured.function.normalized_accuracy.empty
    assert set(measured.weights["metric"]) == {"norm_ratio"}
    function = engine.function_metrics(tasks)
    pd.testing.assert_frame_equal(function.distance, measured.function.distance)
    layers = engine.layer_metrics(tasks)
    pd.testing.assert_frame_equal(layers.merged, measured.layers.merged)
    assert set(layers.experts["model"]) == set(tasks)


def test_a_pool_is_a_built_in_study_judging_each_expert_on_its_task(micro_pool):
    study = pool_study(micro_pool, probes_per_task=2, probe_seed=6)
    engine = engine_for_study(study, settings=MeasurementSettings(draws=2, seed=5), examples_per_task=3)
    tasks = [e["task"] for e in micro_pool.experts]
    assert engine.experts.names == tasks and engine.experts.tasks == {t: t for t in tasks}
    assert engine.data.examples[tasks[0]] == get_task(tasks[0]).examples("eval", 3, seed=5)
    probes = [e.prompt + e.answer for t in probe_tasks(micro_pool) for e in get_task(t).examples("eval", 2, seed=6)]
    assert study.probes == probes and engine.data.probe_ids.shape[0] == 2 * len(tasks)
    assert engine.data.scoring == {}  # built-in zoo tasks keep the zoo's plain rules
    subset = pool_study(micro_pool, tasks=tasks[1:2], probes_per_task=1)
    assert list(subset.experts) == tasks[1:2] and list(subset.tasks) == tasks[1:2]
    assert len(subset.probes) == len(tasks)  # the probe batch covers every pool task whatever is taken
    with pytest.raises(ParameterError, match="not in pool"):
        pool_study(micro_pool, tasks=["nope"])
    with pytest.raises(ParameterError, match="probes_per_task"):
        pool_study(micro_pool, probes_per_task=0)


def test_experts_without_a_task_and_held_out_tasks(models, data, micro_pool):
    """An expert that owns no task is merged and measured in the layer metrics only; a task no expert owns
    is measured on every merge, with raw scores only (no expert, KL or normalized accuracy there)."""
    experts, tokenizer, tasks, state, merged = models
    examples, probes = data
    held_out = next(t for t in examples if t not in tasks)
    engine = MeasurementEngine({t: experts[t] for t in tasks}, tokenizer,
                               {tasks[0]: examples[tasks[0]], "general": examples[held_out]}, probes,
                               model=lambda: load(str(micro_pool.base_path))[0],
                               expert_tasks={tasks[0]: tasks[0], tasks[1]: None},
                               settings=MeasurementSettings(**SETTINGS))
    assert engine.judged_tasks(tasks) == [tasks[0], "general"]
    assert engine.judged_tasks(tasks[1:]) == ["general"]
    engine.load_state(state)
    function = engine.function_metrics(tasks)
    direct = diagnostics.task_quality(merged, tokenizer, {"general": examples[held_out]}, model_name="merged",
                                      exact_match="teacher_forced")
    assert_same(function.quality[function.quality["task"] == "general"], direct)
    assert set(function.expert_quality["task"]) == {tasks[0]}
    assert list(function.distance["reference"].unique()) == [tasks[0]]
    assert list(function.normalized_accuracy["task"]) == [tasks[0]]
    only_unowned = engine.function_metrics(tasks[1:])
    assert set(only_unowned.quality["task"]) == {"general"} and only_unowned.expert_quality.empty
    assert only_unowned.distance.empty and only_unowned.normalized_accuracy.empty
    assert engine.experts.quality(tasks[1]).empty
    layers = engine.layer_metrics(tasks)
    assert set(layers.experts["model"]) == set(tasks)
    no_task = MeasurementEngine({tasks[1]: experts[tasks[1]]}, tokenizer, {tasks[0]: examples[tasks[0]]}, probes,
                                model=merged, expert_tasks={tasks[1]: None}, settings=MeasurementSettings(**SETTINGS))
    assert no_task.judged_tasks([tasks[1]]) == [tasks[0]]  # nobody owns it: held out


def test_bad_input_fails_before_any_model_loads(models, data, micro_pool):
    experts, tokenizer, tasks, state, _ = models
    examples, probes = data
    never = {task: (lambda: pytest.fail("an expert was loaded")) for task in experts}
    model = lambda: pytest.fail("the model was loaded")  # noqa: E731

    def engine(**kwargs):
        arguments = dict(experts=never, tokenizer=tokenizer, examples=examples, probes=probes, model=model)
        arguments.update(kwargs)
        return MeasurementEngine(arguments.pop("experts"), arguments.pop("tokenizer"), arguments.pop("examples"),
                                 arguments.pop("probes"), **arguments)

    with pytest.raises(ParameterError, match="draws"):
        MeasurementSettings(draws=1)
    with pytest.raises(ParameterError, match="exact_match_mode"):
        MeasurementSettings(exact_match_mode="beam")
    with pytest.raises(ParameterError, match="sites"):
        MeasurementSettings(sites=["embeddings"])
    with pytest.raises(EmptyInputError, match="no experts"):
        engine(experts={})
    with pytest.raises(InputError, match="expert 'a'"):
        engine(experts={"a": 3})
    with pytest.raises(ParameterError, match="without evaluation examples"):
        engine(examples={tasks[0]: examples[tasks[0]]})
    with pytest.raises(ParameterError, match="no task for"):
        engine(expert_tasks={tasks[0]: tasks[0]})
    with pytest.raises(EmptyInputError, match="has no evaluation examples"):
        engine(examples={**examples, tasks[0]: []})
    with pytest.raises(InputError, match="Example"):
        engine(examples={**examples, tasks[0]: [("2+2", "4")]})
    with pytest.raises(EmptyInputError, match="probe"):
        engine(probes=[])
    with pytest.raises(InputError, match="one string"):
        engine(probes="some text")
    built = engine()
    with pytest.raises(ParameterError, match="unknown expert"):
        built.measure(state, ["nope"])
    with pytest.raises(ParameterError, match="twice"):
        built.measure(state, [tasks[0], tasks[0]])
    with pytest.raises(WeightError, match="merge weights"):
        built.measure(state, tasks, [1.0])
    with pytest.raises(EmptyInputError):
        built.function_metrics([])


def test_a_state_that_does_not_fit_the_model_is_refused(models, data, micro_pool):
    _, _, _, state, _ = models
    engine = make_engine(models, data, micro_pool)
    name = next(k for k in state if k != "lm_head.weight")
    with pytest.raises(CheckpointError, match="missing"):
        engine.load_state({k: v for k, v in state.items() if k != name})
    with pytest.raises(CheckpointError, match="unexpected"):
        engine.load_state({**state, "extra.weight": torch.zeros(1)})
    assert engine.load_state(state) is engine.model


def test_examples_are_plain_data(models, micro_pool):
    """Any examples and probe texts work, not only the zoo's: here one hand-written task."""
    experts, tokenizer, tasks, state, _ = models
    examples = {"mine": [Example("12+3=", "15"), Example("2+2=", "4")]}
    engine = MeasurementEngine({tasks[0]: experts[tasks[0]]}, tokenizer, examples, ["hello world", "abc"],
                               model=load(str(micro_pool.base_path))[0], expert_tasks={tasks[0]: "mine"},
                               settings=MeasurementSettings(draws=2))
    engine.load_state(state)
    function = engine.function_metrics([tasks[0]])
    assert list(function.quality["task"].unique()) == ["mine"]
    assert list(function.distance["reference"]) == [tasks[0]] * 2


def test_experts_are_measured_in_the_resident_model_with_the_numbers_of_their_own(micro_pool, monkeypatch):
    """An expert whose checkpoint fits the engine's model is written into it (no second model) and gives
    the numbers of the expert loaded on its own; once a merge is written, experts load on their own."""
    settings = MeasurementSettings(draws=2, seed=5)
    study = pool_study(micro_pool)
    separate = engine_for_study(study, settings=settings, examples_per_task=3)
    separate.experts._host = lambda: None  # no model to measure experts in: each is loaded
    resident = engine_for_study(study, settings=settings, examples_per_task=3)
    loads = []
    original = experts_module.loaded
    monkeypatch.setattr(experts_module, "loaded", lambda *a: (loads.append(a[2]), original(*a))[1])
    names = list(study.experts)
    resident.measure_experts()
    assert loads == []
    separate.measure_experts()
    assert len(loads) == len(names)
    for name in names:
        assert_same(resident.experts.quality(name), separate.experts.quality(name))
        assert_same(resident.experts.collapse(name), separate.experts.collapse(name))
        assert resident.experts.norms(name) == pytest.approx(separate.experts.norms(name), rel=1e-12)
    # after a merge is written into the model, a new expert visit must not touch it
    tensors = resident.merge_writer().tensors
    before = {k: v.clone() for k, v in tensors.items()}
    resident.experts._visits.clear()
    loads.clear()
    resident.experts.quality(names[0])
    assert loads == [f"expert {names[0]!r}"]
    assert all(torch.equal(tensors[k], v) for k, v in before.items())
