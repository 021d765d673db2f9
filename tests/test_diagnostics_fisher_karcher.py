"""Fisher-preconditioned karcher (§3.4), the ``fisher`` option of the registered ``karcher`` method:
uniform Fishers give plain karcher, a float64 direct iteration in the √F̄-scaled space, a closed form,
the pipeline and the Gram cache, and bad Fishers refused before any work."""
import math

import pytest
import torch

import karcher_lab.methods.karcher as karcher_module
from karcher_lab import MergeSession, merge_models, merge_tensors
from karcher_lab.errors import MissingBaseError, NonFiniteError, ParameterError, ShapeMismatchError
from karcher_lab.geometry import sphere
from karcher_lab.methods.prepared import PreparedStates
from karcher_lab.pipeline.plan import PROBE_SHAPE

F64 = torch.float64


def _experts(n=4, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=F64)
    return base, [base + 0.7 * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


def _fishers(n, shape, seed=1):
    """Positive, strongly non-uniform diagonal Fishers (entries spread over four decades)."""
    g = torch.Generator().manual_seed(seed)
    return [10 ** (4 * torch.rand(shape, generator=g, dtype=F64) - 2) for _ in range(n)]


def _direct_fisher_karcher(xs, fishers, weights, tol=1e-14, max_iter=500):
    """The test's own float64 reference: y_i = √F̄ ⊙ x_i, literal eq. 5 on the unit y_i (sphere.log /
    sphere.exp on the data), norm = Σ ᾱ_i ‖y_i‖, then map back by 1/√F̄ (whole-tensor block)."""
    alpha = torch.tensor(weights, dtype=F64) / sum(weights)
    mean_fisher = sum(a * f for a, f in zip(alpha, fishers))
    ys = [(mean_fisher.sqrt() * x).flatten() for x in xs]
    units = [y / y.norm() for y in ys]
    u = sum(a * v for a, v in zip(alpha, units))
    u = u / u.norm()
    for _ in range(max_iter):
        step = sum(a * sphere.log(u, v) for a, v in zip(alpha, units))
        if float(step.norm()) < tol:
            break
        u = sphere.exp(u, step)
    else:
        raise AssertionError("reference did not converge")
    scale = sum(a * y.norm() for a, y in zip(alpha, ys))
    return (scale * u).reshape(xs[0].shape) / mean_fisher.sqrt()


@pytest.mark.parametrize("block", ["tensor", "row"])
def test_uniform_fisher_gives_plain_karcher(block):
    base, experts = _experts()
    weights = [1.0, 2.0, 0.5, 1.5]
    uniform = [torch.full_like(base, 3.7)] * len(experts)
    for task_vectors in (False, True):
        plain = merge_tensors("karcher", experts, weights=weights, base=base, block=block, task_vectors=task_vectors)
        pre = merge_tensors(
            "karcher", experts, weights=weights, base=base, block=block, task_vectors=task_vectors, fisher=uniform,
            return_trace=True,
        )
        torch.testing.assert_close(pre.tensor, plain, rtol=0, atol=1e-12)
        assert pre.trace.converged


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 3.0]])
def test_non_uniform_fisher_equals_a_direct_float64_iteration_in_the_scaled_space(weights):
    _, experts = _experts(seed=3)
    fishers = _fishers(4, experts[0].shape)
    expected = _direct_fisher_karcher(experts, fishers, weights)
    ours = merge_tensors("karcher", experts, weights=weights, fisher=fishers, tol=1e-13)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=0)
    plain = merge_tensors("karcher", experts, weights=weights, tol=1e-13)
    assert float((ours - plain).norm() / plain.norm()) > 1e-2  # the preconditioning changes the merge
    # float32 inputs: the same merge up to float32 rounding
    ours32 = merge_tensors("karcher", [x.float() for x in experts], weights=weights, fisher=[f.float() for f in fishers])
    assert ours32.dtype == torch.float32
    assert float((ours32.double() - expected).norm() / expected.norm()) < 1e-6


def test_fisher_preconditioning_closed_form():
    """x_1 = e_1, x_2 = e_2 with F̄ = diag(a, b): the scaled points √a e_1 and √b e_2 are orthogonal;
    their equal-weight Karcher direction is (e_1 + e_2)/√2 with the F̄-norm (√a + √b)/2, so mapping back
    gives θ* = (√a + √b)/(2√2) · (1/√a, 1/√b). The Fisher of each expert is averaged with the weights."""
    x1, x2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    f1, f2 = torch.tensor([1.0, 9.0], dtype=F64), torch.tensor([7.0, 3.0], dtype=F64)
    a, b = (f1 + f2).div(2).tolist()  # F̄ = (4, 6)
    merged = merge_tensors("karcher", [x1, x2], fisher=[f1, f2])
    scale = (math.sqrt(a) + math.sqrt(b)) / (2 * math.sqrt(2))
    assert merged.tolist() == pytest.approx([scale / math.sqrt(a), scale / math.sqrt(b)], rel=1e-12)
    plain = merge_tensors("karcher", [x1, x2])  # what a uniform F̄ gives: the 45° direction, norm 1
    assert plain.tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-12)


def test_zero_weight_expert_and_its_fisher_are_left_out():
    _, experts = _experts(n=3, seed=5)
    fishers = _fishers(3, experts[0].shape, seed=6)
    with_zero = merge_tensors("karcher", experts, weights=[1.0, 0.0, 2.0], fisher=fishers)
    without = merge_tensors("karcher", [experts[0], experts[2]], weights=[1.0, 2.0], fisher=[fishers[0], fishers[2]])
    torch.testing.assert_close(with_zero, without, rtol=1e-13, atol=0)


