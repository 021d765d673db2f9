"""The ``karcher`` merge method (karcher_lab.methods.karcher): the paper's §3 with the spherical proxy.

Conformance with mergekit's own outputs is in test_golden.py; here: SLERP equivalence, norm
preservation, weights, blocks, task-vector mode, zero norms and the documented deviations.
"""
from __future__ import annotations

import math

import pytest
import torch

from karcher_lab import errors, get_method, merge_tensors
from karcher_lab.geometry import karcher_mean as km, sphere

F64 = torch.float64


def _experts(n, shape, seed=0, spread=1.0, dtype=F64):
    common = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    out = []
    for i in range(n):
        noise = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1 + i), dtype=F64)
        out.append(((1.0 + 0.3 * i) * (common + spread * noise)).to(dtype))  # different norms too
    return out


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _slerp_closed_form(x1, x2, t):
    """SLERP of the directions at t, scaled by the linearly interpolated norm (the test's own formula)."""
    n1, n2 = x1.norm(), x2.norm()
    u1, u2 = x1 / n1, x2 / n2
    theta = math.acos(float((u1.flatten() @ u2.flatten()).clamp(-1, 1)))
    direction = (math.sin((1 - t) * theta) * u1 + math.sin(t * theta) * u2) / math.sin(theta)
    return ((1 - t) * n1 + t * n2) * direction


def test_registry_contract_and_defaults():
    m = get_method("karcher")
    assert (m.base, m.weights, m.min_models, m.returns_trace) == ("optional", "nonnegative", 1, True)
    defaults = {p.name: p.default for p in m.params}
    assert defaults == {
        "max_iter": 1000, "tol": 1e-7, "eta": 1.0, "block": "tensor", "init": "chord",
        "task_vectors": False, "norm_average": "contributing", "fisher": None, "fisher_floor": 1e-6,
    }
    assert m.param("fisher").per_model and m.checks_finite


@pytest.mark.parametrize("a2", [0.5, 0.2, 0.85])
@pytest.mark.parametrize("init", ["chord", "first"])
def test_two_experts_with_unit_step_are_slerp_at_alpha2(a2, init):
    x1, x2 = _experts(2, (9, 11), seed=1, spread=1.5)
    out = merge_tensors("karcher", [x1, x2], weights=[1 - a2, a2], eta=1.0, init=init)
    torch.testing.assert_close(out, _slerp_closed_form(x1, x2, a2), rtol=0, atol=1e-12)
    x1f, x2f = x1.float(), x2.float()
    out32 = merge_tensors("karcher", [x1f, x2f], weights=[1 - a2, a2], eta=1.0, init=init)
    assert out32.dtype == torch.float32 and _rel(out32, _slerp_closed_form(x1, x2, a2)) < 1e-6


def test_merge_is_the_karcher_direction_times_the_weighted_mean_norm():
    xs = _experts(4, (6, 8), seed=2, spread=2.0)
    w = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=F64)
    res = merge_tensors("karcher", xs, weights=w, return_trace=True)
    assert res.trace.converged and res.trace.residual < 1e-7
    norm = sum(wi * x.norm() for wi, x in zip(w, xs))
    assert float(res.tensor.norm()) == pytest.approx(float(norm), rel=1e-13)  # §3.4 norm preservation
    direction = res.tensor / res.tensor.norm()
    grad = sum(wi * sphere.log(direction, x / x.norm()) for wi, x in zip(w, xs))  # eq. 4
    assert float(grad.norm()) < 1e-7


def test_weights_are_honoured_and_scale_free():
    xs = _experts(3, (40,), seed=3, spread=1.0)
    equal = merge_tensors("karcher", xs)
    weighted = merge_tensors("karcher", xs, weights=[1.0, 2.0, 5.0])
    assert _rel(weighted, equal) > 1e-2  # mergekit would return `equal` here
    torch.testing.assert_close(merge_tensors("karcher", xs, weights=[2.0, 4.0, 10.0]), weighted, rtol=0, atol=1e-13)
    mean, _ = km.karcher_mean(xs, [1.0, 2.0, 5.0])
    norm = (xs[0].norm() + 2 * xs[1].norm() + 5 * xs[2].norm()) / 8
    torch.testing.assert_close(weighted, norm * mean, rtol=0, atol=1e-12)


