"""The generic Fréchet-mean solver (karcher_lab.geometry.frechet) against the coefficient-space Karcher mean
and closed forms."""
from __future__ import annotations

import pytest
import torch

from karcher_lab.errors import ConvergenceError, EmptyInputError, ParameterError, StepSizeError, WeightError
from karcher_lab.geometry import spd
from karcher_lab.geometry.frechet import SPHERE, Geometry, frechet_mean
from karcher_lab.geometry.karcher_mean import karcher_mean

F64 = torch.float64


def _unit_points(n, d, seed=0):
    x = torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 1.5  # one open hemisphere
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_sphere_case_matches_the_coefficient_space_karcher_mean(eta):
    xs = _unit_points(5, 64, seed=1)
    w = torch.tensor([3.0, 1.0, 1.0, 2.0, 0.5], dtype=F64)
    chord = (w[:, None] * xs).sum(0)
    mean, trace = frechet_mean(SPHERE, xs, w, chord / chord.norm(), eta=eta, max_iter=500, tol=1e-13)
    expected, ktrace = karcher_mean(list(xs), w, eta=eta, max_iter=500, tol=1e-13)
    assert trace.converged and ktrace.converged
    assert float((mean - expected).abs().max()) < 1e-10
    assert trace.iterations == ktrace.iterations  # same iteration, same start, same stopping rule
    assert bool((trace.objectives[1:] <= trace.objectives[:-1] + 1e-15).all())


def test_euclidean_geometry_gives_the_weighted_average_in_one_step():
    flat = Geometry(exp=lambda m, v: m + v, log=lambda m, xs: xs - m, inner=lambda m, u, v: (u * v).sum(-1))
    xs = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    mean, trace = frechet_mean(flat, xs, w, torch.zeros(6, dtype=F64), tol=1e-12)
    assert torch.allclose(mean, (w[:, None] * xs).sum(0) / w.sum(), atol=1e-14)
    assert trace.iterations == 1 and trace.converged


def _spd_geometry():
    return Geometry(
        exp=spd.exp,
        log=lambda m, xs: spd.log(m.expand_as(xs), xs),
        inner=spd.inner,
        transport=lambda m, n, v: v,  # symmetric matrices are every tangent space
    )


@pytest.mark.parametrize("memory", [0, 5])
def test_spd_mean_of_commuting_matrices_is_the_weighted_geometric_mean(memory):
    lam = torch.rand(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3)) * 10 + 0.1
    xs = torch.diag_embed(lam)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    mean, trace = frechet_mean(_spd_geometry(), xs, w, torch.eye(3, dtype=F64), max_iter=100, tol=1e-12, memory=memory)
    assert trace.converged
    assert torch.allclose(mean, torch.diag((w[:, None] * lam.log()).sum(0).exp()), atol=1e-10)


def test_lbfgs_reaches_the_same_spd_mean_as_gradient_descent():
    a = torch.randn(5, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    xs = a @ a.mT + 0.1 * torch.eye(4, dtype=F64)
    plain, t0 = frechet_mean(_spd_geometry(), xs, None, torch.eye(4, dtype=F64), max_iter=500, tol=1e-11)
    fast, t1 = frechet_mean(_spd_geometry(), xs, None, torch.eye(4, dtype=F64), max_iter=500, tol=1e-11, memory=5)
    assert t0.converged and t1.converged
    assert float(spd.dist(plain, fast)) < 1e-9


def test_lbfgs_treats_trial_points_whose_logs_fail_as_rejected_steps():
    """A log that fails after any step longer than 0.6 (as the Stiefel log fails far away): the line search
    shortens such steps instead of raising, and the mean is still found."""
    last_step = [0.0]

    def exp(m, v):
        last_step[0] = float(v.abs().max())
        return m + v

    def log(m, xs):
        if last_step[0] > 0.6:
            raise ConvergenceError("too far")
        return xs - m

    flat = Geometry(exp=exp, log=log, inner=lambda m, u, v: (u * v).sum(-1), transport=lambda m, n, v: v)
    xs = torch.tensor([[2.0], [4.0]], dtype=F64)
    mean, trace = frechet_mean(flat, xs, None, torch.zeros(1, dtype=F64), tol=1e-12, max_iter=200, memory=3)
    assert trace.converged
    assert float(mean) == pytest.approx(3.0, abs=1e-12)


def test_bad_parameters_are_rejected_before_any_work():
    xs = _unit_points(3, 8)
    with pytest.raises(StepSizeError):
        frechet_mean(SPHERE, xs, None, xs[0], eta=1.5)
    with pytest.raises(ParameterError):
        frechet_mean(SPHERE, xs, None, xs[0], max_iter=-1)
    with pytest.raises(ParameterError, match="transport"):
        frechet_mean(SPHERE, xs, None, xs[0], memory=3)
    with pytest.raises(WeightError):
        frechet_mean(SPHERE, xs, [1.0, -1.0, 1.0], xs[0])
    with pytest.raises(WeightError):
        frechet_mean(SPHERE, xs, [1.0, 1.0], xs[0])
    with pytest.raises(WeightError):
        frechet_mean(SPHERE, xs, [0.0, 0.0, 0.0], xs[0])
    with pytest.raises(EmptyInputError):
        frechet_mean(SPHERE, xs[:0], None, xs[0])
