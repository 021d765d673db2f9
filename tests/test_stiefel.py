"""The Stiefel manifold with the canonical metric (karcher_lab.geometry.stiefel) against closed forms and identities."""
from __future__ import annotations

import pytest
import torch

from karcher_lab.errors import AntipodalError, ConvergenceError, ManifoldError, ParameterError, ShapeMismatchError
from karcher_lab.geometry import sphere, stiefel

F64 = torch.float64



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _point(n, p, *batch, seed=0):
    return torch.linalg.qr(torch.randn(*batch, n, p, dtype=F64, generator=_gen(seed)))[0]


def _tangent(u, seed=0, length=1.0):
    d = stiefel.project(u, torch.randn(u.shape, dtype=F64, generator=_gen(seed)))
    return d * (length / stiefel.norm(u, d))[..., None, None]


def _orthonormality(u):
    return float((u.mT @ u - torch.eye(u.shape[-1], dtype=F64)).abs().max())


@pytest.mark.parametrize("length", [0.1, 1.0, 2.5, 6.0])
def test_exp_stays_on_the_manifold(length):
    u = _point(40, 5, 3, seed=1)
    y = stiefel.exp(u, _tangent(u, seed=2, length=length))
    assert _orthonormality(y) < 1e-13


@pytest.mark.parametrize("n, p, length", [(10, 3, 0.5), (30, 4, 1.5), (60, 8, 2.0)])
def test_log_inverts_exp_near_the_point(n, p, length):
    u = _point(n, p, seed=3)
    delta = _tangent(u, seed=4, length=length)
    back, info = stiefel.log(u, stiefel.exp(u, delta), return_info=True)
    assert info.converged
    assert torch.allclose(back, delta, rtol=0, atol=1e-10)


def test_exp_of_log_reaches_random_far_points():
    u, y = _point(30, 4, 3, seed=5), _point(30, 4, 3, seed=6)
    delta, info = stiefel.log(u, y, return_info=True)
    assert info.converged
    assert float((u.mT @ delta + delta.mT @ u).abs().max()) < 1e-12  # tangent: UᵀΔ skew
    assert torch.allclose(stiefel.exp(u, delta), y, rtol=0, atol=1e-10)


def test_distance_is_symmetric_and_the_norm_of_log():
    u, y = _point(25, 3, 4, seed=7), _point(25, 3, 4, seed=8)
    d = stiefel.dist(u, y)
    assert torch.allclose(d, stiefel.dist(y, u), rtol=1e-9)
    assert torch.allclose(d, stiefel.norm(u, stiefel.log(u, y)), rtol=1e-12)


def test_distance_is_invariant_under_both_orthogonal_actions():
    u, y = _point(20, 3, seed=9), _point(20, 3, seed=10)
    q = _point(20, 20, seed=11)  # O(n) on the left
    o = _point(3, 3, seed=12)  # O(p) on the right
    d = stiefel.dist(u, y)
    assert float(stiefel.dist(q @ u, q @ y)) == pytest.approx(float(d), rel=1e-9)
    assert float(stiefel.dist(u @ o, y @ o)) == pytest.approx(float(d), rel=1e-9)


def test_p_equal_one_is_the_unit_sphere():
    """On St(n, 1) the canonical metric is the round metric: Exp, Log and d are the sphere's."""
    x, y = _point(12, 1, seed=13), _point(12, 1, seed=14)
    v = sphere.log(x[:, 0], y[:, 0])
    assert torch.allclose(stiefel.log(x, y)[:, 0], v, atol=1e-11)
    assert torch.allclose(stiefel.exp(x, 0.7 * v[:, None])[:, 0], sphere.exp(x[:, 0], 0.7 * v), atol=1e-13)
    assert float(stiefel.dist(x, y)) == pytest.approx(float(sphere.dist(x[:, 0], y[:, 0])), rel=1e-10)


def test_inner_product_is_the_canonical_formula():
    u = _point(15, 4, seed=15)
    a, b = _tangent(u, seed=16), _tangent(u, seed=17)
    expected = torch.trace(a.T @ (torch.eye(15, dtype=F64) - 0.5 * u @ u.T) @ b)
    assert float(stiefel.inner(u, a, b)) == pytest.approx(float(expected), rel=1e-12)


