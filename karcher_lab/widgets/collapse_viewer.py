"""CollapseViewer: layer curves with ± std bands from sweep results (karcher_lab.experiment).

It opens on a results table, or on a :class:`~karcher_lab.study.Study` (or a study YAML), whose sweep it
runs first (:func:`sweep_results`; resumable, so a reopened viewer reads the finished run). The results
table has the columns of :data:`karcher_lab.experiment.RESULT_COLUMNS`; the viewer reads its per-layer rows (scope ``layer``, and scope ``weights`` rows that have a layer, e.g. a
per-layer ``norm_ratio``). Controls: pool and order (shown only when the table has several), the
number of merged experts m, the activation site, the metric, and the methods (several at once). The
figure shows, for each chosen method, the metric's mean against the layer with a band from mean − std
to mean + std (:func:`karcher_lab.widgets.figures.band_curves`); ratio metrics get a line at 1.
Changing a control updates the one FigureWidget in place (CSS class ``kl-figure``); an error (e.g. a
selection matching two rows per layer) goes to the ``kl-error`` area. The viewer is an
``ipywidgets.VBox``: evaluate it in a notebook to show it.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import ipywidgets as widgets
import pandas as pd

from karcher_lab.errors import InputError
from karcher_lab.experiment import RESULT_COLUMNS, load_results, run_sweep
from karcher_lab.study import Study, as_study
from karcher_lab.widgets.controls import STYLE
from karcher_lab.widgets.figure_sync import sync_figure
from karcher_lab.widgets.figures import band_curves, figure_widget

ERROR_CLASS = "kl-error"
PREFERRED_METRICS = ("variance_ratio", "effective_rank_ratio", "numerical_rank_ratio", "variance", "effective_rank", "numerical_rank")


SWEEP_RUNS = "runs"
"""Where a study's sweep is written when ``sweep`` names no ``out``: ``runs/<study name>``."""


def sweep_results(study: Study, sweep: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The results of ``study``'s sweep (:func:`karcher_lab.experiment.run_sweep`, resumed when its run
    directory holds cells already). ``sweep``: run_sweep's keyword arguments; defaults ``out`` =
    ``runs/<study name>``, ``m_values`` = 2 … the number of experts, no progress bars, no report."""
    options = dict(out=Path(SWEEP_RUNS) / study.name, m_values=(f"2..{len(study.experts)}",), progress=False,
                   report=False, log=None)
    options.update(sweep or {})
    return run_sweep(study, **options)


def read_results(results: pd.DataFrame | Study | str | os.PathLike,
                 sweep: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The results table: a DataFrame with :data:`RESULT_COLUMNS` as given, a CSV path / run directory
    read by :func:`karcher_lab.experiment.load_results`, or a Study / study YAML's :func:`sweep_results`
    (``sweep`` is only for a study)."""
    study = as_study(results)
    if study is not None:
        return sweep_results(study, sweep)
    if sweep is not None:
        raise InputError("sweep options are for a study; the results given are a table, a CSV or a run directory")
    if isinstance(results, pd.DataFrame):
        missing = [c for c in RESULT_COLUMNS if c not in results.columns]
        if missing:
            raise InputError(f"results table lacks column(s) {missing}; expected {RESULT_COLUMNS}")
        return results
    return load_results(results)


