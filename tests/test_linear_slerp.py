"""linear, slerp and nuslerp against closed forms (float64 inputs, so tolerances are tight)."""
from __future__ import annotations

import math

import pytest
import torch

from karcher_lab import errors, merge_tensors
from karcher_lab.methods import get_method

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _angle(a, b):
    return math.acos(float((a.flatten() @ b.flatten()) / (a.norm() * b.norm())))


def test_contracts_match_mergekit():
    expected = {  # (base, weights, min_models, max_models) as mergekit's YAML uses them
        "linear": ("unused", "any", 1, None),
        "slerp": ("first", "unused", 2, 2),  # mergekit's base + other arrive as [base, other]
        "nuslerp": ("optional", "any", 2, 2),
    }
    for name, contract in expected.items():
        m = get_method(name)
        assert (m.base, m.weights, m.min_models, m.max_models) == contract, name
        assert not m.randomized
    assert get_method("linear").param("normalize").default is True
    assert get_method("nuslerp").param("nuslerp_flatten").default is True
    assert get_method("nuslerp").param("nuslerp_row_wise").default is False


# ---- linear -----------------------------------------------------------------------------------------

def test_linear_is_the_normalized_weighted_mean():
    xs = [_randn(3, 4, seed=i) for i in range(3)]
    w = [1.0, 2.0, 5.0]
    expected = (xs[0] + 2 * xs[1] + 5 * xs[2]) / 8
    torch.testing.assert_close(merge_tensors("linear", xs, weights=w), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        merge_tensors("linear", xs, weights=w, normalize=False), 8 * expected, rtol=1e-14, atol=1e-14
    )


def test_linear_default_weights_give_the_plain_mean_and_ignore_the_base():
    xs = [_randn(5, seed=i) for i in range(4)]
    out = merge_tensors("linear", xs, base=_randn(5, seed=9))
    torch.testing.assert_close(out, sum(xs) / 4, rtol=1e-14, atol=1e-14)


def test_linear_negative_weights_extrapolate():
    a, b = _randn(6, seed=1), _randn(6, seed=2)
    out = merge_tensors("linear", [a, b], weights=[1.5, -0.5])
    torch.testing.assert_close(out, 1.5 * a - 0.5 * b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("w", [[1.0, -1.0], [0.1, 0.2, -0.3]])
def test_linear_weights_summing_to_zero_cannot_be_normalized(w):
    xs = [_randn(4, seed=i) for i in range(len(w))]
    with pytest.raises(errors.WeightError, match="sum to zero"):
        merge_tensors("linear", xs, weights=w, name="blk.0")
    out = merge_tensors("linear", xs, weights=w, normalize=False)
    torch.testing.assert_close(out, sum(wi * x for wi, x in zip(w, xs)), rtol=1e-12, atol=1e-12)


def test_linear_keeps_the_input_dtype_and_averages_bf16_exactly():
    xs = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), torch.tensor([3.0, 4.0, 5.0], dtype=torch.bfloat16)]
    out = merge_tensors("linear", xs)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [2.0, 3.0, 4.0]


# ---- slerp ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1 / 3, 1.0])
def test_slerp_of_orthogonal_unit_vectors_walks_the_quarter_circle(t):
    a, b = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    out = merge_tensors("slerp", [a, b], t=t)
    expected = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_slerp_midpoint_of_orthogonal_vectors_of_unequal_norm():
    a, b = torch.tensor([2.0, 0.0, 0.0], dtype=F64), torch.tensor([0.0, 0.0, 6.0], dtype=F64)
    out = merge_tensors("slerp", [a, b], t=0.5)  # sin(Ω/2)/sin Ω = 1/√2 for Ω = π/2
    torch.testing.assert_close(out, (a + b) / math.sqrt(2), rtol=1e-15, atol=1e-15)


def test_slerp_moves_at_constant_speed_on_the_sphere_of_equal_norm_inputs():
    a = _randn(8, 6, seed=3)
    b = _randn(8, 6, seed=4)
    b = b * (a.norm() / b.norm())
    omega = _angle(a, b)
    for t in (0.1, 0.6, 0.9):
        out = merge_tensors("slerp", [a, b], t=t)
        assert out.shape == a.shape
        assert out.norm().item() == pytest.approx(a.norm().item(), rel=1e-12)
        assert _angle(a, out) == pytest.approx(t * omega, rel=1e-10)
        assert _angle(out, b) == pytest.approx((1 - t) * omega, rel=1e-10)


def _pair_with_cosine(cos):
    a = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    b = torch.tensor([cos, math.sqrt(1 - cos * cos), 0.0], dtype=F64)
    return a, 2.0 * b


def test_slerp_falls_back_to_lerp_above_the_0_9995_threshold_only():
    t = 0.3
    a, b = _pair_with_cosine(0.9996)
    torch.testing.assert_close(merge_tensors("slerp", [a, b], t=t), (1 - t) * a + t * b, rtol=1e-15, atol=1e-15)
    a, b = _pair_with_cosine(0.9994)
    omega = math.acos(0.9994)
    spherical = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    out = merge_tensors("slerp", [a, b], t=t)
    torch.testing.assert_close(out, spherical, rtol=1e-12, atol=1e-12)
    assert (out - ((1 - t) * a + t * b)).abs().max() > 1e-6  # the two branches really differ here