def test_projection_is_idempotent_and_tangent():
    u = _point(15, 4, seed=18)
    z = torch.randn(15, 4, dtype=F64, generator=_gen(19))
    t = stiefel.project(u, z)
    assert float((u.T @ t + t.T @ u).abs().max()) < 1e-13
    assert torch.allclose(stiefel.project(u, t), t, atol=1e-14)
    # the residual Z − P(Z) = U sym(UᵀZ) is normal for the canonical metric too
    assert abs(float(stiefel.inner(u, z - t, _tangent(u, seed=20)))) < 1e-12


def test_logm_orthogonal_inverts_the_matrix_exponential():
    x = torch.randn(3, 8, 8, dtype=F64, generator=_gen(21))
    skew = 0.5 * (x - x.mT)
    skew = skew * (2.5 / torch.linalg.matrix_norm(skew, ord=2))[:, None, None]  # rotation angles ≤ 2.5 < π
    assert torch.allclose(stiefel.logm_orthogonal(torch.linalg.matrix_exp(skew)), skew, atol=1e-11)


def test_antipodal_columns_have_no_logarithm():
    u = _point(10, 2, seed=27)
    with pytest.raises(AntipodalError, match="cut locus"):
        stiefel.log(u, -u)


def test_non_convergence_is_reported_or_raised():
    u, y = _point(30, 4, seed=22), _point(30, 4, seed=23)
    _, info = stiefel.log(u, y, max_iter=1, return_info=True)
    assert not info.converged and int(info.iterations.max()) == 1 and info.residual >= info.tol
    with pytest.raises(ConvergenceError, match="did not converge"):
        stiefel.log(u, y, max_iter=1)


def test_surrogate_replaces_only_the_logs_beyond_reach():
    """With ``surrogate``, a batch entry on the cut locus (Y = −U) or not converged gets Proj_{T_U}(Y − U),
    the negative embedded-metric gradient of ½‖U − Y‖²_F; the other entries keep the exact log."""
    u = _point(20, 3, seed=28)
    near = stiefel.exp(u, _tangent(u, seed=29, length=0.8))
    ys = torch.stack([near, -u, _point(20, 3, seed=30)])
    m, q, n = stiefel.coordinates(u.expand(3, 20, 3), ys)
    with pytest.raises(AntipodalError, match="cut locus"):
        stiefel.log_coordinates(m, n)
    # entry 0 (d = 0.8) converges in 3 steps, entry 2 (d = 2.4) needs 8
    a, b, _, info = stiefel.log_coordinates(m, n, surrogate=True, max_iter=5)
    assert info.fallback.tolist() == [False, True, True] and info.fallbacks == 2 and info.converged
    delta = u @ a + q @ b
    assert torch.allclose(delta[0], stiefel.log(u, near), atol=1e-10)
    for k in (1, 2):  # minus the tangent projection of the Euclidean gradient U − Y of ½‖U − Y‖²_F
        assert torch.allclose(delta[k], -stiefel.project(u, u - ys[k]), atol=1e-12)
    assert float(delta[1].norm()) < 1e-12  # Y = −U is a critical point of the chordal distance too
    assert float((delta[2] - stiefel.log(u, ys[2])).norm()) > 0.1  # far away: a surrogate, not the log


def test_per_entry_tolerances_stop_each_entry_as_its_own_run():
    """``tol`` as a tensor: every batch entry iterates exactly as a run with its own scalar threshold."""
    u = _point(24, 3, seed=40)
    ys = torch.stack([stiefel.exp(u, _tangent(u, seed=41 + k, length=1.5)) for k in range(3)])
    m, _, n = stiefel.coordinates(u.expand(3, 24, 3), ys)
    tols = torch.tensor([1e-2, 1e-6, 1e-12], dtype=F64)
    a, b, _, info = stiefel.log_coordinates(m, n, tol=tols)
    assert info.converged and torch.equal(info.tol, tols)
    for k in range(3):
        a_k, b_k, _, info_k = stiefel.log_coordinates(m[k], n[k], tol=float(tols[k]))
        assert int(info.iterations[k]) == int(info_k.iterations)
        assert torch.allclose(a[k], a_k, rtol=0, atol=1e-14) and torch.allclose(b[k], b_k, rtol=0, atol=1e-14)
    assert info.iterations.tolist() == sorted(info.iterations.tolist()) and info.iterations[0] < info.iterations[2]


