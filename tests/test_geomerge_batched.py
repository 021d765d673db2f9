"""geomerge_modules: GeoMerge batched over modules gives every module the sequential solver's mean
(geomerge_factors), on Gaussian adapters (the nearly orthogonal failure cases included) and on real LoRA
adapters; the GL(r) symmetry holds; merge_factor_sets / merge_lora route geomerge through it; bad input
fails before any work, naming the module."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from karcher_lab.errors import (
    AntipodalError,
    DeviceError,
    EmptyInputError,
    ModelCountError,
    NotSupportedError,
    ParameterError,
    WeightError,
)
from karcher_lab.geometry import frechet, sphere
from karcher_lab.methods.lora import geomerge_modules, merge_factor_sets
from karcher_lab.methods.lora.geomerge import geomerge_factors

F64 = torch.float64


def _adapters(seed, n, d1, d2, r, scale=True):
    gen = torch.Generator().manual_seed(seed)
    s1, s2 = (d1**-0.5, d2**-0.5) if scale else (1.0, 1.0)
    return [(torch.randn(d1, r, dtype=F64, generator=gen) * s1, torch.randn(d2, r, dtype=F64, generator=gen) * s2)
            for _ in range(n)]


def _dw(pair):
    g, h = pair
    return g.double() @ h.double().T


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _assert_same_as_sequential(modules, bound, **params):
    batched = geomerge_modules(modules, **params)
    weights = params.pop("weights", None)
    for k, pairs in enumerate(modules):
        g, h = geomerge_factors(pairs, weights, **params)
        assert _rel(_dw(batched[k]), _dw((g, h))) < bound, k
        assert batched[k][0].shape == g.shape and batched[k][0].dtype == g.dtype
    return batched


def test_modules_of_several_shapes_get_the_sequential_mean():
    shapes = [(12, 10, 3), (16, 12, 2), (12, 10, 3), (20, 9, 4), (12, 10, 3)]
    modules = [_adapters(100 + k, 3, *shape, scale=False) for k, shape in enumerate(shapes)]
    _assert_same_as_sequential(modules, 1e-8, tol=1e-8)


@pytest.mark.parametrize("seeds, n, d, r", [((6, 7, 8), 2, 32, 8), ((4001, 4002), 4, 128, 8)])
def test_nearly_orthogonal_adapters_get_the_sequential_mean(seeds, n, d, r):
    """The real failure cases of the sequential solver (Gaussian rank-8 adapters, column spaces nearly
    orthogonal: logs beyond their domain on the way) in one batch with neighbours: the same local minimum."""
    modules = [_adapters(seed, n, d, d, r, scale=False) for seed in seeds]
    _assert_same_as_sequential(modules, 1e-4)


def test_zero_weights_first_start_and_the_plain_step_match_the_sequential_solver():
    modules = [_adapters(200 + k, 3, 14, 11, 3, scale=False) for k in range(3)]
    _assert_same_as_sequential(modules, 1e-8, weights=[0.5, 0.0, 2.0], tol=1e-9)
    _assert_same_as_sequential(modules, 1e-8, init="first", tol=1e-9)
    _assert_same_as_sequential(modules, 1e-6, memory=0, tol=1e-8, max_iter=3000)


def test_the_merge_does_not_depend_on_the_factorization():
    modules = [_adapters(300 + k, 3, 24, 20, 4) for k in range(4)]
    gen = torch.Generator().manual_seed(1)
    moved = []
    for pairs in modules:
        a = torch.randn(4, 4, dtype=F64, generator=gen) + 3 * torch.eye(4, dtype=F64)
        moved.append([(g @ torch.linalg.inv(a), h @ a.T) for g, h in pairs])
    for before, after in zip(geomerge_modules(modules), geomerge_modules(moved)):
        assert _rel(_dw(after), _dw(before)) < 1e-5


def test_one_module_alone_and_inside_a_batch_agree():
    """A module's result does not depend on which other modules share its batch."""
    modules = [_adapters(400 + k, 2, 40, 40, 5) for k in range(5)]
    together = geomerge_modules(modules, batch_size=5)
    for k, pairs in enumerate(modules):
        (alone,) = geomerge_modules([pairs])
        assert _rel(_dw(together[k]), _dw(alone)) < 1e-8


def test_float32_inputs_give_float32_factors_of_the_float64_merge():
    modules = [_adapters(500 + k, 2, 16, 16, 3) for k in range(2)]
    single = [[(g.float(), h.float()) for g, h in pairs] for pairs in modules]
    for out, ref in zip(geomerge_modules(single), geomerge_modules(modules)):
        assert out[0].dtype == torch.float32
        assert _rel(_dw(out), _dw(ref)) < 1e-5