def test_slerp_of_antipodal_tensors_is_the_chord():
    a = _randn(4, 4, seed=5)
    out = merge_tensors("slerp", [a, -a], t=0.25)
    torch.testing.assert_close(out, 0.5 * a, rtol=1e-15, atol=1e-15)


def test_slerp_with_a_zero_tensor_interpolates_linearly():
    # Deviation from mergekit, which would give sin(tπ/2)·b (treating zero as orthogonal to b).
    b = _randn(3, 5, seed=6)
    torch.testing.assert_close(merge_tensors("slerp", [torch.zeros(3, 5, dtype=F64), b], t=0.5), 0.5 * b)
    torch.testing.assert_close(merge_tensors("slerp", [b, torch.zeros(3, 5, dtype=F64)], t=0.25), 0.75 * b)


def test_slerp_ignores_weights():
    a, b = _randn(7, seed=1), _randn(7, seed=2)
    torch.testing.assert_close(
        merge_tensors("slerp", [a, b], t=0.4, weights=[5.0, 1.0]), merge_tensors("slerp", [a, b], t=0.4)
    )


def test_slerp_float32_matches_the_float64_closed_form():
    a, b = _randn(64, 32, seed=7), _randn(64, 32, seed=8)
    ref = merge_tensors("slerp", [a, b], t=0.7)
    out = merge_tensors("slerp", [a.float(), b.float()], t=0.7)
    assert out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan")])
def test_slerp_t_outside_0_1_is_a_parameter_error(t):
    with pytest.raises(errors.ParameterError, match="'t'"):
        merge_tensors("slerp", [_randn(3), _randn(3, seed=1)], t=t)


# ---- nuslerp ----------------------------------------------------------------------------------------

def test_nuslerp_is_slerp_at_t_equal_w2_over_the_weight_sum():
    a, b = _randn(5, 6, seed=1), _randn(5, 6, seed=2)
    torch.testing.assert_close(
        merge_tensors("nuslerp", [a, b], weights=[1.0, 3.0]), merge_tensors("slerp", [a, b], t=0.75),
        rtol=1e-13, atol=1e-13,
    )
    torch.testing.assert_close(merge_tensors("nuslerp", [a, b]), merge_tensors("slerp", [a, b], t=0.5),
                               rtol=1e-13, atol=1e-13)


def test_nuslerp_with_a_base_interpolates_the_task_vectors():
    base = _randn(4, 3, seed=0)
    d1 = torch.zeros(4, 3, dtype=F64)
    d2 = torch.zeros(4, 3, dtype=F64)
    d1[0, 0] = 3.0
    d2[2, 1] = 3.0  # orthogonal task vectors of equal norm
    out = merge_tensors("nuslerp", [base + d1, base + d2], base=base, weights=[2.0, 1.0])  # t = 1/3
    expected = base + math.cos(math.pi / 6) * d1 + math.sin(math.pi / 6) * d2
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


def test_nuslerp_without_flattening_interpolates_each_row_on_its_own():
    # Row 0: orthogonal; row 1: collinear (lerp); row 2: opposite (exactly antipodal, lerp).
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]], dtype=F64)
    b = torch.tensor([[0.0, 1.0], [3.0, 3.0], [-2.0, 0.0]], dtype=F64)
    out = merge_tensors("nuslerp", [a, b], weights=[1.0, 1.0], nuslerp_flatten=False)
    s = math.sqrt(0.5)
    expected = torch.tensor([[s, s], [2.0, 2.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)


def test_nuslerp_row_wise_interpolates_the_vectors_along_the_first_axis():
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]], dtype=F64)
    b = torch.tensor([[0.0, 3.0], [1.0, 3.0], [0.0, 0.0]], dtype=F64)
    out = merge_tensors("nuslerp", [a, b], nuslerp_flatten=False, nuslerp_row_wise=True)
    s = math.sqrt(0.5)
    expected = torch.tensor([[s, 2.0], [s, 2.0], [0.0, 0.0]], dtype=F64)  # column 0 slerp, column 1 lerp
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)


def test_nuslerp_row_wise_on_3d_tensors_takes_vectors_along_axis_0():
    a, b = _randn(4, 2, 3, seed=1), _randn(4, 2, 3, seed=2)
    out = merge_tensors("nuslerp", [a, b], weights=[1.0, 4.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    for j in range(2):
        for k in range(3):
            expected = merge_tensors("nuslerp", [a[:, j, k], b[:, j, k]], weights=[1.0, 4.0])
            torch.testing.assert_close(out[:, j, k], expected, rtol=1e-13, atol=1e-13)


def test_nuslerp_1d_is_one_vector_in_every_mode():
    a, b = _randn(9, seed=1), _randn(9, seed=2)
    ref = merge_tensors("nuslerp", [a, b], weights=[2.0, 1.0])
    for row_wise in (False, True):
        out = merge_tensors("nuslerp", [a, b], weights=[2.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=row_wise)
        torch.testing.assert_close(out, ref, rtol=1e-15, atol=1e-15)


def test_nuslerp_with_an_untouched_parameter_interpolates_linearly():
    # Deviation from mergekit, which gives base + sin(tπ/2)·δ2 when δ1 = 0.
    base, model = _randn(6, seed=1), _randn(6, seed=2)
    out = merge_tensors("nuslerp", [base.clone(), model], base=base, weights=[3.0, 1.0])
    torch.testing.assert_close(out, base + 0.25 * (model - base), rtol=1e-14, atol=1e-14)
