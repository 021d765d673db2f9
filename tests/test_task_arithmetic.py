"""Task-arithmetic family (task_arithmetic, ties, dare_*, della*, breadcrumbs*) and its trim steps,
against hand-computed examples, closed forms and mergekit 0.1.5 semantics."""
from __future__ import annotations

import pytest
import torch

from karcher_lab import get_method, merge_tensors
from karcher_lab.errors import MissingBaseError, ParameterError
from karcher_lab.methods.sparsify import (
    breadcrumbs_prune,
    dare_drop,
    della_keep_probabilities,
    della_magprune,
    magnitude_prune,
    masked_delta,
)

FAMILY = [
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties",
]
RANDOMIZED = ["dare_linear", "dare_ties", "della", "della_linear"]


def _random_models(n: int, shape: tuple[int, ...], seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- registry: names and defaults


@pytest.mark.parametrize(
    "method, normalize, rescale, extra",
    [
        ("task_arithmetic", False, False, set()),
        ("ties", True, False, set()),
        ("dare_linear", False, True, set()),
        ("dare_ties", False, True, set()),
        ("della", True, True, {"epsilon"}),
        ("della_linear", False, True, {"epsilon"}),
        ("breadcrumbs", False, False, {"gamma"}),
        ("breadcrumbs_ties", False, False, {"gamma"}),
    ],
)
def test_parameters_and_defaults_are_mergekits(method, normalize, rescale, extra):
    m = get_method(method)
    assert {p.name for p in m.params} == {"int8_mask", "normalize", "rescale", "lambda", "density"} | extra
    assert m.param("normalize").default is normalize
    assert m.param("rescale").default is rescale
    assert m.param("lambda").default == 1.0
    assert m.param("int8_mask").default is False
    assert m.param("density").default == 1.0 and m.param("density").per_model
    if "gamma" in extra:
        assert m.param("gamma").default == 0.01 and m.param("gamma").per_model
    if "epsilon" in extra:
        assert m.param("epsilon").default == 0.15 and m.param("epsilon").per_model
    assert m.base == "required" and m.weights == "any"
    assert m.randomized is (method in RANDOMIZED)


# ---------------------------------------------------------------- task arithmetic


def test_task_arithmetic_closed_form_with_negative_weights():
    base, models = _random_models(3, (5, 4))
    w = [0.5, 1.0, -0.3]
    deltas = [m - base for m in models]
    out = merge_tensors("task_arithmetic", models, base=base, weights=w, **{"lambda": 1.7})
    expected = base + 1.7 * sum(wi * d for wi, d in zip(w, deltas))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    normalized = merge_tensors("task_arithmetic", models, base=base, weights=w, normalize=True)
    expected_mean = base + sum(wi * d for wi, d in zip(w, deltas)) / sum(w)
    torch.testing.assert_close(normalized, expected_mean, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_normalize_skips_a_vanishing_weight_sum():
    base, models = _random_models(2, (6,))
    out = merge_tensors("task_arithmetic", models, base=base, weights=[1.0, -1.0], normalize=True)
    torch.testing.assert_close(out, models[0] - models[1] + base, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_ignores_density_and_rescale_like_mergekit():
    base, models = _random_models(2, (4, 3))
    plain = merge_tensors("task_arithmetic", models, base=base)
    assert torch.equal(merge_tensors("task_arithmetic", models, base=base, density=0.2, rescale=True), plain)


def test_family_needs_a_base():
    _, models = _random_models(2, (3,))
    with pytest.raises(MissingBaseError):
        merge_tensors("ties", models)


# ---------------------------------------------------------------- TIES

# Two models, six entries, density 0.5 (k = 3). Trim by |δ|:
#   δ1 = [ 3, -1, .5, -2,  1.5, .1] -> [3, 0, 0, -2,  1.5, 0]
#   δ2 = [-1,  2, .2, -4, -2.5, .3] -> [0, 2, 0, -4, -2.5, 0]
_D1 = [3.0, -1.0, 0.5, -2.0, 1.5, 0.1]
_D2 = [-1.0, 2.0, 0.2, -4.0, -2.5, 0.3]


def _ties(weights, **params):
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    models = [base + torch.tensor(d, dtype=torch.float64) for d in (_D1, _D2)]
    return merge_tensors("ties", models, base=base, weights=weights, density=0.5, **params) - base


def test_ties_hand_example():
    # w = [1, 2]: x1 = [3,0,0,-2,1.5,0], x2 = [0,4,0,-8,-5,0]; Σx = [3,4,0,-10,-3.5,0] -> s = [+,+,+,-,-,+]
    # m1 = [1,0,0,1,0,0], m2 = [0,1,0,1,1,0]; Δ = [3,4,0,-10,-5,0]; D = [1,2,0->1,3,2,0->1]
    expected_sum = torch.tensor([3.0, 4.0, 0.0, -10.0, -5.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(_ties([1.0, 2.0], normalize=False), expected_sum, rtol=0, atol=1e-12)
    expected_mean = torch.tensor([3.0, 2.0, 0.0, -10.0 / 3.0, -2.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(_ties([1.0, 2.0]), expected_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(_ties([1.0, 2.0], **{"lambda": 0.5}), 0.5 * expected_mean, rtol=0, atol=1e-12)


def test_ties_negative_weight_elects_on_signed_products():
    # w = [1, -1]: x2 = [0,-2,0,4,2.5,0]; Σx = [3,-2,0,2,4,0] -> s = [+,-,+,+,+,+]
    # m1 = [1,0,0,0,1,0], m2 = [0,1,0,1,1,0]; Δ = [3,-2,0,4,4,0]; D = Σ wi mi = [1,-1,0->1,-1,0->1,0->1]
    expected = torch.tensor([3.0, 2.0, 0.0, -4.0, 4.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(_ties([1.0, -1.0]), expected, rtol=0, atol=1e-12)


def test_ties_zero_sum_elects_plus():
    base = torch.zeros(2, dtype=torch.float64)
    models = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([-1.0, -2.0], dtype=torch.float64)]
    assert torch.equal(merge_tensors("ties", models, base=base), models[0])


def test_normalized_ties_is_invariant_to_a_common_weight_scale():
    # mergekit replaces only an exactly-zero divisor, so tiny weights still normalize
    torch.testing.assert_close(_ties([1e-9, 2e-9]), _ties([1.0, 2.0]), rtol=1e-12, atol=1e-12)


def test_int8_mask_does_not_change_the_result():
    assert torch.equal(_ties([1.0, 2.0], int8_mask=True), _ties([1.0, 2.0]))


def test_magnitude_prune_top_k_and_edge_densities():
    d = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1])
    assert torch.equal(magnitude_prune(d, 0.4), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0]))
    assert torch.equal(magnitude_prune(d, 0.01), torch.tensor([0.0, -3.0, 0.0, 0.0, 0.0]))  # keeps ≥ 1
    assert torch.equal(magnitude_prune(d, 0.0), torch.zeros(5))
    assert torch.equal(magnitude_prune(d, 1.0), d)
    tied = torch.tensor([1.0, -1.0, 1.0, 0.5])
    assert torch.equal(magnitude_prune(tied, 0.5), torch.tensor([1.0, -1.0, 0.0, 0.0]))  # lower index first


# ---------------------------------------------------------------- L1 rescale


def test_l1_rescale_preserves_the_l1_norm():
    d = torch.tensor([[0.5, -3.0, 1.0], [2.0, -0.1, 0.25]], dtype=torch.float64)
    for trimmed in (
        magnitude_prune(d, 0.5, rescale=True),
        breadcrumbs_prune(d, 0.5, 0.2, rescale=True),
        dare_drop(d, 0.5, rescale=True, generator=_generator(1)),
        della_magprune(d, 0.5, 0.2, rescale=True, generator=_generator(1)),
    ):
        assert trimmed.count_nonzero() < d.numel()
        torch.testing.assert_close(trimmed.abs().sum(), d.abs().sum(), rtol=1e-14, atol=0)
        kept = trimmed != 0
        ratio = trimmed[kept] / d[kept]
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(d.abs().sum() / d[kept].abs().sum())))


def test_l1_rescale_is_skipped_for_tiny_norms():
    d = torch.tensor([4e-8, 5e-8, 0.0])
    keep = torch.tensor([1.0, 0.0, 0.0])
    assert torch.equal(masked_delta(d, keep, rescale=True), torch.tensor([4e-8, 0.0, 0.0]))


# ---------------------------------------------------------------- DARE


def test_dare_density_one_is_task_arithmetic_and_ties():
    base, models = _random_models(3, (6, 5))
    w = [0.6, 1.0, -0.4]
    assert torch.equal(
        merge_tensors("dare_linear", models, base=base, weights=w, seed=3),
        merge_tensors("task_arithmetic", models, base=base, weights=w),
    )
    assert torch.equal(
        merge_tensors("dare_ties", models, base=base, weights=w, seed=3),
        merge_tensors("ties", models, base=base, weights=w, normalize=False),
    )


def test_dare_linear_single_model_is_a_rescaled_bernoulli_mask():
    base, (model,) = _random_models(1, (200, 100))
    delta = model - base
    out = merge_tensors("dare_linear", [model], base=base, weights=[0.7], density=0.3, seed=5) - base
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.02  # 20000 draws: std 0.0032
    factor = float(delta.abs().sum() / delta[kept].abs().sum())
    torch.testing.assert_close(out[kept], 0.7 * factor * delta[kept], rtol=1e-12, atol=0)
    assert 3.0 < factor < 3.7  # ≈ 1/ρ for i.i.d. entries, but an L1 match, not 1/ρ exactly
    no_rescale = merge_tensors("dare_linear", [model], base=base, weights=[0.7], density=0.3, seed=5, rescale=False)
    torch.testing.assert_close(no_rescale - base, 0.7 * delta * kept, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- DELLA


def test_della_probabilities_are_linear_in_the_row_rank():
    d = torch.tensor([[0.3, -0.1, 0.5, 0.2], [-4.0, 3.0, 2.0, 1.0]])
    p = della_keep_probabilities(d, 0.5, 0.2)
    relative_rank = torch.tensor([[2 / 3, 0.0, 1.0, 1 / 3], [1.0, 2 / 3, 1 / 3, 0.0]])
    torch.testing.assert_close(p, 0.3 + 0.4 * relative_rank)
    torch.testing.assert_close(p.mean(dim=1), torch.full((2,), 0.5))
    one_d = della_keep_probabilities(torch.tensor([0.3, -0.1, 0.5, 0.2]), 0.5, 0.2)
    torch.testing.assert_close(one_d, p[:1])
    single_entry_rows = della_keep_probabilities(torch.tensor([[2.0], [-1.0]]), 0.4, 0.1)
    torch.testing.assert_close(single_entry_rows, torch.full((2, 1), 0.4))


def test_della_single_entry_rows_merge_where_mergekit_fails():
    base, models = _random_models(2, (4, 1), dtype=torch.float32)
    out = merge_tensors("della", models, base=base, density=0.5, epsilon=0.1, seed=0)
    assert torch.isfinite(out).all()


def test_della_keeps_large_magnitudes_more_often():
    g = _generator(0)
    d = torch.randn(200, 100, generator=g, dtype=torch.float64)
    kept = della_magprune(d, 0.5, 0.3, rescale=False, generator=_generator(2)) != 0
    rank = d.abs().argsort(dim=1).argsort(dim=1)
    top, bottom = kept[rank >= 90].double().mean().item(), kept[rank < 10].double().mean().item()
    assert abs(kept.double().mean().item() - 0.5) < 0.02
    # keep rate over ranks 90..99: ρ − ε + 2ε·mean(r/99) = 0.2 + 0.6·94.5/99 ≈ 0.773; ranks 0..9: ≈ 0.227
    assert abs(top - (0.2 + 0.6 * 94.5 / 99)) < 0.04
    assert abs(bottom - (0.2 + 0.6 * 4.5 / 99)) < 0.04


def test_della_density_one_is_ties_and_task_arithmetic():
    base, models = _random_models(3, (6, 5))
    w = [0.6, 1.0, 0.4]
    assert torch.equal(
        merge_tensors("della", models, base=base, weights=w), merge_tensors("ties", models, base=base, weights=w)
    )
    assert torch.equal(
        merge_tensors("della_linear", models, base=base, weights=w),
        merge_tensors("task_arithmetic", models, base=base, weights=w),
    )


@pytest.mark.parametrize("density, epsilon", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
def test_della_rejects_density_epsilon_outside_the_unit_interval(density, epsilon):
    base, models = _random_models(2, (3, 4))
    with pytest.raises(ParameterError, match="model 1"):
        merge_tensors("della", models, base=base, density=[0.5, density], epsilon=[0.15, epsilon])


def test_della_accepts_density_one_and_zero_with_any_epsilon():
    base, models = _random_models(2, (3, 4))
    out = merge_tensors("della_linear", models, base=base, density=[1.0, 0.0], epsilon=0.15)
    torch.testing.assert_close(out, models[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- breadcrumbs

# Outputs checked against mergekit 0.1.5 (sparsify.magnitude_outliers) on the same δ.
_CRUMBS = [0.5, -3.0, 1.0, 2.0, -0.1, 4.0, 0.2, -0.3, 0.7, 1.5]


@pytest.mark.parametrize(
    "density, gamma, expected",
    [
        # int(γn) = 0: no outlier dropped, the 5 largest kept (not the whole delta zeroed)
        (0.5, 0.01, [0.0, -3.0, 1.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.0, 1.5]),
        # drop the largest (4.0), keep the next 5, drop the 4 smallest
        (0.5, 0.1, [0.0, -3.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.7, 1.5]),
        # int(γn) = 3 but only n − int(ρn) = 1 may go: drop just the largest
        (0.9, 0.3, [0.5, -3.0, 1.0, 2.0, -0.1, 0.0, 0.2, -0.3, 0.7, 1.5]),
        (1.0, 0.3, _CRUMBS),
    ],
)
def test_breadcrumbs_hand_examples(density, gamma, expected):
    base = torch.zeros(10, dtype=torch.float64)
    model = torch.tensor(_CRUMBS, dtype=torch.float64)
    out = merge_tensors("breadcrumbs", [model], base=base, density=density, gamma=gamma)
    assert torch.equal(out, torch.tensor(expected, dtype=torch.float64))


def test_breadcrumbs_small_density_can_keep_nothing():
    assert torch.equal(breadcrumbs_prune(torch.tensor(_CRUMBS), 0.05, 0.0), torch.zeros(10))


def test_breadcrumbs_ties_density_one_is_unnormalized_ties():
    base, models = _random_models(3, (6, 5))
    assert torch.equal(
        merge_tensors("breadcrumbs_ties", models, base=base, gamma=0.2),
        merge_tensors("ties", models, base=base, normalize=False),
    )


# ---------------------------------------------------------------- randomness and bad parameters


@pytest.mark.parametrize("method", RANDOMIZED)
def test_same_seed_same_bits_other_seed_other_mask(method):
    base, models = _random_models(3, (12, 10), dtype=torch.float32)
    kw = dict(base=base, weights=[0.5, 1.0, 0.7], density=0.5)
    a = merge_tensors(method, models, seed=123, **kw)
    assert torch.equal(a, merge_tensors(method, models, seed=123, **kw))
    assert not torch.equal(a, merge_tensors(method, models, seed=124, **kw))


@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize(
    "params",
    [{"density": 1.5}, {"density": -0.1}, {"density": [0.5]}, {"lambda": "big"}, {"normalize": "maybe"}, {"beta": 1}],
)
def test_bad_parameters_raise_parameter_error(method, params):
    base, models = _random_models(2, (3,))
    with pytest.raises(ParameterError):
        merge_tensors(method, models, base=base, **params)


@pytest.mark.parametrize("method, params", [
    ("breadcrumbs", {"gamma": 1.5}), ("breadcrumbs_ties", {"gamma": -0.01}),
    ("della", {"epsilon": -0.1}), ("della_linear", {"epsilon": 1.2}),
])
def test_bad_gamma_and_epsilon_raise_parameter_error(method, params):
    base, models = _random_models(2, (3,))
    with pytest.raises(ParameterError):
        merge_tensors(method, models, base=base, **params)
