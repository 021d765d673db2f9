"""Teaching panels for notebook 02: move points, weights and the step size and watch the geometry respond.

- :class:`GeometryPlayground` — three categorical distributions on the probability simplex (3 outcomes).
  Each is set by two angles of its square-root point √p on the positive octant of the unit sphere
  (p ↦ √p is, up to the factor 2, the Fisher–Rao isometry onto the sphere). The simplex figure shows the
  points, the Fisher–Rao geodesics from the Karcher mean to each, the arithmetic mean Σ α_i p_i, the
  Fisher–Rao Karcher mean and every iterate of the fixed-point iteration u ← Exp_u(η Σ α_i Log_u u_i)
  (eq. 5); the second figure is the residual ‖v‖ per iteration. Weight sliders carry the CSS class
  ``kl-playground-weight``, the η slider ``kl-playground-eta``, errors appear in ``kl-error``.
- :class:`ScalingToyPlayground` — the GeoMerge §4 toy f(x) = θ₁θ₂x: two checkpoints in the (θ₁, θ₂)
  plane with their orbits θ₁θ₂ = w, a slider for the gauge a of the second (θ·a = (aθ₁, θ₂/a)), and the
  Euclidean, Fisher and quotient means. Only the quotient mean keeps the same predictor whatever the gauge;
  at a = −1 with identical functions the other two collapse to (0, 0).

Both are ``ipywidgets.VBox`` subclasses (display them directly); their plotly ``FigureWidget`` figures
(``.figures``, CSS class ``kl-figure``) are updated in place. All math comes from
:mod:`karcher_lab.geometry.simplex` and :mod:`karcher_lab.teaching`.
"""
from __future__ import annotations

import math

import ipywidgets as W
import plotly.graph_objects as go
import torch

from karcher_lab import teaching
from karcher_lab.errors import KarcherLabError
from karcher_lab.geometry import simplex
from karcher_lab.teaching import scaling_toy

TRIANGLE = ((0.0, 0.0), (1.0, 0.0), (0.5, math.sqrt(3) / 2))
"""Corners of the simplex picture for the outcomes 1, 2, 3 (barycentric coordinates → the plane)."""

START_ANGLES = ((70.0, 12.0), (62.0, 75.0), (20.0, 40.0))
"""(polar, azimuth) in degrees of the default three points √p."""

GEODESIC_SAMPLES = 40


def _plane(p: torch.Tensor) -> tuple[list[float], list[float]]:
    """Barycentric → planar coordinates of distributions [..., 3]."""
    corners = torch.tensor(TRIANGLE, dtype=torch.float64)
    xy = p.reshape(-1, 3).to(torch.float64) @ corners
    return xy[:, 0].tolist(), xy[:, 1].tolist()


def distribution_from_angles(polar_deg: float, azimuth_deg: float) -> torch.Tensor:
    """p = s² for the unit point s = (sin a cos b, sin a sin b, cos a) on the positive octant (a, b in degrees)."""
    a, b = math.radians(polar_deg), math.radians(azimuth_deg)
    root = torch.tensor([math.sin(a) * math.cos(b), math.sin(a) * math.sin(b), math.cos(a)], dtype=torch.float64)
    return root.square()


def _slider(description: str, value: float, low: float, high: float, step: float, css: str | None = None) -> W.FloatSlider:
    slider = W.FloatSlider(value=value, min=low, max=high, step=step, description=description,
                           continuous_update=True, readout_format=".2f", style={"description_width": "7em"})
    if css:
        slider.add_class(css)
    return slider


def _figure(title: str, **layout) -> go.FigureWidget:
    size = dict(height=420, width=520, margin=dict(l=40, r=20, t=50, b=40))
    return go.FigureWidget(layout={**size, "title": title, **layout})