@pytest.mark.parametrize("tol, error", [(torch.ones(2, dtype=F64), ShapeMismatchError),
                                        (torch.tensor([1e-3, 0.0, 1e-3], dtype=F64), ParameterError),
                                        (-1.0, ParameterError)])
def test_bad_tolerances_are_rejected(tol, error):
    u = _point(10, 2, seed=50)
    m, _, n = stiefel.coordinates(u.expand(3, 10, 2), _point(10, 2, 3, seed=51))
    with pytest.raises(error):
        stiefel.log_coordinates(m, n, tol=tol)


def test_bad_points_are_rejected():
    with pytest.raises(ManifoldError, match="orthonormal"):
        stiefel.exp(2.0 * _point(6, 2, seed=24), torch.zeros(6, 2, dtype=F64))
    with pytest.raises(ShapeMismatchError):
        stiefel.check_point(torch.zeros(2, 3, dtype=F64))  # p > n
    with pytest.raises(ShapeMismatchError):
        stiefel.log(_point(6, 2, seed=25), _point(7, 2, seed=26))


def _sylvester_exact(b, c):
    """The solution of (I − BBᵀ/6) X + X (I − BBᵀ/6) = −2C in the eigenbasis of BBᵀ (float64 reference)."""
    beta, w = torch.linalg.eigh(b @ b.mT)
    denom = 1.0 - (beta.unsqueeze(-1) + beta.unsqueeze(-2)) / 12.0
    return w @ ((w.mT @ -c @ w) / denom) @ w.mT


@pytest.mark.parametrize("norm_s, error", [(0.0, 1e-15), (0.5, 1e-12), (3.0, 1e-6), (4.4, 1e-3)])
def test_trailing_update_solves_the_sylvester_equation(norm_s, error):
    """The matrix-product Stein sum equals the eigenbasis solution of the Sylvester-corrected update, to
    ρ¹⁶ with ρ = (‖S‖/12)/(1 − ‖S‖/12) (8 terms of a series in ρ²), and is skew."""
    gen = _gen(60)
    b = torch.randn(5, 8, 8, dtype=F64, generator=gen)
    b = b * (norm_s / torch.linalg.matrix_norm(b @ b.mT, ord=2)).sqrt()[:, None, None]
    x = torch.randn(5, 8, 8, dtype=F64, generator=gen)
    c = 0.5 * (x - x.mT)
    got, exact = stiefel._trailing_update(b, c), _sylvester_exact(b, c)
    assert float((got - exact).norm() / exact.norm()) < error
    assert float((got + got.mT).abs().max()) == 0.0


def test_trailing_update_falls_back_to_the_plain_step_for_very_far_points():
    """Where ‖BBᵀ‖₂ ≥ SYLVESTER_MAX_NORM the update is Zimmermann's X = −C."""
    gen = _gen(61)
    b = torch.randn(8, 8, dtype=F64, generator=gen)
    b = b * (stiefel.SYLVESTER_MAX_NORM * 1.01 / torch.linalg.matrix_norm(b @ b.mT, ord=2)).sqrt()
    x = torch.randn(8, 8, dtype=F64, generator=gen)
    c = 0.5 * (x - x.mT)
    assert torch.equal(stiefel._trailing_update(b, c), -c)


def test_anderson_acceleration_reaches_the_same_log_in_fewer_steps(monkeypatch):
    """Far pairs (d ≈ 2): the accelerated iteration stops at the same threshold in fewer steps and returns
    the same logarithm (to the threshold); its exp is Y."""
    u = _point(40, 6, seed=62)
    ys = torch.stack([stiefel.exp(u, _tangent(u, seed=63 + k, length=2.0)) for k in range(4)])
    m, q, n = stiefel.coordinates(u.expand(4, 40, 6), ys)
    a, b, _, info = stiefel.log_coordinates(m, n, tol=1e-12)
    monkeypatch.setattr(stiefel, "ANDERSON_MEMORY", 0)
    a0, b0, _, info0 = stiefel.log_coordinates(m, n, tol=1e-12)
    assert info.converged and info0.converged
    assert int(info.iterations.sum()) < int(info0.iterations.sum())
    assert torch.allclose(a, a0, rtol=0, atol=1e-10) and torch.allclose(b, b0, rtol=0, atol=1e-10)
    assert torch.allclose(stiefel.exp(u.expand(4, 40, 6), u @ a + q @ b), ys, rtol=0, atol=1e-10)
