"""Polar factors, vertical/horizontal spaces, alignment and quotient distance (karcher_lab.geometry.lowrank)."""
from __future__ import annotations

import pytest
import torch

from karcher_lab.errors import ManifoldError, NonFiniteError, ShapeMismatchError
from karcher_lab.geometry import lowrank, spd, stiefel
from karcher_lab.geometry.lowrank import Polar, PolarTangent

F64 = torch.float64



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _factors(d1=9, d2=7, r=3, *batch, seed=0):
    g = _gen(seed)
    return torch.randn(*batch, d1, r, dtype=F64, generator=g), torch.randn(*batch, d2, r, dtype=F64, generator=g)


def _orthogonal(r, *batch, seed=0):
    return torch.linalg.qr(torch.randn(*batch, r, r, dtype=F64, generator=_gen(seed)))[0]


def _skew(r, seed=0):
    x = torch.randn(r, r, dtype=F64, generator=_gen(seed))
    return 0.5 * (x - x.T)


def _tangent(point, seed=0):
    g = _gen(seed)
    return PolarTangent(
        stiefel.project(point.U, torch.randn(point.U.shape, dtype=F64, generator=g)),
        spd.sym(torch.randn(point.B.shape, dtype=F64, generator=g)),
        stiefel.project(point.V, torch.randn(point.V.shape, dtype=F64, generator=g)),
    )


def _point(seed, d1=9, d2=7, r=3):
    return lowrank.polar_from_factors(*_factors(d1, d2, r, seed=seed))


def test_polar_factors_reconstruct_the_dense_product():
    g, h = _factors(12, 8, 4, 3, seed=1)
    p = lowrank.polar_from_factors(g, h)
    dense = g @ h.mT  # float64 reference
    assert float((lowrank.dense(p) - dense).abs().max()) <= 1e-13 * float(dense.abs().max())
    eye = torch.eye(4, dtype=F64)
    assert torch.allclose(p.U.mT @ p.U, eye, atol=1e-14) and torch.allclose(p.V.mT @ p.V, eye, atol=1e-14)
    spd.check_spd(p.B)
    assert torch.allclose(torch.diagonal(p.B, dim1=-2, dim2=-1), torch.linalg.svdvals(dense)[..., :4], rtol=1e-12)


def test_balanced_factors_are_the_svd_of_the_update():
    p = lowrank.act(_point(2), _orthogonal(3, seed=3))  # a non-diagonal B
    g, h = lowrank.factors_from_polar(p)
    assert torch.allclose(g @ h.T, lowrank.dense(p), atol=1e-13)
    sigma = torch.linalg.svdvals(lowrank.dense(p))[:3]
    assert torch.allclose(g.T @ g, torch.diag(sigma), atol=1e-12)
    assert torch.allclose(h.T @ h, torch.diag(sigma), atol=1e-12)


def test_gl_reparametrization_lands_on_the_same_orbit():
    g, h = _factors(seed=4)
    a = torch.randn(3, 3, dtype=F64, generator=_gen(5)) + 3 * torch.eye(3, dtype=F64)
    p, q = lowrank.polar_from_factors(g, h), lowrank.polar_from_factors(g @ torch.linalg.inv(a), h @ a.T)
    assert torch.allclose(lowrank.dense(p), lowrank.dense(q), atol=1e-12)
    assert float(lowrank.quotient_dist(p, Polar(*(x[None] for x in q)))) < 1e-9


def test_vertical_vectors_are_the_orbit_velocities():
    p, omega, t = _point(6), _skew(3, seed=7), 1e-6
    moved = lowrank.act(p, torch.linalg.matrix_exp(t * omega))
    v = lowrank.vertical(p, omega)
    for got, want, base in zip(moved, v, p):
        assert torch.allclose((got - base) / t, want, atol=1e-5)


def test_horizontal_projection_is_orthogonal_to_the_orbit_and_solves_the_omega_equation():
    p = lowrank.act(_point(8), _orthogonal(3, seed=9))
    xi = _tangent(p, seed=10)
    hor = lowrank.horizontal(p, xi)
    for seed in range(3):
        assert abs(float(lowrank.inner(p, hor, lowrank.vertical(p, _skew(3, seed=20 + seed))))) < 1e-12
    assert torch.allclose(lowrank.horizontal(p, hor).U, hor.U, atol=1e-13)  # idempotent
    # Ω solves B⁻¹ΩB + BΩB⁻¹ − Ω = ½(UᵀξU + VᵀξV) − (B⁻¹ξB − ξB B⁻¹) (paper §2)
    omega = lowrank.vertical_generator(p, xi)
    b, binv = p.B, torch.linalg.inv(p.B)
    lhs = binv @ omega @ b + b @ omega @ binv - omega
    rhs = 0.5 * (p.V.T @ xi.V + p.U.T @ xi.U) - (binv @ xi.B - xi.B @ binv)
    assert torch.allclose(lhs, rhs, atol=1e-11)
    # ξ − hor(ξ) is vertical
    v = lowrank.vertical(p, omega)
    assert all(torch.allclose(x - y, z, atol=1e-13) for x, y, z in zip(xi, hor, v))


