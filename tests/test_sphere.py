"""Unit sphere maps (karcher_lab.geometry.sphere) against their identities and closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from karcher_lab.errors import AntipodalError, ParameterError
from karcher_lab.geometry import sphere

F64 = torch.float64


def _unit(*shape, seed=0, batch_dims=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    flat = x.reshape(*shape[:batch_dims], -1)
    return (flat / flat.norm(dim=-1, keepdim=True)).reshape(shape)


def _slerp(x, y, t):
    """Closed-form SLERP of unit vectors: [sin((1 − t)θ) x + sin(tθ) y] / sin θ."""
    theta = math.acos(max(-1.0, min(1.0, float((x.flatten() @ y.flatten())))))
    return (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)


@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 2, 5)])
def test_exp_of_log_is_the_identity(shape):
    x, y = _unit(*shape, seed=1), _unit(*shape, seed=2)
    v = sphere.log(x, y)
    assert abs(float((v.flatten() @ x.flatten()))) < 1e-14  # tangent at x
    torch.testing.assert_close(sphere.exp(x, v), y, rtol=0, atol=1e-14)


def test_batched_exp_log_over_blocks():
    x, y = _unit(5, 3, 4, seed=3, batch_dims=1), _unit(5, 3, 4, seed=4, batch_dims=1)
    v = sphere.log(x, y, batch_dims=1)
    torch.testing.assert_close(sphere.exp(x, v, batch_dims=1), y, rtol=0, atol=1e-14)
    # each block is its own point: the batched result equals block-by-block calls
    for b in range(5):
        torch.testing.assert_close(v[b], sphere.log(x[b], y[b]), rtol=0, atol=1e-15)
    assert sphere.dist(x, y, batch_dims=1).shape == (5,)


def test_log_of_log_of_exp_recovers_the_tangent():
    x = _unit(10, seed=5)
    v = torch.randn(10, generator=torch.Generator().manual_seed(6), dtype=F64)
    v = v - (v @ x) * x
    v = 2.0 * v / v.norm()  # ‖v‖ = 2 < π: inside the injectivity radius
    torch.testing.assert_close(sphere.log(x, sphere.exp(x, v)), v, rtol=0, atol=1e-13)


def test_dist_is_symmetric_and_equals_the_log_length_and_arccos():
    x, y = _unit(6, 5, seed=7, batch_dims=1), _unit(6, 5, seed=8, batch_dims=1)
    d = sphere.dist(x, y, batch_dims=1)
    torch.testing.assert_close(d, sphere.dist(y, x, batch_dims=1), rtol=0, atol=0)
    torch.testing.assert_close(d, sphere.log(x, y, batch_dims=1).norm(dim=-1), rtol=1e-13, atol=0)
    torch.testing.assert_close(d, torch.arccos((x * y).sum(-1)), rtol=1e-12, atol=0)


def test_dist_keeps_relative_accuracy_for_nearby_points():
    x = _unit(8, seed=9)
    e = torch.zeros(8, dtype=F64)
    e[0] = 1.0
    e = e - (e @ x) * x
    e = e / e.norm()
    y = math.cos(1e-9) * x + math.sin(1e-9) * e
    assert float(sphere.dist(x, y)) == pytest.approx(1e-9, rel=1e-6)  # arccos⟨x, y⟩ would give ~1e-8 noise


def test_geodesic_endpoints_and_slerp():
    x, y = _unit(12, seed=10), _unit(12, seed=11)
    torch.testing.assert_close(sphere.geodesic(x, y, 0.0), x, rtol=0, atol=1e-15)
    torch.testing.assert_close(sphere.geodesic(x, y, 1.0), y, rtol=0, atol=1e-14)
    for t in (0.25, 0.5, 0.8):
        g = sphere.geodesic(x, y, t)
        torch.testing.assert_close(g, _slerp(x, y, t), rtol=0, atol=1e-14)
        assert float(sphere.dist(x, g)) == pytest.approx(t * float(sphere.dist(x, y)), rel=1e-12)


def test_geodesic_takes_one_t_per_block():
    x, y = _unit(3, 4, seed=12, batch_dims=1), _unit(3, 4, seed=13, batch_dims=1)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    g = sphere.geodesic(x, y, t, batch_dims=1)
    torch.testing.assert_close(g[0], x[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(g[1], _slerp(x[1], y[1], 0.5), rtol=0, atol=1e-14)
    torch.testing.assert_close(g[2], y[2], rtol=0, atol=1e-14)
    with pytest.raises(ParameterError, match="batch shape"):
        sphere.geodesic(x, y, torch.tensor([0.5, 0.5]), batch_dims=1)


def test_log_of_a_point_to_itself_and_exp_of_zero_have_no_nan():
    x = _unit(3, 4, seed=14, batch_dims=1)
    v = sphere.log(x, x, batch_dims=1)
    assert bool(torch.isfinite(v).all()) and float(v.abs().max()) < 1e-15  # zero up to the rounding of ⟨x, x⟩
    torch.testing.assert_close(sphere.exp(x, torch.zeros_like(x), batch_dims=1), x, rtol=0, atol=1e-15)
    assert torch.equal(sphere.dist(x, x, batch_dims=1), torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("offset", [0.0, 1e-5])
def test_log_of_an_antipodal_pair_raises(offset):
    x = _unit(9, seed=15)
    e = _unit(9, seed=16)
    e = (e - (e @ x) * x) / (e - (e @ x) * x).norm()
    y = -math.cos(offset) * x + math.sin(offset) * e  # exactly / numerically antipodal (θ ≥ π − 1e-5)
    with pytest.raises(AntipodalError, match="antipodal"):
        sphere.log(x, y)
    assert float(sphere.dist(x, y)) == pytest.approx(math.pi - offset, abs=1e-12)  # distance is still defined


def test_antipodal_block_is_named():
    x = _unit(4, 3, seed=17, batch_dims=1)
    y = _unit(4, 3, seed=18, batch_dims=1)
    y[2] = -x[2]
    with pytest.raises(AntipodalError, match=r"batch index\(es\) \[\[2\]\]"):
        sphere.log(x, y, batch_dims=1)


def test_half_precision_points_are_computed_in_float32():
    x, y = _unit(64, seed=19), _unit(64, seed=20)
    d = sphere.dist(x.to(torch.bfloat16), y.to(torch.bfloat16))
    assert d.dtype == torch.float32
    assert float(d) == pytest.approx(float(sphere.dist(x, y)), abs=1e-2)


def test_bad_arguments():
    x = _unit(3, 4, seed=21, batch_dims=1)
    with pytest.raises(ParameterError, match="shapes differ"):
        sphere.log(x, x[:2], batch_dims=1)
    with pytest.raises(ParameterError, match="batch_dims"):
        sphere.dist(x, x, batch_dims=3)
