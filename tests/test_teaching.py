"""karcher_lab.teaching.fisher_rao against closed forms, explicit constructions and the package's own
solvers."""
import math

import pytest
import torch

from karcher_lab.errors import InputError, ParameterError, StepSizeError
from karcher_lab.geometry import simplex, sphere
from karcher_lab.geometry.karcher_mean import karcher_mean
from karcher_lab.teaching import fisher_rao


def test_kl_against_direct_sum_and_fr_matches_sqrt_2kl_locally():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    direct = sum(a * math.log(a / b) for a, b in zip(p.tolist(), q.tolist()))
    assert math.isclose(float(fisher_rao.kl_divergence(p, q)), direct, rel_tol=1e-14)
    table = fisher_rao.fr_versus_kl(p, q, steps=1000)
    assert table["ratio"].iloc[0] == pytest.approx(1.0, abs=2e-3)       # eq. 1: d_FR² ≈ 2 KL near p
    assert abs(table["ratio"].iloc[-1] - 1.0) > 0.02                     # and only locally
    assert math.isclose(table["fisher_rao"].iloc[-1], 2 * math.acos(sum(math.sqrt(a * b) for a, b in zip(p.tolist(), q.tolist()))), rel_tol=1e-12)
    with pytest.raises(InputError):
        fisher_rao.kl_divergence(p, torch.tensor([0.5, 0.6, 0.2]))


def test_mixture_differs_from_fr_karcher_mean_which_is_the_squared_sphere_mean():
    ps = [torch.tensor(v, dtype=torch.float64) for v in ([0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8])]
    mix = fisher_rao.mixture(ps, [1, 2, 1])
    assert torch.allclose(mix, (ps[0] + 2 * ps[1] + ps[2]) / 4, rtol=1e-15)
    fr, _ = simplex.fr_karcher_mean(ps, [1, 2, 1])
    assert float(simplex.fr_distance(mix, fr)) > 0.01
    # the FR mean balances the Fisher–Rao logs: Σ α Log(√p_i) = 0 at √mean
    root = fr.sqrt()
    logs = torch.stack([sphere.log(root, p.sqrt()) for p in ps])
    assert float((torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64) @ logs).norm()) < 1e-8


def test_two_point_chord_gap_against_explicit_vectors():
    thetas = [0.1, 1.0, 2.0, 3.0]
    for alpha in (0.5, 0.2):
        table = fisher_rao.two_point_chord_gap(thetas, alpha)
        for row in table.itertuples():
            x = torch.tensor([1.0, 0.0], dtype=torch.float64)
            y = torch.tensor([math.cos(row.theta), math.sin(row.theta)], dtype=torch.float64)
            chord = (1 - alpha) * x + alpha * y
            slerp = sphere.geodesic(x, y, alpha)
            assert math.isclose(row.chord_norm, float(chord.norm()), rel_tol=1e-13)
            assert math.isclose(abs(row.gap), float(sphere.dist(chord / chord.norm(), slerp)), abs_tol=1e-12)
    gaps = fisher_rao.two_point_chord_gap(thetas, 0.2)["gap"].abs()
    assert list(gaps) == sorted(gaps) and gaps.iloc[-1] > 10 * gaps.iloc[0]   # grows with distance
    assert fisher_rao.two_point_chord_gap(thetas, 0.5)["gap"].abs().max() < 1e-15  # symmetric weights: no gap
    with pytest.raises(ParameterError):
        fisher_rao.two_point_chord_gap([math.pi])


def test_karcher_path_agrees_with_the_coefficient_solver_and_slerp():
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(4, 6, generator=gen, dtype=torch.float64) + 2.0
    weights = [0.1, 0.2, 0.3, 0.4]
    path, residuals = fisher_rao.karcher_path(points, weights, eta=0.5)
    mean, trace = karcher_mean(list(points), weights, eta=0.5, tol=1e-10)
    assert torch.allclose(path[-1], mean, atol=1e-9)
    assert len(residuals) == len(trace.residuals)
    assert torch.allclose(residuals, trace.residuals, rtol=1e-6, atol=1e-12)
    assert float(residuals[-1]) < 1e-10 and len(path) == len(residuals)
    # two points, η = 1, started at the first: one step reaches SLERP at t = α2
    two, res = fisher_rao.karcher_path(points[:2], [0.7, 0.3], init="first", max_iter=1)
    expected = sphere.geodesic(points[0] / points[0].norm(), points[1] / points[1].norm(), 0.3)
    assert torch.allclose(two[1], expected, atol=1e-14)
    with pytest.raises(StepSizeError):
        fisher_rao.karcher_path(points, eta=1.5)


def test_norm_shrinkage_closed_form_and_monte_carlo():
    assert math.isclose(float(fisher_rao.mean_norm_ratio(4, 0.0)), 0.5, rel_tol=1e-15)
    assert math.isclose(float(fisher_rao.mean_norm_ratio(3, 1.0)), 1.0, rel_tol=1e-15)
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    u = (u[:1] * 3 + u) / (u[:1] * 3 + u).norm(dim=-1, keepdim=True)  # correlated directions
    cos = (u @ u.T)[torch.triu_indices(5, 5, 1).unbind()].mean()
    explicit = float(u.mean(0).norm())
    gram_form = math.sqrt(float((u @ u.T).sum()) / 25)
    assert math.isclose(explicit, gram_form, rel_tol=1e-13)
    assert fisher_rao.mean_norm_ratio(5, float(cos)) == pytest.approx(explicit, rel=1e-12)
    table = fisher_rao.random_mean_norm_ratio([2, 16, 4096], n=4, trials=200, seed=0)
    spread = table["std"].tolist()
    assert spread[0] > spread[1] > spread[2]                              # concentration with dimension
    assert table["mean"].iloc[-1] == pytest.approx(0.5, abs=0.01)         # → 1/√N
    with pytest.raises(ParameterError):
        fisher_rao.mean_norm_ratio(3, -0.9)