def test_defaults_converge_tighter_than_mergekit_settings():
    xs = _experts(5, (32, 32), seed=4, spread=3.0, dtype=torch.float32)
    reference, _ = km.karcher_mean([x.double() for x in xs], tol=1e-13)
    reference = reference * sum(x.double().norm() for x in xs) / 5
    ours = merge_tensors("karcher", xs, return_trace=True)
    mk_like = merge_tensors("karcher", xs, max_iter=10, tol=1e-5, return_trace=True)
    assert ours.trace.converged and ours.trace.residual < 1e-7
    assert _rel(ours.tensor, reference) < 5e-7  # float32 output rounding
    assert mk_like.trace.residual < 1e-5 < float(mk_like.trace.residuals[-2])
    assert _rel(mk_like.tensor, reference) > 1e-6  # stopped while ‖v‖ ≈ 3e-6


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_smaller_steps_reach_the_same_mean(eta):
    xs = _experts(4, (50,), seed=5, spread=1.0)
    full = merge_tensors("karcher", xs, weights=[1, 2, 3, 4], tol=1e-12)
    damped = merge_tensors("karcher", xs, weights=[1, 2, 3, 4], tol=1e-12, eta=eta, return_trace=True)
    assert damped.trace.converged and _rel(damped.tensor, full) < 1e-11


@pytest.mark.parametrize("block", ["row", "column"])
def test_finer_blocks_merge_each_row_or_column_on_its_own(block):
    xs = _experts(3, (5, 7), seed=6, spread=1.2)
    w = [0.5, 0.3, 0.2]
    out = merge_tensors("karcher", xs, weights=w, block=block, tol=1e-12)
    for k in range(5 if block == "row" else 7):
        pick = (lambda x: x[k]) if block == "row" else (lambda x: x[:, k])
        alone = merge_tensors("karcher", [pick(x) for x in xs], weights=w, tol=1e-12)
        torch.testing.assert_close(pick(out), alone, rtol=0, atol=1e-13)
    assert _rel(out, merge_tensors("karcher", xs, weights=w, tol=1e-12)) > 1e-3


def test_task_vector_mode_merges_deltas_and_adds_the_base_back():
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(7), dtype=F64)
    deltas = _experts(3, (8, 6), seed=8, spread=1.0)
    models = [base + 0.05 * d for d in deltas]
    w = [0.2, 0.5, 0.3]
    out = merge_tensors("karcher", models, base=base, task_vectors=True, weights=w, tol=1e-12)
    expected = base + merge_tensors("karcher", [m - base for m in models], weights=w, tol=1e-12)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    # without the flag the base is ignored
    plain = merge_tensors("karcher", models, weights=w, tol=1e-12)
    torch.testing.assert_close(merge_tensors("karcher", models, base=base, weights=w, tol=1e-12), plain)
    # every expert equal to the base: no task vector has a direction, the result is the base
    torch.testing.assert_close(merge_tensors("karcher", [base, base], base=base, task_vectors=True), base)
    with pytest.raises(errors.MissingBaseError, match="task_vectors"):
        merge_tensors("karcher", models, task_vectors=True)


def test_zero_norm_expert_contributes_neither_direction_nor_norm_by_default():
    x1, x2 = _experts(2, (20,), seed=9, spread=1.0)
    zero = torch.zeros_like(x1)
    without = merge_tensors("karcher", [x1, x2])
    torch.testing.assert_close(merge_tensors("karcher", [x1, zero, x2]), without, rtol=0, atol=1e-14)
    # mergekit's choice: the zero norm still enters the average norm, shrinking the result by 2/3
    as_mergekit = merge_tensors("karcher", [x1, zero, x2], norm_average="all")
    torch.testing.assert_close(as_mergekit, without * 2 / 3, rtol=0, atol=1e-14)
    torch.testing.assert_close(merge_tensors("karcher", [zero, zero]), zero)


