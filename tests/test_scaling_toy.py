"""The GeoMerge §4 toy in closed form, checked against independent computations: the geodesic ODE of the
metric, autograd Fisher information, numerical curve lengths and Fréchet objectives."""
import math

import pytest
import torch

from karcher_lab.errors import InputError, ParameterError, WeightError
from karcher_lab.teaching import scaling_toy as toy

THETA = torch.tensor([1.3, -0.7], dtype=torch.float64)
KAPPA = torch.tensor([-0.4, 2.1], dtype=torch.float64)  # same sign of predictor as THETA (both < 0)


def test_gauge_keeps_predictor_and_is_an_isometry():
    gen = torch.Generator().manual_seed(0)
    eta, zeta = torch.randn(2, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64)
    for a in (0.3, -2.0, 5.0):
        moved = toy.gauge(THETA, a)
        assert torch.allclose(toy.predictor(moved), toy.predictor(THETA), rtol=1e-15, atol=0)
        push = lambda v: torch.stack([a * v[0], v[1] / a])  # differential of the action
        assert torch.allclose(toy.metric(moved, push(eta), push(zeta)), toy.metric(THETA, eta, zeta), rtol=1e-13)


def test_horizontal_part_is_g_orthogonal_to_the_orbit_and_idempotent():
    eta = torch.tensor([0.9, 0.4], dtype=torch.float64)
    h = toy.horizontal_part(THETA, eta)
    assert abs(float(toy.metric(THETA, h, toy.vertical(THETA)))) < 1e-14
    assert math.isclose(float(h[0] / THETA[0]), float(h[1] / THETA[1]), rel_tol=1e-14)  # eq. 14
    assert torch.allclose(toy.horizontal_part(THETA, h), h, rtol=1e-14)
    # the vertical direction is the velocity of the gauge orbit: d/ds θ·e^s at s = 0
    s = 1e-6
    numeric = (toy.gauge(THETA, math.exp(s)) - toy.gauge(THETA, math.exp(-s))) / (2 * s)
    assert torch.allclose(numeric, toy.vertical(THETA), rtol=1e-9)


def _geodesic_residual(curve, t, h=1e-4):
    """θ'' + Γ(θ', θ') for the metric diag(θ2², θ1²), by central differences."""
    p, q, r = curve(t - h), curve(t), curve(t + h)
    d1, d2 = (r - p) / (2 * h), (r - 2 * q + p) / h**2
    (a, b), (da, db) = q, d1
    accel = torch.stack([-2 * da * db / b + a * db**2 / b**2, -2 * da * db / a + b * da**2 / a**2])
    return d2 - accel


def test_horizontal_geodesic_solves_the_geodesic_equation_and_moves_the_predictor_linearly():
    beta = 0.8
    curve = lambda t: toy.horizontal_geodesic(THETA, beta, t)
    for t in (0.0, 0.5, 2.0):
        assert float(_geodesic_residual(curve, t).abs().max()) < 1e-6
    ts = torch.linspace(0, 3, 7, dtype=torch.float64)
    path = curve(ts)
    assert torch.allclose(toy.predictor(path), toy.predictor(THETA) * (1 + 2 * beta * ts), rtol=1e-14)
    assert torch.allclose(path[:, 0] / path[:, 1], (THETA[0] / THETA[1]).expand(7), rtol=1e-14)
    # a non-horizontal initial velocity does not give this curve: the formula is specific to horizontal motion
    with pytest.raises(ParameterError, match="positive"):
        toy.horizontal_geodesic(THETA, -1.0, 1.0)


def _length(path):
    """Riemannian length of a polyline under eq. 13 (midpoint rule)."""
    mid, step = (path[1:] + path[:-1]) / 2, path[1:] - path[:-1]
    return float(toy.metric(mid, step, step).sqrt().sum())