def test_fisher_floor_makes_all_zero_fishers_plain_karcher():
    x1, x2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    zero = torch.zeros(2)
    merged = merge_tensors("karcher", [x1, x2], fisher=[zero, zero])
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, merge_tensors("karcher", [x1, x2]))


@pytest.mark.parametrize(
    "fishers, kwargs, error, message",
    [
        (lambda z: [z, torch.zeros(3)], {}, ShapeMismatchError, "Fisher of model 1 has shape"),
        (lambda z: [z, -torch.ones(2)], {}, ParameterError, "Fisher of model 1 has 2 negative"),
        (lambda z: [z, torch.tensor([1.0, float("nan")])], {}, NonFiniteError, "Fisher of model 1 contains NaN"),
        (lambda z: [z, torch.tensor([float("inf"), 1.0])], {}, NonFiniteError, "Fisher of model 1 contains NaN or Inf"),
        (lambda z: [z, [1.0, 2.0]], {}, ParameterError, "Fisher of model 1 is a list"),
        (lambda z: [z], {}, ParameterError, "per-model parameter 'fisher' has 1 values for 2 models"),
        (lambda z: [z, z], {"fisher_floor": 0.0}, ParameterError, "fisher_floor"),
        (lambda z: [z, z], {"task_vectors": True}, MissingBaseError, "task_vectors"),
    ],
)
def test_bad_fishers_are_refused_before_any_work(fishers, kwargs, error, message, monkeypatch):
    x1, x2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    passes = []
    monkeypatch.setattr(karcher_module, "gram_matrix", lambda *a, **k: passes.append(1))
    with pytest.raises(error, match=message):
        merge_tensors("karcher", [x1, x2], fisher=fishers(torch.ones(2)), **kwargs)
    with pytest.raises(error, match=message):
        merge_tensors("karcher", [x1, x2], fisher=fishers(torch.ones(2)), states=PreparedStates(), key="t", **kwargs)
    assert passes == []


def test_non_finite_model_is_named_with_a_fisher_too():
    x1, x2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, float("inf")])
    with pytest.raises(NonFiniteError, match="model 1 contains 0 NaN and 1 Inf"):
        merge_tensors("karcher", [x1, x2], fisher=[torch.ones(2)] * 2)


def _family(n=3):
    g = torch.Generator().manual_seed(11)
    names = {"model.layers.0.mlp.up_proj.weight": (12, 6), "model.layers.0.input_layernorm.weight": (6,)}
    base = {k: torch.randn(s, generator=g) for k, s in names.items()}
    experts = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    fishers = [{k: 10 ** (3 * torch.rand(v.shape, generator=g) - 1) for k, v in base.items()} for _ in range(n)]
    return base, experts, fishers


@pytest.mark.parametrize("params", [{}, {"block": "row"}, {"task_vectors": True}])
def test_model_merges_and_a_reweighted_session_use_the_fisher(params, monkeypatch):
    """merge_models, a MergeSession re-weighted with the per-Fisher Grams cached, and merge_tensors agree;
    re-weighting makes no data pass; other Fishers are not served from the cache."""
    base, experts, fishers = _family()
    use_base = base if params.get("task_vectors") else None
    model_params = [{"fisher": f} for f in fishers]

    def expected(name, weights, fs):
        return merge_tensors("karcher", [e[name] for e in experts], weights=weights, base=None if use_base is None else base[name],
                             fisher=[f[name] for f in fs], **params)

    once = merge_models(experts, "karcher", base=use_base, weights=[1.0, 2.0, 3.0], params=params, model_params=model_params)
    for name, t in once.items():
        torch.testing.assert_close(t, expected(name, [1.0, 2.0, 3.0], fishers), rtol=0, atol=0)

    session = MergeSession(experts, base=use_base, keep_inputs=True)
    passes = []
    real = karcher_module.gram_matrix
    monkeypatch.setattr(  # plan_merge's probe merges on PROBE_SHAPE tensors do not count
        karcher_module, "gram_matrix", lambda xs, *a, **k: (passes.extend([1] * (xs[0].shape != PROBE_SHAPE)), real(xs, *a, **k))[1]
    )
    session.merge("karcher", weights=[1.0, 1.0, 1.0], params=params, model_params=model_params)
    assert len(passes) == 3 * len(base)  # one Gram per Fisher per tensor
    results = {}
    for weights in ([3.0, 1.0, 0.5], [0.0, 1.0, 2.0]):
        results[tuple(weights)] = session.merge("karcher", weights=weights, params=params, model_params=model_params)
        assert len(passes) == 3 * len(base), "re-weighting must not recompute any Gram matrix"
    other = [{k: v.flip(0) for k, v in f.items()} for f in fishers]
    merged = session.merge("karcher", weights=[1.0, 2.0, 3.0], params=params, model_params=[{"fisher": f} for f in other])
    assert len(passes) == 6 * len(base)
    for weights, result in results.items():
        for name, t in result.items():
            torch.testing.assert_close(t, expected(name, list(weights), fishers), rtol=1e-5, atol=1e-6)
    for name, t in merged.items():
        torch.testing.assert_close(t, expected(name, [1.0, 2.0, 3.0], other), rtol=1e-5, atol=1e-6)


def test_fisher_given_for_some_models_only_fails_before_reading():
    _, experts, fishers = _family()
    with pytest.raises(ParameterError, match="'fisher' is given for some models, so it is needed for model"):
        merge_models(experts, "karcher", model_params=[{"fisher": fishers[0]}, {}, {"fisher": fishers[2]}])
    bad = [dict(f) for f in fishers]
    bad[1]["model.layers.0.input_layernorm.weight"] = torch.ones(7)
    with pytest.raises(ParameterError, match="tensor 'model.layers.0.input_layernorm.weight' is shape"):
        merge_models(experts, "karcher", model_params=[{"fisher": f} for f in bad])