def test_a_batch_where_one_module_has_no_geodesic_start_gets_the_sequential_means(monkeypatch):
    """Two inputs: modules whose geodesic start is refused (as where the alignment of the second input to the
    first meets a log beyond reach) run the outer iteration from the truncated mean inside the same batch
    as modules that start on the geodesic, each as the sequential solver runs it."""
    from karcher_lab.methods.lora import geomerge, geomerge_batched

    modules = [_adapters(800 + k, 2, 12, 10, 3) for k in range(3)]
    refused = float(torch.linalg.svdvals(_dw(modules[1][0]))[0])  # module 1, told apart by its σ_1
    original = geomerge.geodesic_start

    def refuse_module_1(aligned, w, *, tol, max_iter):
        mean, reps, ok, steps = original(aligned, w, tol=tol, max_iter=max_iter)
        first_sigma = torch.linalg.eigvalsh(aligned.B[:, 0])[:, -1]
        return mean, reps, ok & ((first_sigma - refused).abs() > 1e-9), steps

    monkeypatch.setattr(geomerge, "geodesic_start", refuse_module_1)
    monkeypatch.setattr(geomerge_batched, "geodesic_start", refuse_module_1)
    traces = [geomerge_factors(pairs, return_trace=True)[2] for pairs in modules]
    assert [t.geodesic_iterations is None for t in traces] == [False, True, False]
    assert traces[1].iterations > 0 and traces[0].iterations == traces[2].iterations == 0
    _assert_same_as_sequential(modules, 1e-9)


def test_two_inputs_without_the_geodesic_start_get_the_sequential_mean():
    _assert_same_as_sequential([_adapters(820 + k, 2, 12, 10, 3) for k in range(3)], 1e-9, geodesic=False)


def test_non_convergence_warns_with_the_module_names():
    modules = [_adapters(600 + k, 3, 12, 10, 3, scale=False) for k in range(2)]
    with pytest.warns(RuntimeWarning, match="on 2 module"):
        geomerge_modules(modules, max_iter=1, tol=1e-12, names=["a", "b"])


def test_antipodal_inputs_raise_naming_the_module():
    g, h = _adapters(700, 1, 12, 10, 1)[0]
    ok = _adapters(701, 2, 12, 10, 1)
    with pytest.raises(AntipodalError, match="^second: "):
        geomerge_modules([ok, [(g, h), (-g, h)]], names=["first", "second"])