class GeometryPlayground(W.VBox):
    """Fisher–Rao Karcher mean of three distributions on the simplex, with sliders (see the module docstring)."""

    def __init__(self, *, eta: float = 1.0, max_iter: int = 60):
        self.angle_sliders = [
            (_slider(f"p{i + 1} polar°", pol, 1.0, 89.0, 1.0), _slider(f"p{i + 1} azimuth°", az, 1.0, 89.0, 1.0))
            for i, (pol, az) in enumerate(START_ANGLES)
        ]
        self.weight_sliders = [_slider(f"weight p{i + 1}", 1.0, 0.0, 1.0, 0.05, "kl-playground-weight") for i in range(3)]
        self.eta_slider = _slider("step η", eta, 0.05, 1.0, 0.05, "kl-playground-eta")
        self.max_iter_slider = W.IntSlider(value=max_iter, min=1, max=200, description="max_iter",
                                           style={"description_width": "7em"})
        self.readout = W.HTML()
        self.error = W.HTML()
        self.error.add_class("kl-error")

        self.simplex_figure = _figure(
            "the simplex: arithmetic vs Fisher–Rao Karcher mean",
            xaxis=dict(visible=False, range=[-0.05, 1.05]), yaxis=dict(visible=False, scaleanchor="x", range=[-0.05, 0.92]),
        )
        corners = list(TRIANGLE) + [TRIANGLE[0]]
        self.simplex_figure.add_scatter(x=[c[0] for c in corners], y=[c[1] for c in corners], mode="lines",
                                        line=dict(color="gray"), name="simplex", hoverinfo="skip")
        for i in range(3):
            self.simplex_figure.add_scatter(mode="lines", line=dict(dash="dot"), name=f"FR geodesic to p{i + 1}")
        self.simplex_figure.add_scatter(mode="markers+text", marker=dict(size=12, color="black"), name="points",
                                        text=["p1", "p2", "p3"], textposition="top center")
        self.simplex_figure.add_scatter(mode="markers", marker=dict(size=12, symbol="x", color="crimson"),
                                        name="arithmetic mean Σαp")
        self.simplex_figure.add_scatter(mode="lines+markers", marker=dict(size=5, color="royalblue"),
                                        line=dict(color="royalblue"), name="iterates (eq. 5)")
        self.simplex_figure.add_scatter(mode="markers", marker=dict(size=14, symbol="star", color="royalblue"),
                                        name="Fisher–Rao Karcher mean")
        self.trace_figure = _figure("convergence: ‖v‖ per iteration", xaxis=dict(title="iteration"),
                                    yaxis=dict(title="‖Σ α Log_u u_i‖", type="log"))
        self.trace_figure.add_scatter(mode="lines+markers", name="residual")
        self.figures = [self.simplex_figure, self.trace_figure]
        for fig in self.figures:
            fig.add_class("kl-figure")

        controls = [W.HBox([polar, azimuth]) for polar, azimuth in self.angle_sliders]
        controls += [W.HBox(self.weight_sliders[:2]), W.HBox([self.weight_sliders[2], self.eta_slider]), self.max_iter_slider]
        super().__init__([*controls, self.error, self.readout, W.HBox(self.figures)])
        for slider in [*sum(self.angle_sliders, ()), *self.weight_sliders, self.eta_slider, self.max_iter_slider]:
            slider.observe(lambda change: self.update(), names="value")
        self.update()

    def distributions(self) -> list[torch.Tensor]:
        """The three distributions the angle sliders set."""
        return [distribution_from_angles(polar.value, azimuth.value) for polar, azimuth in self.angle_sliders]

    def update(self) -> None:
        """Recompute from the sliders and rewrite the figures' data in place (errors go to the error area)."""
        try:
            ps = self.distributions()
            weights = [s.value for s in self.weight_sliders]
            mix = teaching.mixture(ps, weights)
            roots, residuals = teaching.karcher_path(torch.stack([p.sqrt() for p in ps]), weights,
                                                     eta=self.eta_slider.value, max_iter=self.max_iter_slider.value)
            iterates = roots.square()
            mean = iterates[-1] / iterates[-1].sum()
            geodesics = [simplex.fr_geodesic(mean.expand(GEODESIC_SAMPLES, 3), p.expand(GEODESIC_SAMPLES, 3),
                                             torch.linspace(0, 1, GEODESIC_SAMPLES, dtype=torch.float64)) for p in ps]
        except KarcherLabError as exc:
            self.error.value = f"<span style='color:crimson'>{type(exc).__name__}: {exc}</span>"
            return
        self.error.value = ""
        with self.simplex_figure.batch_update():
            for trace, path in zip(self.simplex_figure.data[1:4], geodesics):
                trace.x, trace.y = _plane(path)
            for trace, points in zip(self.simplex_figure.data[4:], (torch.stack(ps), mix, iterates, mean)):
                trace.x, trace.y = _plane(points)
        with self.trace_figure.batch_update():
            self.trace_figure.data[0].x = list(range(len(residuals)))
            self.trace_figure.data[0].y = residuals.clamp_min(1e-17).tolist()
        converged = float(residuals[-1]) < 1e-10
        self.readout.value = (
            f"d_FR(arithmetic mean, Karcher mean) = {float(simplex.fr_distance(mix, mean)):.4f} · "
            f"{len(residuals) - 1} iterations, final ‖v‖ = {float(residuals[-1]):.2e} "
            f"({'converged' if converged else 'not converged: raise max_iter or η'})"
        )


