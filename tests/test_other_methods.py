"""multislerp, model_stock, arcee_fusion, nearswap and fisher against closed forms and hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from karcher_lab import errors, merge_tensors
from karcher_lab.methods import arcee_fusion, get_method

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _unit(angle):
    return torch.tensor([math.cos(angle), math.sin(angle)], dtype=F64)


def test_contracts_match_mergekit():
    expected = {  # (base, weights, min_models, max_models, randomized)
        "multislerp": ("optional", "nonnegative", 1, None, False),
        "model_stock": ("required", "unused", 2, None, False),
        "arcee_fusion": ("required", "unused", 1, 1, True),
        "nearswap": ("required", "unused", 1, 1, False),
        "fisher": ("unused", "nonnegative", 1, None, False),
    }
    for name, contract in expected.items():
        m = get_method(name)
        assert (m.base, m.weights, m.min_models, m.max_models, m.randomized) == contract, name
    assert get_method("multislerp").param("normalize_weights").default is True
    assert get_method("multislerp").param("eps").default == 1e-8
    assert get_method("model_stock").param("filter_wise").default is False


# ---- multislerp -------------------------------------------------------------------------------------

def test_multislerp_of_two_equal_norm_tensors_with_equal_weights_is_the_slerp_midpoint():
    a, b = _randn(6, 5, seed=1), _randn(6, 5, seed=2)
    b = b * (a.norm() / b.norm())
    torch.testing.assert_close(merge_tensors("multislerp", [a, b]), merge_tensors("slerp", [a, b], t=0.5),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.2, 0.7])
def test_multislerp_of_two_is_the_normalized_chord_not_slerp(t):
    # The normalized weighted chord has angle atan2(t, 1 − t) from a, slerp has tπ/2.
    a, b = _unit(0.0), _unit(math.pi / 2)
    out = merge_tensors("multislerp", [a, b], weights=[1 - t, t])
    torch.testing.assert_close(out, _unit(math.atan2(t, 1 - t)), rtol=1e-14, atol=1e-14)
    assert (out - merge_tensors("slerp", [a, b], t=t)).abs().max() > 1e-3


def test_multislerp_direction_is_the_weighted_circular_mean_and_norm_the_weighted_mean_norm():
    angles, norms, w = [0.1, 0.9, 2.0], [1.0, 2.0, 4.0], [0.5, 0.3, 0.2]
    xs = [r * _unit(phi) for r, phi in zip(norms, angles)]
    out = merge_tensors("multislerp", xs, weights=w, eps=1e-300)
    mean_angle = math.atan2(sum(wi * math.sin(p) for wi, p in zip(w, angles)),
                            sum(wi * math.cos(p) for wi, p in zip(w, angles)))
    mean_norm = sum(wi * r for wi, r in zip(w, norms))
    torch.testing.assert_close(out, mean_norm * _unit(mean_angle), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(merge_tensors("multislerp", xs, weights=w), out, rtol=1e-7, atol=0)  # eps = 1e-8
    # normalize_weights: false keeps the direction and scales the norm by Σ wi
    raw = merge_tensors("multislerp", xs, weights=[2 * wi for wi in w], normalize_weights=False, eps=1e-300)
    torch.testing.assert_close(raw, 2 * out, rtol=1e-14, atol=1e-14)


def test_multislerp_with_a_base_works_on_task_vectors():
    base = _randn(3, 4, seed=0)
    d = [_randn(3, 4, seed=i) for i in (1, 2, 3)]
    out = merge_tensors("multislerp", [base + di for di in d], base=base)
    no_base = merge_tensors("multislerp", d)
    torch.testing.assert_close(out, base + no_base, rtol=1e-13, atol=1e-13)


def test_multislerp_single_model_is_returned_unchanged():
    x = _randn(4, seed=3)
    assert torch.equal(merge_tensors("multislerp", [x], base=_randn(4, seed=4), weights=[3.0]), x)


def test_multislerp_cancelling_directions():
    a = _unit(0.3)
    # two models: mergekit's linear fallback Σ wi xi
    torch.testing.assert_close(merge_tensors("multislerp", [a, -2 * a]), -0.5 * a, rtol=1e-15, atol=1e-15)
    # three at 120°: no mean direction
    xs = [_unit(k * 2 * math.pi / 3) for k in range(3)]
    with pytest.raises(errors.AntipodalError, match="'w.q'.*cancel"):
        merge_tensors("multislerp", xs, name="w.q")


def test_multislerp_float32_cancellation_is_detected_despite_rounding():
    # Deviation: float32 rounding leaves ‖Σ wi ui‖ ≈ 3e-8 > eps here; mergekit normalizes that noise.
    a = _randn(64, seed=2).float() * 0.03
    u = a / (a.norm() + 1e-8)
    assert (0.5 * u - 0.5 * (2 * a) / ((2 * a).norm() + 1e-8)).norm() > 1e-8  # mergekit's test would miss it
    torch.testing.assert_close(merge_tensors("multislerp", [a, -2 * a]), -0.5 * a, rtol=1e-6, atol=1e-9)


def test_multislerp_all_zero_task_vectors_give_the_base():
    # Deviation: mergekit raises for N ≥ 3 here (a parameter no fine-tune changed).
    base = _randn(5, seed=1)
    out = merge_tensors("multislerp", [base.clone() for _ in range(3)], base=base)
    torch.testing.assert_close(out, base, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_multislerp_eps_must_be_positive(eps):
    # eps = 0 would turn a zero input into NaN (x/‖x‖ = 0/0)
    with pytest.raises(errors.ParameterError, match="'eps' must be > 0"):
        merge_tensors("multislerp", [_randn(3), torch.zeros(3, dtype=F64)], eps=eps)


# ---- model_stock ------------------------------------------------------------------------------------

def _deltas_with_pairwise_cosine(n, c, dim=8, scale=1.0):
    """n unit task vectors with every pairwise cosine equal to c ≥ 0: √c·s + √(1 − c)·e_i."""
    eye = torch.eye(dim, dtype=F64)
    return [scale * (math.sqrt(c) * eye[0] + math.sqrt(1 - c) * eye[i + 1]) for i in range(n)]


@pytest.mark.parametrize("n,c", [(2, 0.5), (3, 0.5), (5, 0.2), (3, 1.0), (4, 0.0)])
def test_model_stock_ratio_from_known_cosines(n, c):
    base = _randn(8, seed=0)
    deltas = _deltas_with_pairwise_cosine(n, c, scale=0.3)
    out = merge_tensors("model_stock", [base + d for d in deltas], base=base)
    t = n * c / (1 + (n - 1) * c)
    torch.testing.assert_close(out, base + t * sum(deltas) / n, rtol=1e-13, atol=1e-13)


def test_model_stock_disagreeing_models_keep_the_base():
    # Deviation: mergekit gives t = N c/(1 + (N − 1) c) = −2 here (checked), extrapolating away.
    base = _randn(2, seed=0)
    out = merge_tensors("model_stock", [base + _unit(0.0), base + _unit(2 * math.pi / 3)], base=base)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-15)


def test_model_stock_filter_wise_gives_each_row_its_own_ratio():
    base = _randn(2, 8, seed=1)
    d_row0 = _deltas_with_pairwise_cosine(3, 0.5)  # t = 0.75
    d_row1 = [torch.full((8,), 0.1, dtype=F64)] * 3  # identical: c = 1, t = 1
    deltas = [torch.stack([r0, r1]) for r0, r1 in zip(d_row0, d_row1)]
    models = [base + d for d in deltas]
    out = merge_tensors("model_stock", models, base=base, filter_wise=True)
    mean = sum(deltas) / 3
    torch.testing.assert_close(out[0], base[0] + 0.75 * mean[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out[1], base[1] + mean[1], rtol=1e-13, atol=1e-13)
    whole = merge_tensors("model_stock", models, base=base)  # one cosine for the whole tensor differs
    assert (whole - out).abs().max() > 1e-3


def test_model_stock_filter_wise_on_1d_is_the_whole_tensor():
    base = _randn(8, seed=2)
    models = [base + d for d in _deltas_with_pairwise_cosine(3, 0.3)]
    torch.testing.assert_close(merge_tensors("model_stock", models, base=base, filter_wise=True),
                               merge_tensors("model_stock", models, base=base), rtol=0, atol=0)


def test_model_stock_needs_a_base_and_two_models():
    with pytest.raises(errors.MissingBaseError):
        merge_tensors("model_stock", [_randn(3), _randn(3, seed=1)])
    with pytest.raises(errors.ModelCountError, match="at least 2"):
        merge_tensors("model_stock", [_randn(3)], base=_randn(3, seed=1))


# ---- arcee_fusion -----------------------------------------------------------------------------------

def test_arcee_fusion_takes_only_outlier_changes_of_a_1d_tensor():
    # 1-D: one softmax distribution, so I = KL·|δ| and the rule is |δ| ≥ Q2 + 1.5 IQR of |δ|.
    # |δ| = 0.01 … 1.00 and two outliers: n = 102, lower quartiles at sorted indices 25, 50, 75,
    # i.e. 0.26, 0.51, 0.76, so τ = 0.51 + 1.5·0.50 = 1.26 and only the outliers pass.
    small = torch.arange(1, 101, dtype=F64) / 100
    signs = torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0).to(F64)
    delta = torch.cat([small * signs, torch.tensor([5.0, -6.0], dtype=F64)])
    base = _randn(102, seed=0)
    model = base + delta
    out = merge_tensors("arcee_fusion", [model], base=base)
    expected = base.clone()
    expected[100:] = model[100:]
    assert torch.equal(out, expected)


def test_arcee_fusion_importance_is_abs_change_times_the_row_kl():
    base, model = _randn(3, 7, seed=1), _randn(3, 7, seed=2)
    p = torch.softmax(model, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    kl = [float((p[r] * (p[r] / q[r]).log()).sum()) for r in range(3)]
    importance = arcee_fusion.fusion_importance(model, base)
    for r in range(3):
        torch.testing.assert_close(importance[r], (model[r] - base[r]).abs() * kl[r], rtol=1e-12, atol=0)


def test_arcee_fusion_takes_a_sparse_change_whole():
    # More than three quarters of I is zero, so Q1 = Q2 = Q3 = 0, τ = 0 and I ≥ τ everywhere.
    base = _randn(5, 8, seed=3)
    delta = torch.zeros(5, 8, dtype=F64)
    delta[torch.arange(5), torch.tensor([0, 3, 5, 6, 7])] = torch.tensor([0.01, -2.0, 0.5, 3.0, -0.2], dtype=F64)
    assert torch.equal(merge_tensors("arcee_fusion", [base + delta], base=base), base + delta)


def test_arcee_fusion_sampled_quantiles_are_seeded(monkeypatch):
    monkeypatch.setattr(arcee_fusion, "QUANTILE_SAMPLE_SIZE", 500)
    base, model = _randn(40, 100, seed=4), _randn(40, 100, seed=5)
    runs = {seed: merge_tensors("arcee_fusion", [model], base=base, seed=seed) for seed in (1, 2)}
    assert torch.equal(runs[1], merge_tensors("arcee_fusion", [model], base=base, seed=1))
    assert not torch.equal(runs[1], runs[2])  # a different sample moves the threshold
    monkeypatch.setattr(arcee_fusion, "QUANTILE_SAMPLE_SIZE", 10**6)
    exact = merge_tensors("arcee_fusion", [model], base=base, seed=1)
    assert torch.equal(exact, merge_tensors("arcee_fusion", [model], base=base, seed=2))
    for out in runs.values():  # the sampled threshold is close to the exact one
        assert (out != exact).double().mean().item() < 0.02


# ---- nearswap ---------------------------------------------------------------------------------------

def test_nearswap_by_hand():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64)
    model = torch.tensor([0.05, -0.2, 1.0, 1.0], dtype=F64)
    # w = clamp(0.1/|Δ|, 0, 1) = [1, 0.5, 0.1, 1 (Δ = 0, floored at 1e-6)]
    out = merge_tensors("nearswap", [model], base=base, t=0.1)
    torch.testing.assert_close(out, torch.tensor([0.05, -0.1, 0.1, 1.0], dtype=F64), rtol=1e-15, atol=1e-15)
    assert torch.equal(merge_tensors("nearswap", [model], base=base, t=0.0), base)


def test_nearswap_t_is_required_and_non_negative():
    x, b = _randn(3, seed=1), _randn(3, seed=2)
    with pytest.raises(errors.ParameterError, match="'t' is required"):
        merge_tensors("nearswap", [x], base=b)
    with pytest.raises(errors.ParameterError, match="'t' must be >= 0"):
        merge_tensors("nearswap", [x], base=b, t=-0.1)


# ---- fisher -----------------------------------------------------------------------------------------

def test_fisher_with_equal_fishers_is_the_weighted_mean():
    xs = [_randn(3, 4, seed=i) for i in range(3)]
    f = torch.rand(3, 4, generator=torch.Generator().manual_seed(9), dtype=F64) + 0.1
    out = merge_tensors("fisher", xs, weights=[3.0, 1.0, 1.0], fisher=[f, f, f])
    torch.testing.assert_close(out, (3 * xs[0] + xs[1] + xs[2]) / 5, rtol=1e-14, atol=1e-14)


def test_fisher_weights_each_entry_by_its_information():
    xs = [torch.tensor([1.0, 1.0, 1.0], dtype=F64), torch.tensor([3.0, 3.0, 3.0], dtype=F64)]
    fishers = [torch.tensor([1.0, 3.0, 0.0], dtype=F64), torch.tensor([1.0, 1.0, 2.0], dtype=F64)]
    out = merge_tensors("fisher", xs, fisher=fishers)
    # entry 2: F1 is floored at 1e-6, so θ ≈ θ2
    expected = torch.tensor([2.0, (3 * 1 + 1 * 3) / 4, (1e-6 * 1 + 2 * 3) / (2 + 1e-6)], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)
    # where every Fisher vanishes, the floor gives the plain mean
    zero = torch.zeros(3, dtype=F64)
    torch.testing.assert_close(merge_tensors("fisher", xs, fisher=[zero, zero]), torch.full((3,), 2.0, dtype=F64))


def test_fisher_accepts_low_precision_fishers():
    xs = [torch.ones(4), 3 * torch.ones(4)]
    fishers = [torch.full((4,), 3.0, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)]
    torch.testing.assert_close(merge_tensors("fisher", xs, fisher=fishers), torch.full((4,), 1.5))


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (torch.ones(3, 5), errors.ShapeMismatchError, r"Fisher of model 1 has shape \(3, 5\)"),
        (torch.full((3, 4), float("nan")), errors.NonFiniteError, "Fisher of model 1.*NaN"),
        (-torch.ones(3, 4), errors.ParameterError, "Fisher of model 1 has 12 negative"),
        ([[1.0]], errors.ParameterError, "Fisher of model 1 is a list"),
    ],
)
def test_fisher_rejects_bad_fishers(bad, error, match):
    xs = [_randn(3, 4, seed=i) for i in range(2)]
    with pytest.raises(error, match=match):
        merge_tensors("fisher", xs, fisher=[torch.ones(3, 4), bad], name="mlp.w")


def test_fisher_needs_fishers_and_a_positive_floor():
    xs = [_randn(2, seed=i) for i in range(2)]
    with pytest.raises(errors.ParameterError, match="'fisher' is required"):
        merge_tensors("fisher", xs)
    with pytest.raises(errors.ParameterError, match="fisher_floor"):
        merge_tensors("fisher", xs, fisher=[torch.ones(2), torch.ones(2)], fisher_floor=0.0)


def test_passthrough_returns_the_tensor_times_its_scale():
    x = torch.randn(3, 4)
    assert torch.equal(merge_tensors("passthrough", [x]), x)
    torch.testing.assert_close(merge_tensors("passthrough", [x], scale=0.5), 0.5 * x, rtol=0, atol=0)
    assert torch.equal(merge_tensors("passthrough", [x.double()], scale=[2.0]), 2.0 * x.double())
    with pytest.raises(errors.ModelCountError, match="passthrough merges exactly 1 models, got 2"):
        merge_tensors("passthrough", [x, x])
