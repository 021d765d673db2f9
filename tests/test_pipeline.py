"""Model-level merging (karcher_lab.merge / merge_models / MergeSession): semantics, caching, memory."""
from __future__ import annotations

import inspect
import json
import pydoc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import karcher_lab
from karcher_lab import MergeSession, errors, merge_models, merge_tensors
from karcher_lab.io import StateDictSource
from karcher_lab.pipeline import tensor_seed
from karcher_lab.pipeline.plan import PROBE_SHAPE

ROOT = Path(__file__).resolve().parent.parent


def _model(seed, layers=3, hidden=8, vocab=12, head=True):
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g)
        state[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    if head:
        state["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return state


@pytest.fixture(scope="module")
def family():
    """A base and three experts near it (in memory)."""
    base = _model(0)
    g = torch.Generator().manual_seed(1)
    experts = [{k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(3)]
    return base, experts


def test_callable_module_and_merge_models_agree_with_merge_tensors(family):
    _, experts = family
    merged = karcher_lab.merge(experts, "linear", weights=[1.0, 2.0, 3.0])
    assert karcher_lab.merge is karcher_lab.merge_models
    assert str(inspect.signature(karcher_lab.merge)).startswith("(models: 'Sequence[Any]', method: 'str', *, weights")
    assert "Merge whole models" in pydoc.render_doc(karcher_lab.merge)
    assert set(merged) == set(experts[0])
    for name, t in merged.items():
        torch.testing.assert_close(t, (experts[0][name] + 2 * experts[1][name] + 3 * experts[2][name]) / 6, rtol=0, atol=1e-6)


def test_gradients_and_filters_are_resolved_per_tensor(family):
    base, experts = family
    params = {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}
    model_params = [{"density": [0.2, 0.8]}, {"density": 0.5, "weight": [1.0, 3.0]}, {}]
    merged = merge_models(experts, "ties", base=base, params=params, model_params=model_params)
    for name, t in merged.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        pos = 0.0 if layer is None else layer / 2  # three layers: t = 0, 0.5, 1
        expected = merge_tensors(
            "ties", [e[name] for e in experts], base=base[name],
            weights=[1.0, 1.0 + 2.0 * pos, 1.0],
            density=[0.2 + 0.6 * pos, 0.5, 1.0],
            **{"lambda": 0.5 if "mlp" in name else 1.0},
        )
        torch.testing.assert_close(t, expected, rtol=0, atol=0, msg=name)


def test_base_of_a_method_that_ignores_it_is_one_more_input_as_in_mergekit(family):
    base, experts = family
    session = MergeSession(experts[:2], base=base)
    merged = session.merge("linear")
    assert any("merged as one more input" in w for w in session.last_stats.warnings)
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (experts[0][name] + experts[1][name] + base[name]) / 3)
    listed = merge_models([experts[0], base], "linear", base=base)
    torch.testing.assert_close(listed[name], (experts[0][name] + base[name]) / 2)


def test_slerp_goes_from_the_base_to_the_other_model(family):
    base, experts = family
    merged = merge_models([experts[0]], "slerp", base=base, params={"t": 0.25})
    for name, t in merged.items():
        torch.testing.assert_close(t, merge_tensors("slerp", [base[name], experts[0][name]], t=0.25), rtol=0, atol=0)
    with pytest.raises(errors.MissingBaseError, match="slerp interpolates from base_model"):
        merge_models(experts[:2], "slerp", params={"t": 0.5})


def test_karcher_base_is_an_input_unless_task_vectors(family):
    base, experts = family
    name = "model.layers.0.self_attn.q_proj.weight"
    plain = merge_models(experts[:2], "karcher", base=base)
    torch.testing.assert_close(plain[name], merge_tensors("karcher", [experts[0][name], experts[1][name], base[name]]))
    tv = merge_models(experts[:2], "karcher", base=base, params={"task_vectors": True})
    torch.testing.assert_close(tv[name], merge_tensors("karcher", [experts[0][name], experts[1][name]], base=base[name], task_vectors=True))


def test_dtype_on_load_and_out_dtype(family):
    _, experts = family
    merged = merge_models(experts, "linear", dtype="bfloat16", out_dtype="float16")
    name = "model.norm.weight"
    assert merged[name].dtype == torch.float16
    expected = merge_tensors("linear", [e[name].to(torch.bfloat16) for e in experts], out_dtype=torch.float16)
    assert torch.equal(merged[name], expected)


def test_tied_and_untied_models_merge_into_an_untied_head():
    tied = _model(5, head=False)
    untied = _model(6)
    merged = merge_models([StateDictSource(tied, "t", config={"tie_word_embeddings": True}), untied], "linear")
    torch.testing.assert_close(merged["lm_head.weight"], (tied["model.embed_tokens.weight"] + untied["lm_head.weight"]) / 2)


def test_randomized_methods_are_seeded_per_tensor(family):
    base, experts = family
    a = merge_models(experts, "dare_ties", base=base, params={"density": 0.5}, seed=3)
    b = merge_models(experts, "dare_ties", base=base, params={"density": 0.5}, seed=3)
    c = merge_models(experts, "dare_ties", base=base, params={"density": 0.5}, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    name = "model.layers.2.mlp.up_proj.weight"
    expected = merge_tensors("dare_ties", [e[name] for e in experts], base=base[name], density=0.5, seed=tensor_seed(3, name))
    assert torch.equal(a[name], expected)


def test_fisher_weights_from_in_memory_fishers(family):
    _, experts = family
    fishers = [{k: torch.full_like(v, float(i + 1)) for k, v in experts[0].items()} for i in range(3)]
    merged = merge_models(experts, "fisher", model_params=[{"fisher": f} for f in fishers])
    name = "model.norm.weight"
    torch.testing.assert_close(merged[name], (experts[0][name] + 2 * experts[1][name] + 3 * experts[2][name]) / 6)


class CountingSource(StateDictSource):
    """Counts tensor reads, to check that validation happens before any work."""

    def __init__(self, state, label):
        super().__init__(state, label)
        self.loads = 0

    def load(self, name):
        self.loads += 1
        return super().load(name)


@pytest.mark.parametrize(
    "method, kwargs, error, message",
    [
        ("linear", {"params": {"normalise": True}}, errors.ParameterError, "linear has no parameter 'normalise'"),
        ("slerp", {"base": "BASE", "n": 1}, errors.ParameterError, "parameter 't' is required"),
        ("ties", {}, errors.MissingBaseError, "ties needs base_model"),
        ("nearswap", {"base": "BASE", "params": {"t": 0.1}}, errors.ModelCountError, r"nearswap merges exactly 1 model\(s\) \(besides the base model\), the recipe gives 3"),
        ("karcher", {"weights": [1.0, -1.0, 1.0]}, errors.WeightError, "non-negative"),
        ("karcher", {"params": {"eta": 1.5}}, errors.ParameterError, "eta"),
        ("karcher", {"params": {"block": "diagonal"}}, errors.ParameterError, "block"),
        ("linear", {"model_params": [{"weight": "heavy"}, {}, {}]}, errors.ParameterError, "weight.*float"),
        ("no_such_method", {}, errors.UnknownMethodError, "unknown merge method 'no_such_method'"),
    ],
)
def test_bad_requests_fail_before_any_tensor_is_read(family, method, kwargs, error, message):
    base, experts = family
    kwargs = dict(kwargs)
    sources = [CountingSource(e, f"e{i}") for i, e in enumerate(experts)][: kwargs.pop("n", 3)]
    base_source = CountingSource(base, "base")
    if kwargs.get("base") == "BASE":
        kwargs["base"] = base_source
    with pytest.raises(error, match=message):
        merge_models(sources, method, **kwargs)
    assert sum(s.loads for s in sources + [base_source]) == 0


@pytest.mark.parametrize("method", ["linear", "karcher"])  # karcher finds it through its Gram matrix
def test_non_finite_input_names_the_tensor(family, method):
    _, experts = family
    broken = {k: v.clone() for k, v in experts[1].items()}
    broken["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="'model.layers.1.mlp.up_proj.weight': model 1 contains 1 NaN"):
        merge_models([experts[0], broken], method)


def test_cuda_on_a_machine_without_it_is_a_clear_error(family, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(errors.DeviceError, match="CUDA is not available"):
        merge_models(family[1], "linear", device="cuda")
    with pytest.raises(errors.DeviceError, match="unknown device"):
        merge_models(family[1], "linear", device="tpu9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["karcher", "linear", "ties"])
def test_cuda_matches_cpu(family, method):
    base, experts = family
    cpu = merge_models(experts, method, base=base)
    gpu = merge_models(experts, method, base=base, device="cuda")
    for k in cpu:
        assert gpu[k].device.type == "cpu"
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ per-tensor state


KARCHER_MODES = [
    {},
    {"block": "row"},
    {"block": "column", "eta": 0.5},
    {"task_vectors": True},
    {"norm_average": "all", "init": "first", "max_iter": 10, "tol": 1e-5},
]


@pytest.mark.parametrize("params", KARCHER_MODES)
def test_reweighting_a_karcher_session_reuses_the_grams_and_equals_merge_tensors(family, params, monkeypatch):
    import karcher_lab.methods.karcher as karcher_module

    base, experts = family
    sources = [CountingSource(e, f"e{i}") for i, e in enumerate(experts)]
    session = MergeSession(sources, base=base if params.get("task_vectors") else None, keep_inputs=True)
    gram_passes = []
    real_gram = karcher_module.gram_matrix
    monkeypatch.setattr(  # plan_merge's probe merges on PROBE_SHAPE tensors do not count
        karcher_module, "gram_matrix",
        lambda xs, *a, **k: (gram_passes.extend([1] * (xs[0].shape != PROBE_SHAPE)), real_gram(xs, *a, **k))[1],
    )
    first = session.merge("karcher", weights=[1.0, 1.0, 1.0], params=params)
    n_tensors = len(first)
    assert len(gram_passes) == n_tensors and sum(s.loads for s in sources) == 3 * n_tensors
    for weights in ([3.0, 1.0, 0.5], [0.0, 1.0, 2.0]):
        before = len(gram_passes)
        merged = session.merge("karcher", weights=weights, params=params)
        assert len(gram_passes) == before, "re-weighting must not recompute any Gram matrix"
        assert sum(s.loads for s in sources) == 3 * n_tensors, "re-weighting must not re-read any input"
        assert session.last_stats.bytes_read == 0
        for name, t in merged.items():
            expected = merge_tensors(
                "karcher", [e[name] for e in experts], weights=weights,
                base=base[name] if params.get("task_vectors") else None, **params,
            )
            torch.testing.assert_close(t, expected, rtol=0, atol=0, msg=name)
    assert session.states.hits == 2 * n_tensors and session.states.misses == n_tensors
    assert session.traces["model.norm.weight"].converged or params.get("max_iter") == 10


@pytest.mark.parametrize("method, extra", [("karcher", {}), ("linear", {}), ("ties", {"density": 0.5})])
def test_reweighting_a_session_reuses_its_plan_and_equals_a_fresh_merge(family, method, extra, monkeypatch):
    base, experts = family
    session = MergeSession(experts, base=base if method == "ties" else None)
    plans = []
    real_plan = session.plan
    monkeypatch.setattr(session, "plan", lambda *a, **k: (plans.append(1), real_plan(*a, **k))[1])
    for weights in ([1.0, 1.0, 1.0], [3.0, 1.0, 0.5], [0.0, 1.0, 2.0]):
        merged = session.merge(method, weights=weights, params=extra)
        fresh = karcher_lab.merge(experts, method, weights=weights, base=base if method == "ties" else None, params=extra)
        for name, t in merged.items():
            torch.testing.assert_close(t, fresh[name], rtol=0, atol=0, msg=name)
    assert plans == [1], "a merge that changes only the weights must not plan the recipe again"
    session.merge(method, weights=[1.0, 1.0, 1.0], params={**extra, "normalize": False} if method != "karcher" else {"eta": 0.5})
    assert plans == [1, 1]
    with pytest.raises(errors.WeightError, match="got 2 weights for 3 models"):
        session.merge(method, weights=[1.0, 1.0], params=extra)


def test_session_with_other_methods_reuses_loaded_inputs(family):
    base, experts = family
    sources = [CountingSource(e, f"e{i}") for i, e in enumerate(experts)]
    session = MergeSession(sources, base=base, keep_inputs=True)
    a = session.merge("ties", params={"density": 0.5})
    loads = sum(s.loads for s in sources)
    b = session.merge("task_arithmetic", weights=[1.0, 0.5, 0.25])
    assert sum(s.loads for s in sources) == loads
    assert set(a) == set(b)


# ---------------------------------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from karcher_lab.pipeline import run_recipe
    from karcher_lab.recipe import parse_recipe
    root = Path(sys.argv[1])
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    for method in sys.argv[2:]:
        recipe = parse_recipe({"merge_method": method, "models": [{"model": str(root / f"m{i}")} for i in range(3)]})
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        before = status("VmRSS")
        stats = run_recipe(recipe, root / ("out-" + method), out_shard_size="20MB")
        print(json.dumps({"method": method, "increase": status("VmHWM") - before, "read": stats.bytes_read}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    """3 models × 40 tensors of 2 MiB (80 MiB each): loading even one model whole would add 80 MiB."""
    from karcher_lab.io.synthetic import write_checkpoint

    g = torch.Generator().manual_seed(0)
    largest = 512 * 1024 * 4
    for i in range(3):
        state = {f"model.layers.{k}.mlp.up_proj.weight": torch.randn(512, 1024, generator=g) for k in range(40)}
        write_checkpoint(tmp_path / f"m{i}", {"model_type": "llama", "num_hidden_layers": 40}, state, tokenizer=False)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), "linear", "karcher"], capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["method"] for r in results] == ["linear", "karcher"]
    for r in results:
        assert r["read"] == 3 * 40 * largest
        # (N inputs + 1 output) = 4 tensors, plus the method's working buffers and allocator slack
        assert r["increase"] < 20 * largest, f"{r['method']}: peak grew by {r['increase'] / 2**20:.1f} MiB"


def test_transformers_models_in_memory_including_a_tied_head(tmp_path):
    from transformers import AutoModelForCausalLM

    from karcher_lab.io.synthetic import _config_object, tiny_config

    config = _config_object(tiny_config("qwen2", tie_word_embeddings=True))
    torch.manual_seed(0)
    a = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(1)
    b = AutoModelForCausalLM.from_config(config)
    merged = karcher_lab.merge([a, b], "linear", weights=[1.0, 3.0])
    assert "lm_head.weight" not in merged  # the tied head shares the embedding's storage
    name = "model.layers.0.self_attn.q_proj.bias"
    torch.testing.assert_close(merged[name], (a.state_dict()[name] + 3 * b.state_dict()[name]) / 4)
    stats = karcher_lab.merge([a, b], "karcher", out=tmp_path / "m")
    assert stats.out == tmp_path / "m" and "model.safetensors" in stats.files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.tie_word_embeddings and loaded.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


def test_subset_merger_follows_the_method_rules(family):
    from karcher_lab.pipeline import SubsetMerger

    base, experts = family
    merger = SubsetMerger(experts, base=base)
    # karcher: one session over all experts; a subset is the others at weight 0, Grams computed once
    for members, weights in (([0, 1, 2], None), ([0, 2], [1.0, 3.0]), ([1], None)):
        got = merger.merge("karcher", members, weights)
        expected = karcher_lab.merge([experts[i] for i in members], "karcher", weights=weights)
        for name, t in got.state.items():
            torch.testing.assert_close(t, expected[name], rtol=1e-6, atol=1e-7, msg=name)
        assert set(got.traces) == set(got.state)
    (full,) = [s for key, s in merger._sessions.items() if len(key[0]) == 3]
    assert full.states.misses == len(base) and full.states.hits == 2 * len(base)
    # karcher uses the base only in task-vector mode; ties needs it; a pair method takes the first member
    tv = merger.merge("karcher", [0, 1], params={"task_vectors": True})
    torch.testing.assert_close(tv.state["lm_head.weight"], karcher_lab.merge(
        experts[:2], "karcher", base=base, params={"task_vectors": True})["lm_head.weight"], rtol=1e-6, atol=1e-7)
    ties = merger.merge("ties", [0, 2], [1.0, 1.0], params={"density": 0.5})
    assert torch.equal(ties.state["lm_head.weight"], karcher_lab.merge(
        [experts[0], experts[2]], "ties", base=base, weights=[1.0, 1.0], params={"density": 0.5})["lm_head.weight"])
    slerp = merger.merge("slerp", [2, 0], params={"t": 0.25})
    assert torch.equal(slerp.state["lm_head.weight"], merge_tensors(
        "slerp", [experts[2]["lm_head.weight"], experts[0]["lm_head.weight"]], t=0.25))
    fusion = merger.merge("arcee_fusion", [1, 2], first_as_base=True)
    assert torch.equal(fusion.state["lm_head.weight"], karcher_lab.merge(
        [experts[2]], "arcee_fusion", base=experts[1], seed=0)["lm_head.weight"])
    with pytest.raises(errors.MissingBaseError):
        merger.merge("ties", [0, 1], use_base=False)
    with pytest.raises(errors.ParameterError, match=r"member indices \[3\] are not in 0..2"):
        merger.merge("linear", [0, 3])
    with pytest.raises(errors.EmptyInputError):
        merger.merge("linear", [])