class ScalingToyPlayground(W.VBox):
    """Two checkpoints of f(x) = θ₁θ₂x, the gauge of the second on a slider (see the module docstring)."""

    def __init__(self, first=(1.2, 0.8), second=(0.6, 1.1)):
        self.first = torch.tensor(first, dtype=torch.float64)
        self.second = torch.tensor(second, dtype=torch.float64)
        self.gauge_slider = _slider("gauge a", 1.0, -3.0, 3.0, 0.1)
        self.readout = W.HTML()
        self.error = W.HTML()
        self.error.add_class("kl-error")
        self.figure = _figure("θ-plane: orbits θ1θ2 = w and three merges",
                              xaxis=dict(title="θ1", range=[-3, 3]), yaxis=dict(title="θ2", range=[-3, 3], scaleanchor="x"),
                              width=560, height=520)
        self.figure.add_class("kl-figure")
        self.figure.add_scatter(mode="lines", line=dict(color="lightgray"), name="orbits of the checkpoints")
        self.figure.add_scatter(mode="lines", line=dict(color="royalblue", dash="dash"), name="orbit of the quotient mean")
        self.figure.add_scatter(mode="markers+text", marker=dict(size=12, color="black"), text=["θ(1)", "θ(2)·a"],
                                textposition="top center", name="checkpoints")
        for name, symbol, color in (("Euclidean mean", "x", "crimson"), ("Fisher mean", "diamond", "darkorange"),
                                    ("quotient mean", "star", "royalblue")):
            self.figure.add_scatter(mode="markers", marker=dict(size=14, symbol=symbol, color=color), name=name)
        super().__init__([self.gauge_slider, self.error, self.readout, self.figure])
        self.gauge_slider.observe(lambda change: self.update(), names="value")
        self.update()

    def update(self) -> None:
        """Recompute the three means for the current gauge and rewrite the figure's data in place."""
        try:
            thetas = torch.stack([self.first, scaling_toy.gauge(self.second, self.gauge_slider.value)])
            means = [scaling_toy.euclidean_mean(thetas), scaling_toy.fisher_mean(thetas), scaling_toy.quotient_mean(thetas)]
        except KarcherLabError as exc:  # e.g. the gauge a = 0
            self.error.value = f"<span style='color:crimson'>{type(exc).__name__}: {exc}</span>"
            return
        self.error.value = ""
        with self.figure.batch_update():
            self.figure.data[0].x, self.figure.data[0].y = _orbits(scaling_toy.predictor(thetas).tolist())
            self.figure.data[1].x, self.figure.data[1].y = _orbits([float(scaling_toy.predictor(means[2]))])
            self.figure.data[2].x, self.figure.data[2].y = thetas[:, 0].tolist(), thetas[:, 1].tolist()
            for trace, point in zip(self.figure.data[3:], means):
                trace.x, trace.y = [float(point[0])], [float(point[1])]
        w = [float(m[0] * m[1]) for m in means]
        self.readout.value = (
            f"predictors w = θ1θ2 of the checkpoints: {', '.join(f'{v:.3f}' for v in scaling_toy.predictor(thetas).tolist())}"
            f" · Euclidean mean: {w[0]:.3f} · Fisher mean: {w[1]:.3f} · quotient mean: {w[2]:.3f}"
        )


def _orbits(predictors: list[float], span: float = 3.0, samples: int = 60) -> tuple[list, list]:
    """Both branches of each hyperbola θ₁θ₂ = w inside [−span, span]², separated by None (plotly gaps)."""
    xs, ys = [], []
    for w in predictors:
        low = abs(w) / span
        t = torch.logspace(math.log10(low), math.log10(span), samples, dtype=torch.float64)
        for sign in (1.0, -1.0):
            xs += (sign * t).tolist() + [None]
            ys += (w / (sign * t)).tolist() + [None]
    return xs, ys
