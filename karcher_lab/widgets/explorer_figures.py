"""The merge explorer's figures, one FigureWidget each (CSS class ``kl-figure``), refreshed in place stage
by stage as the numbers of an update arrive.

- weights stage: the Karcher convergence trace (:func:`~karcher_lab.widgets.figures.convergence_figure`)
  and the norm ratio per tensor (:func:`~karcher_lab.widgets.figures.norm_ratio_figure`);
- function stage: exact match (when measured), answer NLL and KL(expert ‖ merged) per task, merged model
  next to the experts (:func:`karcher_lab.plots.task_bars`);
- layer stage: variance, effective rank and numerical rank per layer, merged model and experts, mean ±
  std over bootstrap draws (:func:`karcher_lab.plots.layer_curves`); where the model's activations
  cannot be read at the figure's site, an empty figure that says why.
"""
from __future__ import annotations

import html
import textwrap
from typing import Any, Mapping

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from karcher_lab.plots import layer_curves, task_bars
from karcher_lab.widgets.figure_sync import sync_figure
from karcher_lab.widgets.figures import convergence_figure, figure_widget, norm_ratio_figure

COLLAPSE_METRICS = ("variance", "effective_rank", "numerical_rank")
NARROW = dict(width=320, height=330, margin=dict(l=50, r=10, t=50, b=40), legend=dict(orientation="h", y=-0.25))
WIDE = dict(width=480, height=360, margin=dict(l=60, r=10, t=50, b=40))
FULL_WIDTH = 960
"""Figure widths in pixels: three narrow or two wide figures fit a JupyterLab output area ~1000 px wide."""
NOTE_HEIGHT = 220
"""The layer figure's height in pixels when it only holds a note (no layer metrics at its site)."""
NOTE_LINE = 120
"""Characters per line of that note."""
LAYER_TITLE = "layer metrics: merged vs experts (mean ± std over bootstrap draws)"
"""The layer figure's title, over its curves or its note."""


class ExplorerFigures:
    """The six figures of a merge explorer and their layout.

    Parameters
    ----------
    exact_match : bool
        Whether the exact-match figure is shown (it stays empty otherwise).
    site : str
        The activation site the layer figure shows.

    Attributes
    ----------
    accuracy, nll, kl, collapse, convergence, norm : plotly.graph_objects.FigureWidget
    widgets : list of FigureWidget
        All six.
    box : ipywidgets.VBox
        The layout: a row of quality figures, a row of the convergence and norm figures, the layer figure.
    """

    def __init__(self, *, exact_match: bool, site: str):
        self.exact_match, self.site = exact_match, site
        self.accuracy, self.nll, self.kl = figure_widget(), figure_widget(), figure_widget()
        self.collapse, self.convergence, self.norm = figure_widget(), figure_widget(), figure_widget()
        self.widgets = [self.accuracy, self.nll, self.kl, self.collapse, self.convergence, self.norm]
        quality_row = [self.accuracy, self.nll, self.kl] if exact_match else [self.nll, self.kl]
        self.box = widgets.VBox([widgets.HBox(quality_row), widgets.HBox([self.convergence, self.norm]), self.collapse])

    def show_weights(self, traces: Mapping[str, Any], weights: pd.DataFrame) -> None:
        """The convergence trace (``traces``: tensor name → KarcherTrace; empty for closed-form methods)
        and the norm ratios (``norm_ratio`` rows)."""
        sync_figure(self.convergence, convergence_figure(traces), **WIDE)
        sync_figure(self.norm, norm_ratio_figure(weights), **WIDE)

    def show_function(self, quality: pd.DataFrame, distance: pd.DataFrame) -> None:
        """Quality bars (merged and experts: ``accuracy`` when measured, ``nll``) and KL bars per task."""
        if self.exact_match:
            sync_figure(self.accuracy, task_bars(quality, "accuracy", title="exact match"), **NARROW)
        sync_figure(self.nll, task_bars(quality, "nll", title="answer NLL (nats/token)"), **NARROW)
        sync_figure(self.kl, task_bars(distance, "kl", title="KL(expert ‖ merged), own task"), **NARROW)

    def show_layers(self, collapse: pd.DataFrame, note: str = "") -> None:
        """Layer curves of the collapse metrics at the figure's site, one curve per model; when
        ``collapse`` has no rows at that site, an empty figure showing ``note`` (why the layer metrics
        are unavailable, :class:`~karcher_lab.measurement.results.LayerMetrics`)."""
        if (collapse["site"] == self.site).any():
            sync_figure(self.collapse, layer_curves(collapse, list(COLLAPSE_METRICS), site=self.site, title=LAYER_TITLE),
                        width=FULL_WIDTH)
            return
        text = "<br>".join(textwrap.wrap(html.escape(note or f"no layer metrics at site {self.site!r}"), NOTE_LINE))
        figure = go.Figure()
        figure.update_layout(title=LAYER_TITLE, template="plotly_white", height=NOTE_HEIGHT,
                             xaxis=dict(visible=False), yaxis=dict(visible=False),
                             annotations=[dict(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)])
        sync_figure(self.collapse, figure, width=FULL_WIDTH)
