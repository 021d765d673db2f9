"""Figures the panels need beyond :mod:`karcher_lab.plots`: the Karcher convergence trace, norm
shrinkage per tensor, and layer curves with ± std bands. Each returns a ``plotly.graph_objects.Figure``
(the panels copy it into their FigureWidgets with :func:`karcher_lab.widgets.figure_sync.sync_figure`)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from karcher_lab.errors import InputError
from karcher_lab.geometry.karcher_mean import KarcherTrace
from karcher_lab.plots import TITLES, _color

BAND_OPACITY = 0.2


def convergence_figure(traces: Mapping[str, KarcherTrace], *, title: str | None = None) -> go.Figure:
    """‖v^(k)‖ = ‖Σ α_i Log_{u^(k)}(u_i)‖ (eq. 5's residual) against the iteration k, across tensors:
    the maximum and the median over the tensors still iterating at step k (a tensor that stopped drops
    out), log scale, with the stopping tolerance dashed. An empty mapping gives an empty figure whose
    title says so (methods other than karcher do not iterate)."""
    fig = go.Figure()
    if not traces:
        fig.update_layout(title=title or "convergence: no Karcher iteration for this method", template="plotly_white",
                          xaxis_title="iteration", yaxis_title="‖v‖")
        return fig
    length = max(len(t.residuals) for t in traces.values())
    padded = np.full((len(traces), length), np.nan)
    for row, trace in enumerate(traces.values()):
        padded[row, : len(trace.residuals)] = trace.residuals.double().cpu().numpy()
    steps = list(range(length))
    fig.add_trace(go.Scatter(x=steps, y=np.nanmax(padded, axis=0).tolist(), name="max over tensors",
                             mode="lines+markers", line=dict(color=_color(0))))
    fig.add_trace(go.Scatter(x=steps, y=np.nanmedian(padded, axis=0).tolist(), name="median over tensors",
                             mode="lines+markers", line=dict(color=_color(2), dash="dash")))
    tol = next(iter(traces.values())).tol
    if tol > 0:
        fig.add_hline(y=tol, line=dict(dash="dot", color="grey"), annotation_text=f"tol {tol:g}")
    iterations = max(t.iterations for t in traces.values())
    converged = sum(t.converged for t in traces.values())
    fig.update_layout(
        title=title or f"Karcher convergence: {iterations} steps, {converged}/{len(traces)} tensors converged",
        template="plotly_white", xaxis_title="iteration k", yaxis_title="‖v‖", yaxis_type="log",
    )
    return fig


def norm_ratio_figure(table: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Bars of ``norm_ratio`` = ‖θ*‖ / Σ α_i ‖θ_i‖ per tensor (from
    :func:`karcher_lab.diagnostics.weight_metrics`), a dotted line at 1 (below 1: norm shrinkage)."""
    rows = table[(table["metric"] == "norm_ratio") & table["other"].isna()] if "other" in table else table
    rows = rows[rows["metric"] == "norm_ratio"]
    if rows.empty:
        raise InputError("norm_ratio_figure: the table has no norm_ratio rows")
    names = [str(name).removeprefix("model.") for name in rows["tensor"]]
    fig = go.Figure(go.Bar(x=names, y=rows["mean"].tolist(), name="norm ratio", marker_color=_color(0)))
    fig.add_hline(y=1.0, line=dict(dash="dot", color="grey"))
    fig.update_layout(
        title=title or f"norm ratio ‖merged‖ / mean ‖expert‖ per tensor (min {rows['mean'].min():.3f})",
        template="plotly_white", yaxis_title="norm ratio", xaxis=dict(showticklabels=len(names) <= 40),
    )
    return fig


def band_curves(
    table: pd.DataFrame, *, series: str, x: str = "layer", title: str | None = None, y_title: str | None = None,
    names: Sequence[str] | None = None,
) -> go.Figure:
    """One curve per value of column ``series`` (mean against ``x``) with a filled band from mean − std
    to mean + std (std NaN: no band). Per series, three traces in this order: the band's lower edge
    (invisible line), the upper edge filled down to it (``fill="tonexty"``), then the mean line.
    ``names`` fixes which series appear and in what order (default: order of appearance)."""
    missing = [c for c in (series, x, "mean", "std") if c not in table.columns]
    if missing:
        raise InputError(f"band_curves needs columns {[series, x, 'mean', 'std']}; missing {missing}")
    order = list(dict.fromkeys(table[series])) if names is None else list(names)
    fig = go.Figure()
    for index, name in enumerate(order):
        group = table[table[series] == name].sort_values(x)
        color = _color(index)
        mean = group["mean"].to_numpy(float)
        std = np.nan_to_num(group["std"].to_numpy(float))
        xs = group[x].tolist()
        fig.add_trace(go.Scatter(x=xs, y=(mean - std).tolist(), mode="lines", line=dict(width=0, color=color),
                                 legendgroup=str(name), showlegend=False, hoverinfo="skip", name=f"{name} − std"))
        fig.add_trace(go.Scatter(x=xs, y=(mean + std).tolist(), mode="lines", line=dict(width=0, color=color),
                                 fill="tonexty", fillcolor=_rgba(color, BAND_OPACITY), legendgroup=str(name),
                                 showlegend=False, hoverinfo="skip", name=f"{name} + std"))
        fig.add_trace(go.Scatter(x=xs, y=mean.tolist(), mode="lines+markers", line=dict(color=color),
                                 legendgroup=str(name), name=str(name)))
    if y_title is not None and y_title.endswith("_ratio"):
        fig.add_hline(y=1.0, line=dict(dash="dot", color="grey"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title=x,
                      yaxis_title=TITLES.get(y_title, y_title) if y_title else None)
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def figure_widget(figure: go.Figure | None = None, css_class: str = "kl-figure") -> go.FigureWidget:
    """An empty (or ``figure``-initialized) FigureWidget carrying ``css_class`` for the browser test."""
    widget = go.FigureWidget(figure) if figure is not None else go.FigureWidget()
    widget.add_class(css_class)
    return widget


__all__ = ["band_curves", "convergence_figure", "figure_widget", "norm_ratio_figure"]