def test_quotient_distance_is_the_orbit_minimum():
    d = float(toy.quotient_distance(THETA, KAPPA))
    assert math.isclose(d, abs(float(toy.predictor(THETA) - toy.predictor(KAPPA))) / math.sqrt(2), rel_tol=1e-15)
    # attained: the horizontal geodesic from θ to the representative of [κ] with θ's ratio has length d
    target = toy.quotient_mean(KAPPA.unsqueeze(0), reference=THETA)
    beta_end = (float(toy.predictor(KAPPA) / toy.predictor(THETA)) - 1) / 2
    path = toy.horizontal_geodesic(THETA, beta_end, torch.linspace(0, 1, 4001, dtype=torch.float64))
    assert torch.allclose(path[-1], target, rtol=1e-13)
    assert math.isclose(_length(path), d, rel_tol=1e-6)
    # a lower bound: straight segments from θ to other representatives κ·a are never shorter
    tested = 0
    for a in (0.2, -0.2, -0.5, -1.0, -3.0, -1.5):
        segment = THETA + torch.linspace(0, 1, 4001, dtype=torch.float64).unsqueeze(-1) * (toy.gauge(KAPPA, a) - THETA)
        if bool((segment == 0).any()) or bool((segment[:, 0] * segment[:, 1] > 0).any()):
            continue  # leaves the component
        assert _length(segment) >= d * (1 - 1e-9)
        tested += 1
    assert tested == 5
    # gauge-invariant in both arguments
    assert math.isclose(float(toy.quotient_distance(toy.gauge(THETA, -3.0), toy.gauge(KAPPA, 0.1))), d, rel_tol=1e-14)
    with pytest.raises(ParameterError, match="components"):
        toy.quotient_distance(THETA, torch.tensor([1.0, 1.0]))


def test_fisher_information_matches_autograd_gauss_newton():
    xs = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    sigma = 0.7
    jac = torch.autograd.functional.jacobian(lambda th: th[0] * th[1] * xs, THETA.clone())  # [n, 2]
    expected = jac.T @ jac / sigma**2  # Gaussian regression: I = JᵀJ/σ²
    got = toy.fisher_information(THETA, s_xx=float((xs**2).sum()), sigma=sigma)
    assert torch.allclose(got, expected, rtol=1e-14)
    assert abs(float(torch.linalg.det(got))) < 1e-12  # singular along the orbit
    assert float((got @ toy.vertical(THETA)).norm()) < 1e-14


def test_equivalent_representatives_collapse_under_euclidean_and_fisher_averaging_not_quotient():
    pair = torch.stack([THETA, toy.gauge(THETA, -1.0)])  # θ and −θ: the same function
    assert torch.equal(toy.euclidean_mean(pair), torch.zeros(2, dtype=torch.float64))
    assert float(toy.fisher_mean(pair, s_xx=3.0, sigma=0.5).abs().max()) == 0.0
    merged = toy.quotient_mean(pair)
    assert math.isclose(float(toy.predictor(merged)), float(toy.predictor(THETA)), rel_tol=1e-15)


def test_quotient_mean_minimizes_the_frechet_objective_and_ignores_the_gauge():
    thetas = torch.tensor([[1.0, 2.0], [0.5, 0.5], [-3.0, -1.0]], dtype=torch.float64)
    weights = [0.2, 0.5, 0.3]
    mean = toy.quotient_mean(thetas, weights)
    w_star = float(toy.predictor(mean))
    assert math.isclose(w_star, 0.2 * 2 + 0.5 * 0.25 + 0.3 * 3, rel_tol=1e-15)
    assert math.isclose(float(mean[0]), float(mean[1]), rel_tol=1e-15)  # balanced gauge

    def objective(w):
        point = torch.tensor([w, 1.0], dtype=torch.float64)
        return sum(a * float(toy.quotient_distance(point, t)) ** 2 for a, t in zip(weights, thetas))

    grid = [w_star + d for d in (-0.1, -1e-3, 1e-3, 0.1)]
    assert all(objective(w) > objective(w_star) for w in grid)
    regauged = torch.stack([toy.gauge(t, a) for t, a in zip(thetas, (4.0, -0.2, 7.0))])
    assert torch.allclose(toy.quotient_mean(regauged, weights), mean, rtol=1e-14)
    assert not torch.allclose(toy.predictor(toy.euclidean_mean(regauged, weights)),
                              toy.predictor(toy.euclidean_mean(thetas, weights)), rtol=1e-2)
    aligned = toy.quotient_mean(thetas, weights, reference=thetas[0])
    assert math.isclose(float(toy.predictor(aligned)), w_star, rel_tol=1e-14)
    assert math.isclose(float(aligned[0] / aligned[1]), 0.5, rel_tol=1e-14)


def test_bad_input_is_rejected():
    with pytest.raises(InputError, match="zero coordinate"):
        toy.predictor([0.0, 1.0])
    with pytest.raises(InputError, match="last axis"):
        toy.predictor([1.0, 2.0, 3.0])
    with pytest.raises(ParameterError, match="gauge"):
        toy.gauge(THETA, 0.0)
    with pytest.raises(WeightError):
        toy.euclidean_mean(torch.stack([THETA, KAPPA]), [1.0, -1.0])
    with pytest.raises(ParameterError, match="mixed signs"):
        toy.quotient_mean(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