class CollapseViewer(widgets.VBox):
    """Layer curves of sweep results with ± std bands (see the module docstring).

    ``results``: a DataFrame, a ``results.csv`` path, a run directory, or a Study / study YAML whose
    sweep is run (or resumed) first with the ``sweep`` options (:func:`sweep_results`). ``methods``,
    ``m``, ``metric``, ``site``: the initial choices (defaults: every method but the experts, the
    largest m, a ratio metric if present, the first site)."""

    def __init__(
        self,
        results: pd.DataFrame | Study | str | os.PathLike,
        *,
        methods: Sequence[str] | None = None,
        m: int | None = None,
        metric: str | None = None,
        site: str | None = None,
        sweep: Mapping[str, Any] | None = None,
    ):
        table = read_results(results, sweep)
        per_layer = (table["scope"] == "layer") | ((table["scope"] == "weights") & (table["layer"] >= 0))
        self.table = table[per_layer].reset_index(drop=True)
        if self.table.empty:
            raise InputError("the results hold no per-layer rows (scope 'layer', or 'weights' with a layer): nothing to draw")
        t = self.table
        metrics = list(dict.fromkeys(t["metric"]))
        metric = metric or next((x for x in PREFERRED_METRICS if x in metrics), metrics[0])
        merged = t[t["method"] != "expert"]
        ms = sorted({int(x) for x in (merged if not merged.empty else t)["m"]})
        all_methods = list(dict.fromkeys((merged if not merged.empty else t)["method"]))
        for name, value, options in (("metric", metric, metrics), ("m", m, ms), ("site", site, list(dict.fromkeys(t["site"])))):
            if value is not None and value not in options:
                raise InputError(f"{name} {value!r} is not in the results; they have {options}")
        unknown = [x for x in (methods or []) if x not in set(t["method"])]
        if unknown:
            raise InputError(f"method(s) {unknown} are not in the results; they have {sorted(set(t['method']))}")

        self.pool_dropdown = self._dropdown("pool", list(dict.fromkeys(t["pool"])))
        self.order_dropdown = self._dropdown("order", list(dict.fromkeys(x for x in t["order"] if x != "")) or [""])
        self.m_dropdown = self._dropdown("m", ms, m if m is not None else ms[-1])
        self.site_dropdown = self._dropdown("site", list(dict.fromkeys(t["site"])), site)
        self.metric_dropdown = self._dropdown("metric", metrics, metric)
        self.method_select = widgets.SelectMultiple(options=list(dict.fromkeys(t["method"])),
                                                    value=tuple(methods or all_methods), description="methods",
                                                    rows=min(8, len(set(t["method"]))), style=STYLE)
        self.error_area = widgets.HTML("")
        self.error_area.add_class(ERROR_CLASS)
        self.figure = figure_widget()
        controls = [self.pool_dropdown, self.order_dropdown, self.m_dropdown, self.site_dropdown, self.metric_dropdown]
        for control in [*controls, self.method_select]:
            control.observe(lambda change: self.update(), "value")
        super().__init__([widgets.HBox([widgets.VBox(controls), self.method_select]), self.error_area, self.figure])
        self.update()

    @staticmethod
    def _dropdown(name: str, options: list, value=None) -> widgets.Dropdown:
        dropdown = widgets.Dropdown(options=options, value=value if value is not None else options[0],
                                    description=name, style=STYLE)
        if len(options) < 2:
            dropdown.layout.display = "none"
        return dropdown

    def selection(self) -> pd.DataFrame:
        """The rows the controls select: one per method and layer (InputError when a method has two)."""
        t = self.table
        methods = list(self.method_select.value)
        if not methods:
            raise InputError("no method is selected")
        expert = t["method"] == "expert"
        rows = t[(t["pool"] == self.pool_dropdown.value) & (t["site"] == self.site_dropdown.value)
                 & (t["metric"] == self.metric_dropdown.value) & t["method"].isin(methods)
                 & (expert | ((t["m"] == self.m_dropdown.value) & (t["order"] == self.order_dropdown.value)))]
        if rows.empty:
            raise InputError(f"no rows for methods {methods} at m = {self.m_dropdown.value}, "
                             f"site {self.site_dropdown.value!r}, metric {self.metric_dropdown.value!r}")
        # one curve per method; the experts (method "expert", m = 1) one curve each
        rows = rows.assign(series=rows["method"].where(rows["method"] != "expert", "expert:" + rows["experts"]))
        twice = rows[rows.duplicated(["series", "layer"])]
        if not twice.empty:
            raise InputError(f"several rows per layer for {sorted(set(twice['series']))}: the results mix runs "
                             f"(experts {sorted(set(twice['experts']))})")
        return rows

    def update(self) -> bool:
        """Redraw the figure in place from the current controls; False (error shown) on failure."""
        try:
            rows = self.selection()
            metric = self.metric_dropdown.value
            fig = band_curves(rows, series="series", x="layer", y_title=metric,
                              title=f"{metric} per layer, m = {self.m_dropdown.value} (mean ± std)")
            sync_figure(self.figure, fig, height=420)
        except Exception as exc:  # shown in the panel, never raised into the notebook
            self.error_area.value = f"<b>{html.escape(type(exc).__name__)}</b>: {html.escape(str(exc))}"
            return False
        self.error_area.value = ""
        return True

    @property
    def error(self) -> str:
        """The text of the error shown ("" when the figure is current)."""
        return html.unescape(self.error_area.value.replace("<b>", "").replace("</b>", ""))