def test_tiny_tensors_are_merged_not_zeroed():
    """mergekit uses tol (1e-5) also as a norm cut-off and returns zeros when every norm is below it."""
    xs = _experts(3, (16,), seed=10, spread=1.0)
    big = merge_tensors("karcher", xs, weights=[1, 2, 3])
    tiny = merge_tensors("karcher", [1e-8 * x for x in xs], weights=[1, 2, 3])
    assert float(tiny.norm()) > 0
    torch.testing.assert_close(tiny, 1e-8 * big, rtol=1e-12, atol=0)


def test_antipodal_experts_raise_naming_the_tensor():
    x = torch.randn(12, generator=torch.Generator().manual_seed(11), dtype=F64)
    with pytest.raises(errors.AntipodalError, match=r"tensor 'model.layers.0.mlp.up_proj.weight': models 0 and 1"):
        merge_tensors("karcher", [x, -2 * x], name="model.layers.0.mlp.up_proj.weight")


def test_low_precision_inputs_keep_their_dtype():
    xs = _experts(3, (16, 16), seed=12, spread=1.0, dtype=torch.bfloat16)
    out = merge_tensors("karcher", xs)
    assert out.dtype == torch.bfloat16
    exact = merge_tensors("karcher", [x.double() for x in xs])
    assert _rel(out, exact) < 2**-8  # bf16 output rounding only
    assert merge_tensors("karcher", xs, out_dtype=torch.float32).dtype == torch.float32


def test_single_expert_is_returned_unchanged():
    x = _experts(1, (4, 3), seed=13)[0]
    torch.testing.assert_close(merge_tensors("karcher", [x]), x, rtol=0, atol=1e-15)


@pytest.mark.parametrize("threshold", [1 << 20, 100])  # float64 products; float32 runs (see gram_matrix)
def test_non_finite_inputs_are_found_through_the_gram_and_named(threshold, monkeypatch):
    """merge_tensors skips its NaN/Inf pass for karcher (checks_finite): the Gram diagonal finds them."""
    monkeypatch.setattr(km, "GRAM_FLOAT32_BLOCK", threshold)
    xs = _experts(3, (16, 16), seed=14, dtype=torch.float32)
    base = xs[0] * 0.5
    for where, value in (("model 2", float("nan")), ("model 1", float("inf"))):
        broken = [x.clone() for x in xs]
        broken[int(where[-1])][3, 4] = value
        with pytest.raises(errors.NonFiniteError, match=f"tensor 'w': {where} contains"):
            merge_tensors("karcher", broken, name="w")
        with pytest.raises(errors.NonFiniteError, match=f"{where} contains"):
            merge_tensors("karcher", broken, base=base, task_vectors=True, name="w")
    bad_base = base.clone()
    bad_base[0, 0] = float("nan")
    for task_vectors in (True, False):  # an unused base is still refused, as by every method
        with pytest.raises(errors.NonFiniteError, match="base contains 1 NaN"):
            merge_tensors("karcher", xs, base=bad_base, task_vectors=task_vectors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"block": "row"}, {"task_vectors": True}])
def test_narrow_inputs_are_read_as_they_are_with_the_float32_result(dtype, options):
    """karcher takes bf16/fp16 inputs without a float32 copy of each (MergeCall holds the inputs
    themselves) and gives the same bits as on their exact float32 copies."""
    from karcher_lab.methods.api import validate

    g = torch.Generator().manual_seed(0)
    experts = [torch.randn(64, 48, generator=g).to(dtype) for _ in range(4)]
    base = torch.randn(64, 48, generator=g).to(dtype)
    call = validate("karcher", experts, weights=[1, 2, 3, 4], base=base, params=options)
    assert all(x is y for x, y in zip(call.tensors, experts))
    narrow = merge_tensors("karcher", experts, weights=[1, 2, 3, 4], base=base, out_dtype=torch.float32, **options)
    wide = merge_tensors("karcher", [x.float() for x in experts], weights=[1, 2, 3, 4], base=base.float(), **options)
    assert torch.equal(narrow, wide)
