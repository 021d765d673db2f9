"""GeometryPlayground and ScalingToyPlayground: slider moves rewrite the same figures in place, with the
numbers of the geometry functions (Fisher–Rao Karcher mean, mixture, the toy's means)."""
import math

import pytest
import torch

from karcher_lab.geometry import simplex
from karcher_lab.widgets.playground import (
    TRIANGLE,
    GeometryPlayground,
    ScalingToyPlayground,
    distribution_from_angles,
)


def _barycentric(x: float, y: float) -> torch.Tensor:
    """Invert the simplex picture: planar point → distribution (p2, p3 from the corners, p1 = 1 − p2 − p3)."""
    p3 = y / TRIANGLE[2][1]
    p2 = x - 0.5 * p3
    return torch.tensor([1 - p2 - p3, p2, p3], dtype=torch.float64)


def test_distribution_from_angles_is_on_the_simplex():
    p = distribution_from_angles(30.0, 60.0)
    a, b = math.radians(30), math.radians(60)
    assert torch.allclose(p, torch.tensor([(math.sin(a) * math.cos(b)) ** 2, (math.sin(a) * math.sin(b)) ** 2,
                                           math.cos(a) ** 2], dtype=torch.float64))
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-15)


def test_geometry_playground_updates_in_place_with_the_karcher_mean():
    panel = GeometryPlayground()
    figure, data_before = panel.simplex_figure, panel.simplex_figure.data
    panel.weight_sliders[0].value = 0.2
    panel.angle_sliders[1][0].value = 40.0
    assert panel.simplex_figure is figure and panel.simplex_figure.data[-1] is data_before[-1]  # same traces
    assert panel.error.value == ""
    ps = panel.distributions()
    weights = [0.2, 1.0, 1.0]
    expected, _ = simplex.fr_karcher_mean(ps, weights, tol=1e-12)
    star = panel.simplex_figure.data[-1]
    assert torch.allclose(_barycentric(star.x[0], star.y[0]), expected, atol=1e-9)
    cross = panel.simplex_figure.data[5]
    mixture = sum(w * p for w, p in zip(weights, ps)) / sum(weights)
    assert torch.allclose(_barycentric(cross.x[0], cross.y[0]), mixture, atol=1e-12)
    # η < 1 takes more, smaller steps: the residual trace gets longer, and stays decreasing
    steps_full = len(panel.trace_figure.data[0].y)
    panel.eta_slider.value = 0.3
    residuals = panel.trace_figure.data[0].y
    assert len(residuals) > steps_full
    assert all(b < a for a, b in zip(residuals, residuals[1:]))
    assert "kl-figure" in panel.simplex_figure._dom_classes


def test_geometry_playground_shows_errors_in_the_panel():
    panel = GeometryPlayground()
    for slider in panel.weight_sliders:
        slider.value = 0.0
    assert "WeightError" in panel.error.value
    panel.weight_sliders[2].value = 0.5
    assert panel.error.value == ""


def test_scaling_toy_playground_collapse_and_gauge_invariance():
    panel = ScalingToyPlayground(first=(1.5, 0.5), second=(1.5, 0.5))
    euclid, fisher, quotient = panel.figure.data[3:]
    panel.gauge_slider.value = -1.0                      # the second checkpoint becomes −θ: the same function
    assert (euclid.x[0], euclid.y[0]) == (0.0, 0.0) and (fisher.x[0], fisher.y[0]) == (0.0, 0.0)
    assert quotient.x[0] * quotient.y[0] == pytest.approx(0.75, rel=1e-14)
    other = ScalingToyPlayground(first=(1.2, 0.8), second=(0.6, 1.1))
    products = []
    for a in (0.5, 2.0):
        other.gauge_slider.value = a
        e, _, q = other.figure.data[3:]
        products.append((e.x[0] * e.y[0], q.x[0] * q.y[0]))
    assert products[0][1] == pytest.approx(products[1][1], rel=1e-14) == pytest.approx((0.96 + 0.66) / 2, rel=1e-14)
    assert abs(products[0][0] - products[1][0]) > 0.1     # the Euclidean mean depends on the gauge
    other.gauge_slider.value = 0.0
    assert "ParameterError" in other.error.value
