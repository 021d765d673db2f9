"""Fisher–Rao geometry of categorical distributions (karcher_lab.geometry.simplex)."""
from __future__ import annotations

import math

import pytest
import torch

from karcher_lab.errors import InputError, ParameterError, ShapeMismatchError
from karcher_lab.geometry.simplex import fr_distance, fr_geodesic, fr_karcher_mean

F64 = torch.float64


def _dist(*shape, seed=0, concentration=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(concentration * torch.randn(*shape, generator=g, dtype=F64), dim=-1)


def _kl(p, q):
    return (p * (p / q).log()).sum(-1)


def test_distance_matches_its_closed_form():
    p, q = _dist(4, 10, seed=1), _dist(4, 10, seed=2)
    closed = 2 * torch.arccos((p * q).sqrt().sum(-1))
    d = fr_distance(p, q)
    assert d.shape == (4,)
    torch.testing.assert_close(d, closed, rtol=1e-12, atol=0)
    torch.testing.assert_close(d, fr_distance(q, p), rtol=0, atol=0)
    # disjoint supports are as far apart as two distributions can be: d = 2·(π/2) = π
    assert float(fr_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(math.pi)
    assert float(fr_distance(p[0], p[0])) == 0.0


@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_squared_distance_is_twice_the_kl_for_nearby_distributions(eps):
    """Paper eq. 1: d_FR²(p, q) = 2 KL(p ‖ q) + O(‖q − p‖³)."""
    p = _dist(3, 50, seed=3)
    direction = torch.randn(3, 50, generator=torch.Generator().manual_seed(4), dtype=F64)
    q = torch.softmax(p.log() + eps * direction, dim=-1)
    ratio = fr_distance(p, q) ** 2 / (2 * _kl(p, q))
    assert float((ratio - 1).abs().max()) < eps / 10  # the relative gap shrinks linearly with eps (≈ 0.05·eps here)


def test_geodesic_endpoints_stay_distributions_and_split_the_distance():
    p, q = _dist(2, 7, seed=5), _dist(2, 7, seed=6)
    torch.testing.assert_close(fr_geodesic(p, q, 0.0), p, rtol=0, atol=1e-15)
    torch.testing.assert_close(fr_geodesic(p, q, 1.0), q, rtol=0, atol=1e-14)
    d = fr_distance(p, q)
    for t in (0.2, 0.5, 0.7):
        g = fr_geodesic(p, q, t)
        assert bool((g >= 0).all())
        torch.testing.assert_close(g.sum(-1), torch.ones(2, dtype=F64), rtol=0, atol=1e-14)
        torch.testing.assert_close(fr_distance(p, g), t * d, rtol=1e-10, atol=0)
        torch.testing.assert_close(fr_distance(g, q), (1 - t) * d, rtol=1e-10, atol=0)


def test_karcher_mean_of_two_is_the_geodesic_midpoint():
    p, q = _dist(3, 12, seed=7, concentration=2.0), _dist(3, 12, seed=8, concentration=2.0)
    mean, trace = fr_karcher_mean([p, q])
    assert trace.converged and mean.shape == p.shape
    torch.testing.assert_close(mean, fr_geodesic(p, q, 0.5), rtol=0, atol=1e-13)
    weighted, _ = fr_karcher_mean([p, q], [1.0, 3.0])
    torch.testing.assert_close(weighted, fr_geodesic(p, q, 0.75), rtol=0, atol=1e-13)


def test_karcher_mean_minimizes_the_weighted_squared_distance():
    ps = [_dist(6, seed=10 + i, concentration=1.5) for i in range(4)]
    w = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=F64)
    mean, _ = fr_karcher_mean(ps, w)
    assert float(mean.sum()) == pytest.approx(1.0, abs=1e-14) and bool((mean > 0).all())

    def objective(m):
        return float(sum(wi * fr_distance(m, p) ** 2 for wi, p in zip(w, ps)))

    best = objective(mean)
    g = torch.Generator().manual_seed(20)
    for _ in range(20):  # nearby distributions all do worse
        other = torch.softmax(mean.log() + 1e-3 * torch.randn(6, generator=g, dtype=F64), dim=-1)
        assert objective(other) > best


def test_invalid_distributions_raise():
    p = _dist(5, seed=9)
    with pytest.raises(InputError, match="negative"):
        fr_distance(torch.tensor([1.2, -0.2]), torch.tensor([0.5, 0.5]))
    with pytest.raises(InputError, match="sums to 0.9"):
        fr_distance(p * 0.9, p)
    with pytest.raises(InputError, match="NaN"):
        fr_distance(torch.tensor([float("nan"), 1.0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ShapeMismatchError):
        fr_distance(p, _dist(6, seed=1))
    with pytest.raises(InputError, match="non-empty last axis"):
        fr_distance(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ParameterError, match=r"\[0, 1\]"):
        fr_geodesic(p, p, 1.5)
    with pytest.raises(InputError, match="no distributions"):
        fr_karcher_mean([])
