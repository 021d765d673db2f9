"""SCE and RAM / RAM+ (tensor-local) against hand-computed examples and mergekit 0.1.5 semantics."""
from __future__ import annotations

import pytest
import torch

from karcher_lab import get_method, merge_tensors
from karcher_lab.errors import MissingBaseError, ParameterError
from karcher_lab.methods.sce import sce_select_mask, sce_weights


def _f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _merge(method: str, deltas, **params) -> torch.Tensor:
    """Merge base + δi for a fixed nonzero base and return the merged task vector."""
    base = torch.linspace(-1.0, 1.0, len(deltas[0]), dtype=torch.float64)
    return merge_tensors(method, [base + _f64(d) for d in deltas], base=base, **params) - base


def test_registry_entries():
    sce = get_method("sce")
    assert {p.name: p.default for p in sce.params} == {"int8_mask": False, "select_topk": 1.0}
    assert sce.weights == "unused" and sce.base == "required" and not sce.randomized
    assert {p.name: p.default for p in get_method("ram").params} == {"epsilon": 1e-5}
    assert {p.name: p.default for p in get_method("ramplus_tl").params} == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    for name in ("ram", "ramplus_tl"):
        assert get_method(name).weights == "unused" and get_method(name).base == "required"


# ---------------------------------------------------------------- SCE

# δ1 = [1, -2, .5, 0], δ2 = [3, 1, -1, 2.5]
_S1 = [1.0, -2.0, 0.5, 0.0]
_S2 = [3.0, 1.0, -1.0, 2.5]


def test_sce_hand_example_without_selection():
    # mean squares 5.25/4 and 17.25/4 -> ŵ = [7/30, 23/30]; Σδ = [4, -1, -.5, 2.5] -> s = [+, -, -, +]
    # m1 = [1, 1, 0, 0], m2 = [1, 0, 1, 1]
    w1, w2 = 7 / 30, 23 / 30
    expected = _f64([(w1 * 1 + w2 * 3) / (w1 + w2), -2.0, -1.0, 2.5])
    torch.testing.assert_close(_merge("sce", [_S1, _S2]), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sce_weights(torch.stack([_f64(_S1), _f64(_S2)])), _f64([w1, w2]))


def test_sce_ignores_user_weights_and_int8_mask():
    plain = _merge("sce", [_S1, _S2])
    assert torch.equal(_merge("sce", [_S1, _S2], weights=[5.0, 0.0], int8_mask=True), plain)


def test_sce_variance_selection_hand_example():
    # Var = ((δ1 − δ2)/2)² = [1, 2.25, .5625, 1.5625]; select_topk = .5 -> k = 2: positions 1 and 3
    # selected: δ1 = [0, -2, 0, 0], δ2 = [0, 1, 0, 2.5]; s = [+, -, +, +]; m1 = [0,1,0,0], m2 = [0,0,0,1]
    torch.testing.assert_close(
        _merge("sce", [_S1, _S2], select_topk=0.5), _f64([0.0, -2.0, 0.0, 2.5]), rtol=1e-12, atol=1e-12
    )
    assert torch.equal(_merge("sce", [_S1, _S2], select_topk=0.0), torch.zeros(4, dtype=torch.float64))


def test_sce_selection_count_is_formed_in_float32_like_mergekit():
    # 100 nonzero variances, τ = 0.29: float32(100)·float32(0.29) rounds to 29.0 (double: 28.999…)
    tvs = torch.stack([torch.arange(1, 101, dtype=torch.float64) * 0.01, torch.zeros(100, dtype=torch.float64)])
    mask = sce_select_mask(tvs, 0.29)
    assert int(mask.sum()) == 29
    assert torch.equal(mask.nonzero().flatten(), torch.arange(71, 100))
    zero_variance = torch.zeros(2, 100, dtype=torch.float64)
    assert int(sce_select_mask(zero_variance, 0.5).sum()) == 0


def test_sce_weights_fall_back_to_uniform_for_tiny_task_vectors():
    tiny = torch.tensor([[1e-4, 0.0], [0.0, 5e-4]], dtype=torch.float64)
    torch.testing.assert_close(sce_weights(tiny), _f64([0.5, 0.5]))


def test_sce_single_model_returns_the_model():
    torch.testing.assert_close(_merge("sce", [_S2]), _f64(_S2), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- RAM

# ε = 1e-5: δ1's last entry (1e-6) is inactive. Counts c = [3, 1, 1, 1, 0].
_R = [
    [1.0, 0.0, 2.0, 0.5, 1e-6],
    [3.0, 1.0, 0.0, 0.0, 0.0],
    [-1.0, 0.0, 0.0, 0.0, 0.0],
]


def test_ram_keeps_unique_and_averages_shared_updates():
    torch.testing.assert_close(_merge("ram", _R), _f64([1.0, 1.0, 2.0, 0.5, 0.0]), rtol=1e-12, atol=1e-12)
    # ε = 1: only |δ| > 1 is active (model 2's 3.0 and model 1's 2.0), each then unique
    torch.testing.assert_close(
        _merge("ram", _R, epsilon=1.0), _f64([3.0, 0.0, 2.0, 0.0, 0.0]), rtol=1e-12, atol=1e-12
    )


def test_ramplus_boosts_unique_updates_by_the_shared_to_unique_ratio():
    # shared/unique active counts: model 1: 1/2, model 2: 1/1, model 3: 1/0 (no unique entries)
    # r = .5, α = .9: λ1 = 1 + .5·.5 = 1.25, λ2 = 1 + .5·.9 = 1.45
    torch.testing.assert_close(
        _merge("ramplus_tl", _R, r=0.5, alpha=0.9), _f64([1.0, 1.45, 2.5, 0.625, 0.0]), rtol=1e-12, atol=1e-12
    )
    # defaults r = .1, α = .2: both ratios clip to .2 -> λ = 1.02
    torch.testing.assert_close(
        _merge("ramplus_tl", _R), _f64([1.0, 1.02, 2.04, 0.51, 0.0]), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(_merge("ramplus_tl", _R, r=0.0), _merge("ram", _R), rtol=0, atol=0)


def test_ramplus_with_zero_epsilon_and_an_unchanged_model_stays_finite():
    # mergekit 0.1.5 computes 0/0 for the unchanged model and returns NaN everywhere;
    # here model 2 has shared/unique = 1/1 -> λ2 = 1 + .1·min(1, .2) = 1.02
    deltas = [[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [1.0, 0.0, 0.0]]
    torch.testing.assert_close(
        _merge("ramplus_tl", deltas, epsilon=0.0), _f64([1.0, 2.04, 0.0]), rtol=1e-12, atol=1e-12
    )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("method, params", [
    ("sce", {"select_topk": 1.5}), ("sce", {"select_topk": -0.1}), ("sce", {"density": 0.5}),
    ("ram", {"epsilon": -1e-3}), ("ramplus_tl", {"r": -0.1}), ("ramplus_tl", {"alpha": -0.2}),
    ("ramplus_tl", {"epsilon": "small"}),
])
def test_bad_parameters_raise_parameter_error(method, params):
    with pytest.raises(ParameterError):
        _merge(method, [_S1, _S2], **params)


@pytest.mark.parametrize("method", ["sce", "ram", "ramplus_tl"])
def test_base_is_required(method):
    with pytest.raises(MissingBaseError):
        merge_tensors(method, [_f64(_S1), _f64(_S2)])
