"""SPD matrices with the affine-invariant metric (karcher_lab.geometry.spd) against closed forms and identities."""
from __future__ import annotations

import pytest
import torch

from karcher_lab.errors import ManifoldError, NonFiniteError, ParameterError, ShapeMismatchError
from karcher_lab.geometry import spd

F64 = torch.float64


def _spd(*batch, r=4, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, r, r, dtype=F64, generator=g)
    return a @ a.mT * spread + 0.5 * torch.eye(r, dtype=F64)


def _sym(*batch, r=4, seed=0):
    x = torch.randn(*batch, r, r, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return 0.5 * (x + x.mT)


def test_exp_of_log_and_log_of_exp_are_identities():
    b, c = _spd(3, seed=1), _spd(3, seed=2)
    assert torch.allclose(spd.exp(b, spd.log(b, c)), c, rtol=0, atol=1e-11 * float(c.abs().max()))
    xi = _sym(3, seed=3)
    assert torch.allclose(spd.log(b, spd.exp(b, xi)), xi, rtol=0, atol=1e-11)


def test_exp_at_identity_is_the_matrix_exponential():
    xi = _sym(r=5, seed=4)
    assert torch.allclose(spd.exp(torch.eye(5, dtype=F64), xi), torch.linalg.matrix_exp(xi), atol=1e-12)


def test_distance_is_symmetric_equals_the_norm_of_log_and_the_eigenvalue_formula():
    b, c = _spd(4, seed=5), _spd(4, seed=6)
    d = spd.dist(b, c)
    assert torch.allclose(d, spd.dist(c, b), rtol=1e-12)
    assert torch.allclose(d, spd.norm(b, spd.log(b, c)), rtol=1e-11)
    mu = torch.linalg.eigvals(torch.linalg.solve(b, c)).real  # eigenvalues of B⁻¹C, a general (non-symmetric) solver
    assert torch.allclose(d, mu.log().norm(dim=-1), rtol=1e-10)


def test_inner_product_is_the_trace_formula():
    b, xi, eta = _spd(seed=7), _sym(seed=8), _sym(seed=9)
    binv = torch.linalg.inv(b)
    assert torch.allclose(spd.inner(b, xi, eta), torch.trace(binv @ xi @ binv @ eta), rtol=1e-11)


def test_metric_is_invariant_under_congruence():
    b, c = _spd(seed=10), _spd(seed=11)
    a = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(12)) + 3 * torch.eye(4, dtype=F64)
    assert torch.allclose(spd.dist(a.T @ b @ a, a.T @ c @ a), spd.dist(b, c), rtol=1e-10)


def test_geodesic_midpoint_of_commuting_matrices_is_the_geometric_mean():
    b, c = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=F64)), torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=F64))
    mid = spd.exp(b, 0.5 * spd.log(b, c))
    assert torch.allclose(mid, torch.diag(torch.tensor([2.0, 2.0, 1.5], dtype=F64)), atol=1e-13)
    assert spd.dist(b, c) == pytest.approx(float(torch.tensor([4.0, 0.25, 1 / 36], dtype=F64).log().norm()), rel=1e-12)


def test_float32_inputs_come_back_float32():
    b, c = _spd(seed=13).float(), _spd(seed=14).float()
    assert spd.log(b, c).dtype == torch.float32 and spd.dist(b, c).dtype == torch.float32


@pytest.mark.parametrize(
    "matrix, error",
    [
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64), ManifoldError),  # not symmetric
        (torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64), ManifoldError),  # indefinite
        (torch.zeros(3, 3, dtype=F64), ManifoldError),  # singular
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=F64), NonFiniteError),
        (torch.ones(2, 3, dtype=F64), ShapeMismatchError),
    ],
)
def test_bad_points_are_rejected(matrix, error):
    with pytest.raises(error):
        spd.check_spd(matrix)
    with pytest.raises(error):
        spd.dist(matrix, matrix)


def test_the_cached_eigendecomposition_follows_in_place_changes():
    b = _spd(seed=15)
    cache = spd.EighCache()
    lam, _ = spd.eigh_spd(b, cache=cache)
    assert spd.eigh_spd(b, cache=cache)[0] is lam  # same tensor, unchanged: reused
    assert spd.eigh_spd(b)[0] is not lam  # without a cache nothing is kept between calls
    b.mul_(2.0)
    assert torch.allclose(spd.eigh_spd(b, cache=cache)[0], 2.0 * lam, rtol=1e-12)
    b.copy_(-b)
    with pytest.raises(ManifoldError, match="positive definite"):
        spd.eigh_spd(b, cache=cache)


def test_the_cache_keeps_the_most_recently_used_points_and_changes_no_result():
    points = [_spd(seed=s) for s in (16, 17, 18)]
    cache = spd.EighCache(size=2)
    first = spd.eigh_spd(points[0], cache=cache)[0]
    spd.eigh_spd(points[1], cache=cache)
    assert spd.eigh_spd(points[0], cache=cache)[0] is first  # used last: kept when the third arrives
    spd.eigh_spd(points[2], cache=cache)
    assert spd.eigh_spd(points[0], cache=cache)[0] is first
    xi = spd.log(points[0], points[1])
    assert torch.equal(spd.exp(points[0], xi, cache=cache), spd.exp(points[0], xi))
    assert torch.equal(spd.inner(points[0], xi, xi, cache=cache), spd.inner(points[0], xi, xi))
    with pytest.raises(ParameterError, match="size"):
        spd.EighCache(size=0)