def test_the_action_is_an_isometry_and_exp_inverts_log():
    p, q, o = _point(11), _point(12), _orthogonal(3, seed=13)
    d = float(lowrank.dist(p, q))
    assert float(lowrank.dist(lowrank.act(p, o), lowrank.act(q, o))) == pytest.approx(d, rel=1e-9)
    xi = lowrank.log(p, q)
    back = lowrank.exp(p, xi)
    assert all(torch.allclose(x, y, atol=1e-10) for x, y in zip(back, q))


def _batch(*points):
    return Polar(*(torch.stack(parts) for parts in zip(*points)))


def test_alignment_minimizes_over_the_orbit_and_makes_the_log_horizontal():
    mu = _point(14, d1=10, d2=8, r=3)
    others = _batch(_point(15, d1=10, d2=8, r=3), _point(16, d1=10, d2=8, r=3))
    result = lowrank.align(mu, others)
    assert result.converged
    best = lowrank.norm(mu, result.log)
    assert torch.allclose(best, lowrank.dist(mu, result.aligned), rtol=1e-10)
    # no random rotation does better
    for seed in range(8):
        o = _orthogonal(3, 2, seed=100 + seed)
        assert bool((lowrank.dist(mu, lowrank.act(others, o)) >= best - 1e-9).all())
    # the log at the aligned representative is horizontal
    hor = lowrank.horizontal(mu, PolarTangent(*(x[0] for x in result.log)))
    assert float(lowrank.norm(mu, PolarTangent(*(a[0] - b for a, b in zip(result.log, hor))))) < 1e-9


def test_residual_relative_log_threshold_reaches_the_same_alignment(monkeypatch):
    """Far from the orbit minimum the alignment's Stiefel logs stop at LOG_TOL_RESIDUAL × residual²; the
    alignment converges to the same rotation as with every log at the final threshold (to the alignment
    tolerance), for nearly orthogonal inputs whose closed-form start is far from the minimum."""
    mu = _point(30, d1=40, d2=36, r=6)
    others = _batch(*(_point(31 + k, d1=40, d2=36, r=6) for k in range(4)))
    relaxed = lowrank.align(mu, others, tol=1e-10, max_iter=400)
    monkeypatch.setattr(lowrank, "LOG_TOL_RESIDUAL", 0.0)
    strict = lowrank.align(mu, others, tol=1e-10, max_iter=400)
    assert relaxed.converged and strict.converged and strict.iterations > 10
    assert torch.allclose(relaxed.O, strict.O, rtol=0, atol=1e-8)
    assert torch.allclose(lowrank.norm(mu, relaxed.log), lowrank.norm(mu, strict.log), rtol=1e-12)


def test_a_shared_eigendecomposition_cache_changes_no_result():
    mu = _point(21, d1=10, d2=8, r=3)
    others = _batch(_point(22, d1=10, d2=8, r=3), _point(23, d1=10, d2=8, r=3))
    xi, zeta = _tangent(mu, seed=24), _tangent(mu, seed=25)
    cache = spd.EighCache()
    for fn, args in [
        (lowrank.inner, (mu, xi, zeta)),
        (lowrank.horizontal, (mu, xi)),
        (lowrank.exp, (mu, xi)),
        (lowrank.transport, (mu, lowrank.exp(mu, xi), zeta)),
    ]:
        with_cache, without = fn(*args, cache=cache), fn(*args)
        assert all(torch.equal(x, y) for x, y in zip(_parts(with_cache), _parts(without)))
    cached, fresh = lowrank.align(mu, others, cache=cache), lowrank.align(mu, others)
    assert torch.equal(cached.O, fresh.O) and all(torch.equal(x, y) for x, y in zip(cached.log, fresh.log))


def _parts(x):
    return tuple(x) if isinstance(x, tuple) else (x,)


def test_quotient_distance_is_invariant_under_o_r_on_either_argument():
    p, q = _point(17), _point(18)
    o1, o2 = _orthogonal(3, seed=19), _orthogonal(3, seed=20)
    o2[:, 0] *= -1  # also a reflection (the group is O(r), not SO(r))
    qb = _batch(q)
    d = float(lowrank.quotient_dist(p, qb))
    assert d < float(lowrank.dist(p, q)) + 1e-12
    assert float(lowrank.quotient_dist(p, _batch(lowrank.act(q, o1)))) == pytest.approx(d, rel=1e-8)
    assert float(lowrank.quotient_dist(lowrank.act(p, o2), qb)) == pytest.approx(d, rel=1e-8)
    assert float(lowrank.quotient_dist(p, _batch(p))) < 1e-9


def test_rank_deficient_and_malformed_factors_are_rejected():
    g, h = _factors(seed=21)
    g_low = g.clone()
    g_low[:, 2] = g_low[:, 0] + g_low[:, 1]
    with pytest.raises(ManifoldError, match="rank below"):
        lowrank.polar_from_factors(g_low, h)
    with pytest.raises(ShapeMismatchError, match="exceeds"):
        lowrank.polar_from_factors(torch.randn(2, 3, dtype=F64), torch.randn(5, 3, dtype=F64))
    with pytest.raises(ShapeMismatchError):
        lowrank.polar_from_factors(g, h[:, :2])
    bad = g.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        lowrank.polar_from_factors(bad, h)
