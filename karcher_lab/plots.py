"""Plotly figures from the diagnostics' tidy tables (karcher_lab.diagnostics).

- :func:`layer_curves`: one panel per metric, the layer on x, one line per model with ± std error bars
  (the paper's Figure 2 from :func:`~karcher_lab.diagnostics.collapse.collapse_metrics`; collapse ratios
  from :func:`~karcher_lab.diagnostics.collapse.collapse_ratios` get a dotted line at 1; per-layer weight
  metrics from :func:`~karcher_lab.diagnostics.weights.layer_summary`).
- :func:`task_bars`: per-task bars, one group per task and one bar per model, ± std (from
  :func:`~karcher_lab.diagnostics.function.task_quality`, ``function_distance`` or ``normalized_accuracy``).
- :func:`angle_heatmaps`: the experts' pairwise angles as an N × N heatmap per layer, with a slider over
  the layers (from :func:`~karcher_lab.diagnostics.weights.expert_angles`).

Every function returns a ``plotly.graph_objects.Figure`` (wrap it in ``go.FigureWidget`` for notebooks).
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from karcher_lab.errors import InputError

TITLES = {
    "variance": "activation variance", "effective_rank": "effective rank", "numerical_rank": "numerical rank",
    "variance_ratio": "variance ratio", "effective_rank_ratio": "effective-rank ratio",
    "numerical_rank_ratio": "numerical-rank ratio",
}


def _require(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{what} needs a table with columns {list(columns)}; missing {missing}")
    if table.empty:
        raise InputError(f"{what}: the table is empty")


LAYER_TICKS = 10
"""Layer axes show every k-th layer, k = ⌈layers / LAYER_TICKS⌉ (never a fractional layer)."""


def layer_curves(
    table: pd.DataFrame, metrics: Sequence[str] | None = None, *, site: str | None = "residual", title: str | None = None,
) -> go.Figure:
    """Layerwise curves: a panel per metric (default: every metric in the table, in order), a line per
    model, ± std error bars. ``site`` selects one activation site where the table has a ``site``
    column (None keeps them all, as separate lines). Ratio metrics (names ending in ``_ratio``, e.g.
    ``variance_ratio``, ``norm_ratio``) get a dotted reference line at 1."""
    _require(table, ["model", "layer", "metric", "mean", "std"], "layer_curves")
    if site is not None and "site" in table.columns:
        table = table[table["site"] == site]
    table = table[table["layer"].notna()]
    metrics = list(dict.fromkeys(table["metric"])) if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in set(table["metric"])]
    if unknown or not metrics:
        raise InputError(f"layer_curves: no rows for metric(s) {unknown or metrics}")
    fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[TITLES.get(m, m) for m in metrics])
    keys = ["model"] + (["site"] if "site" in table.columns and site is None else [])
    colors = {}
    for row, metric in enumerate(metrics, start=1):
        for key, group in table[table["metric"] == metric].groupby(keys, sort=False):
            name = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            colors.setdefault(name, len(colors))
            group = group.sort_values("layer")
            fig.add_trace(go.Scatter(
                x=group["layer"].astype(int).tolist(), y=group["mean"].tolist(), name=name, legendgroup=name,
                showlegend=row == 1, mode="lines+markers",
                line=dict(color=_color(colors[name])),
                error_y=dict(type="data", array=group["std"].fillna(0).tolist(), visible=True),
            ), row=row, col=1)
        if metric.endswith("_ratio"):
            fig.add_hline(y=1.0, line=dict(dash="dot", color="grey"), row=row, col=1)
    fig.update_xaxes(title_text="layer", row=len(metrics), col=1)
    layers = table["layer"].nunique()
    fig.update_xaxes(tick0=0, dtick=-(-layers // LAYER_TICKS))  # whole layers only, at most ~LAYER_TICKS ticks
    fig.update_layout(height=260 * len(metrics) + 80, title=title, template="plotly_white")
    return fig


def task_bars(table: pd.DataFrame, metric: str = "accuracy", *, title: str | None = None) -> go.Figure:
    """Grouped bars of ``metric`` per task, one bar per model, ± std."""
    _require(table, ["model", "task", "metric", "mean", "std"], "task_bars")
    rows = table[table["metric"] == metric]
    if rows.empty:
        raise InputError(f"task_bars: no rows for metric {metric!r}; the table has {sorted(set(table['metric']))}")
    fig = go.Figure()
    for i, (model, group) in enumerate(rows.groupby("model", sort=False)):
        fig.add_trace(go.Bar(
            x=group["task"].tolist(), y=group["mean"].tolist(), name=str(model), marker_color=_color(i),
            error_y=dict(type="data", array=group["std"].fillna(0).tolist(), visible=True),
        ))
    fig.update_layout(barmode="group", yaxis_title=metric, xaxis_title="task", title=title, template="plotly_white")
    return fig


def angle_heatmaps(table: pd.DataFrame, metric: str = "angle_deg", *, title: str | None = None) -> go.Figure:
    """N × N heatmaps of ``metric`` (``angle_deg`` or ``task_vector_angle_deg``) between the experts,
    averaged over each layer's tensors, one per layer (tensors outside the blocks: "other"), with a
    slider to move between layers."""
    _require(table, ["model", "other", "layer", "metric", "mean"], "angle_heatmaps")
    rows = table[table["metric"] == metric]
    if rows.empty:
        raise InputError(f"angle_heatmaps: no rows for metric {metric!r}")
    names = list(dict.fromkeys(list(rows["model"]) + list(rows["other"])))
    layers = rows["layer"].astype("object").where(rows["layer"].notna(), "other")
    means = rows.assign(layer=layers).groupby(["layer", "model", "other"], sort=False)["mean"].mean()
    labels = sorted({k[0] for k in means.index}, key=lambda x: (isinstance(x, str), x))
    fig = go.Figure()
    top = float(rows["mean"].max())
    for index, layer in enumerate(labels):
        grid = [[0.0 if a == b else None for b in names] for a in names]
        for (lay, a, b), value in means.items():
            if lay == layer:
                grid[names.index(a)][names.index(b)] = grid[names.index(b)][names.index(a)] = float(value)
        fig.add_trace(go.Heatmap(z=grid, x=names, y=names, zmin=0, zmax=top, colorscale="Viridis",
                                 colorbar=dict(title="degrees"), visible=index == 0, name=f"layer {layer}"))
    steps = [dict(method="update", label=str(layer), args=[{"visible": [i == k for k in range(len(labels))]},
                                                           {"title": f"{title or metric}: layer {layer}"}])
             for i, layer in enumerate(labels)]
    fig.update_layout(sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="layer "))],
                      title=f"{title or metric}: layer {labels[0]}", template="plotly_white",
                      yaxis=dict(autorange="reversed"))
    return fig


def _color(index: int) -> str:
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
    return palette[index % len(palette)]


def sweep_curves(
    summary: pd.DataFrame, metrics: Sequence[str] = ("avg_normalized_accuracy", "avg_nll"), *, title: str | None = None,
    highlight: str | None = "karcher",
) -> go.Figure:
    """The paper's Figure 1 from a sweep's results (:mod:`karcher_lab.experiment`): a panel per metric
    (rows) and per expert order (columns), the number m of merged experts on x, a line per method.
    ``summary``: rows with columns order, method, m, metric, mean, std (e.g. the ``summary`` scope);
    the std (over tasks or layers) shows on hover. The ``highlight`` method's line is thick and black."""
    _require(summary, ["order", "method", "m", "metric", "mean", "std"], "sweep_curves")
    metrics = list(metrics)
    missing = [m for m in metrics if m not in set(summary["metric"])]
    if missing:
        raise InputError(f"sweep_curves: no rows for metric(s) {missing}")
    orders = list(dict.fromkeys(summary["order"]))
    fig = make_subplots(rows=len(metrics), cols=len(orders), shared_xaxes=True, vertical_spacing=0.08,
                        horizontal_spacing=0.06,
                        subplot_titles=[f"{TITLES.get(m, m.replace('_', ' '))} · order {o}" for m in metrics for o in orders])
    methods = list(dict.fromkeys(summary["method"]))
    for row, metric in enumerate(metrics, start=1):
        for col, order in enumerate(orders, start=1):
            rows = summary[(summary["metric"] == metric) & (summary["order"] == order)]
            for index, method in enumerate(methods):
                group = rows[rows["method"] == method].sort_values("m")
                if group.empty:
                    continue
                fig.add_trace(go.Scatter(
                    x=group["m"].astype(int).tolist(), y=group["mean"].tolist(), name=method, legendgroup=method,
                    showlegend=row == 1 and col == 1, mode="lines+markers",
                    line=dict(color="black", width=3.5) if method == highlight else
                    dict(color=_color(index), width=1.5, dash="solid" if index < 10 else "dash"),
                    customdata=group["std"].fillna(0).tolist(),
                    hovertemplate=f"{method}<br>m=%{{x}}<br>%{{y:.3f}} ± %{{customdata:.3f}}<extra></extra>",
                ), row=row, col=col)
            if metric.endswith("_ratio") or metric == "avg_normalized_accuracy":
                fig.add_hline(y=1.0, line=dict(dash="dot", color="grey"), row=row, col=col)
        fig.update_yaxes(title_text=metric.replace("avg_", "mean ").replace("_", " "), row=row, col=1)
    for col in range(1, len(orders) + 1):
        fig.update_xaxes(title_text="m (experts merged)", dtick=1, row=len(metrics), col=col)
    fig.update_layout(height=300 * len(metrics) + 100, title=title, template="plotly_white")
    return fig