@pytest.mark.parametrize(
    "modules, kwargs, error, match",
    [
        ([], {}, EmptyInputError, "at least one module"),
        ([_adapters(1, 2, 12, 10, 3), _adapters(2, 3, 12, 10, 3)], {}, ModelCountError, "different numbers"),
        ([_adapters(1, 2, 12, 10, 3), _adapters(2, 2, 8, 10, 5)], {}, NotSupportedError, "^module 1: adapter 0"),
        ([_adapters(1, 2, 12, 10, 3)], {"weights": [1.0, -1.0]}, WeightError, "non-negative"),
        ([_adapters(1, 2, 12, 10, 3)], {"batch_size": 0}, ParameterError, "batch_size"),
        ([_adapters(1, 2, 12, 10, 3)], {"device": "tpu-ish"}, DeviceError, "unknown device"),
    ],
)
def test_bad_input_raises_before_any_work(modules, kwargs, error, match):
    with pytest.raises(error, match=match):
        geomerge_modules(modules, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        geomerge_modules([_adapters(1, 2, 12, 10, 3)], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_whole_batch_on_the_gpu_gives_the_cpu_result():
    modules = [_adapters(800 + k, 3, 64, 48, 4) for k in range(6)]
    cpu = geomerge_modules(modules)
    gpu = geomerge_modules(modules, device="cuda")
    for a, b in zip(gpu, cpu):
        assert a[0].device.type == "cpu"
        assert _rel(_dw(a), _dw(b)) < 1e-6


def test_merge_factor_sets_routes_geomerge_through_the_batched_solver():
    modules = {f"layer.{k}.weight": _adapters(900 + k, 2, 18, 12, 3) for k in range(3)}
    merged = merge_factor_sets(modules, "geomerge", weights=[1.0, 3.0])
    for name, pairs in modules.items():
        assert _rel(_dw(merged[name]), _dw(geomerge_factors(pairs, [0.25, 0.75]))) < 1e-8


def _sphere_batch_geometry():
    """The unit sphere as a BatchGeometry: points [K, D], inputs [K, N, D]."""

    def lift(mu, like):
        return mu.unsqueeze(1) if like.ndim == mu.ndim + 1 else mu

    def align(mu, xs, modules):
        return xs, sphere.log(mu.unsqueeze(1).expand_as(xs), xs, batch_dims=2)

    return frechet.BatchGeometry(
        exp=lambda mu, v: sphere.exp(mu, v, batch_dims=1),
        inner=lambda mu, u, v: (u * v).sum(-1),
        align=align,
        transport=lambda mu, nu, v: v - (v * lift(nu, v)).sum(-1, keepdim=True) * lift(nu, v),
    )


@pytest.mark.parametrize("memory", [0, 4])
def test_the_batched_frechet_solver_runs_each_problem_as_the_sequential_one(memory):
    gen = torch.Generator().manual_seed(3)
    xs = torch.nn.functional.normalize(torch.randn(5, 4, 6, dtype=F64, generator=gen) + 2.0, dim=-1)
    xs[1] = torch.nn.functional.normalize(xs[0] + 0.01, dim=-1)  # an easy problem that leaves the batch early
    init = xs[:, 0].clone()
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    sphere_geometry = frechet.Geometry(
        exp=sphere.exp, log=lambda mu, x: sphere.log(mu.expand_as(x), x, batch_dims=1),
        inner=lambda mu, u, v: (u * v).sum(-1), transport=lambda mu, nu, v: v - (v * nu).sum(-1, keepdim=True) * nu,
    )
    means, traces = frechet.frechet_mean_batched(_sphere_batch_geometry(), xs, w, init, tol=1e-12, max_iter=200,
                                                 memory=memory)
    for k in range(xs.shape[0]):
        mean, trace = frechet.frechet_mean(sphere_geometry, xs[k], w, init[k], tol=1e-12, max_iter=200, memory=memory)
        assert trace.converged and traces[k].converged
        assert traces[k].iterations == trace.iterations
        assert float((means[k] - mean).norm()) < 1e-12
        assert torch.allclose(traces[k].objectives, trace.objectives, rtol=1e-12, atol=1e-15)


# Real LoRA adapters: the micro pool's LoRA experts (as in test_zoo_lora) and, where built, tiny-lora.

QUICK = dict(tasks=("uppercase", "double", "units"), steps=100, lr=1e-2, train_examples=1000, eval_examples=40)


@pytest.fixture(scope="module")
def micro_lora(micro_pool, tmp_path_factory):
    from karcher_lab.zoo.lora import build_lora_pool
    from karcher_lab.zoo.lora_config import lora_config_for

    return build_lora_pool(lora_config_for(str(micro_pool.path), **QUICK), tmp_path_factory.mktemp("lora_cache"),
                           progress=False)


def _pool_modules(pool, m):
    from karcher_lab.io.lora import read_adapter

    adapters = [read_adapter(Path(pool.path) / e["adapter"]) for e in pool.experts[:m]]
    return {name: [a.modules[name].factors(F64) for a in adapters] for name in sorted(adapters[0].modules)}


def _check_pool(pool, m):
    modules = _pool_modules(pool, m)
    batched = merge_factor_sets(modules, "geomerge")
    for name, pairs in modules.items():
        reference = geomerge_factors(pairs)
        assert _rel(_dw(batched[name]), _dw(reference)) < 1e-5, name


@pytest.mark.parametrize("m", [2, 3])
def test_micro_lora_adapters_get_the_sequential_mean(micro_lora, m):
    _check_pool(micro_lora, m)


def test_tiny_lora_adapters_get_the_sequential_mean():
    from karcher_lab.zoo import find_pool
    from karcher_lab.zoo.pool import PoolNotBuiltError

    try:
        pool = find_pool("tiny-lora")
    except PoolNotBuiltError:
        pytest.skip("the tiny-lora pool is not built (karcher-lab zoo lora --base tiny)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _check_pool(pool, 3)


def test_aligning_to_many_reference_points_runs_each_entry_as_alone():
    """lowrank.align with a batch of reference points and per-entry tolerances: entry i's rotation is the
    one align(point_i, [other_i], tol_i) finds alone (its own L-BFGS pairs and line search)."""
    from karcher_lab.geometry import lowrank

    def polar(seed):
        return lowrank.polar_from_factors(*_adapters(seed, 1, 20, 16, 3, scale=False)[0])

    points = [polar(1000 + k) for k in range(4)]
    others = [polar(1100 + k) for k in range(4)]
    stack = lambda ps: lowrank.Polar(*(torch.stack(t) for t in zip(*ps)))  # noqa: E731
    tols = torch.tensor([1e-3, 1e-6, 1e-9, 1e-12], dtype=F64)
    together = lowrank.align(stack(points), stack(others), tol=tols)
    assert together.converged
    for k in range(4):
        alone = lowrank.align(points[k], stack(others[k:k + 1]), tol=float(tols[k]))
        assert torch.allclose(together.O[k], alone.O[0], rtol=0, atol=1e-10)
        assert float(together.residuals[k]) == pytest.approx(float(alone.residuals[0]), rel=1e-6, abs=1e-14)
