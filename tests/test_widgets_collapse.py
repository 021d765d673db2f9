"""CollapseViewer on a synthetic sweep table with known means and stds; figure helpers of the panels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from karcher_lab.errors import InputError
from karcher_lab.experiment import RESULT_COLUMNS
from karcher_lab.geometry.karcher_mean import KarcherTrace
from karcher_lab.widgets import CollapseViewer
from karcher_lab.widgets.figure_sync import sync_figure
from karcher_lab.widgets.figures import band_curves, convergence_figure, norm_ratio_figure

LAYERS = 4


def mean_std(method: str, m: int, metric: str, layer: int) -> tuple[float, float]:
    """Known values: distinct for every method, m, metric and layer."""
    base = {"linear": 0.5, "karcher": 0.9, "ties": 0.7}[method] + 0.01 * m + {"variance_ratio": 0.0, "effective_rank_ratio": 0.05}[metric]
    return base - 0.02 * layer, 0.01 * (layer + 1) + 0.001 * m


def synthetic_results() -> pd.DataFrame:
    rows = []
    for method in ("linear", "karcher", "ties"):
        for m in (2, 3):
            experts = "+".join(["a", "b", "c"][:m])
            for metric in ("variance_ratio", "effective_rank_ratio"):
                for layer in range(LAYERS):
                    mean, std = mean_std(method, m, metric, layer)
                    rows.append(dict(pool="micro", order="far", method=method, m=m, experts=experts, scope="layer",
                                     task="", site="residual", layer=layer, metric=metric, mean=mean, std=std))
            rows.append(dict(pool="micro", order="far", method=method, m=m, experts=experts, scope="task", task="a",
                             site="", layer=-1, metric="nll", mean=1.0, std=0.1))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def bands(figure) -> dict[str, tuple[list, list, list]]:
    """Per series: (lower edge, upper edge, mean) from band_curves' three traces."""
    data = figure.data
    return {data[i + 2].name: (list(data[i].y), list(data[i + 1].y), list(data[i + 2].y)) for i in range(0, len(data), 3)}


def expected_band(method, m, metric):
    means, stds = zip(*(mean_std(method, m, metric, layer) for layer in range(LAYERS)))
    means, stds = np.array(means), np.array(stds)
    return means - stds, means + stds, means


def test_bands_are_mean_plus_minus_std_and_update_in_place(tmp_path):
    viewer = CollapseViewer(synthetic_results(), methods=["linear", "karcher"], m=3, metric="variance_ratio")
    assert viewer.error == "" and "kl-figure" in viewer.figure._dom_classes
    figure = viewer.figure
    shown = bands(figure)
    assert set(shown) == {"linear", "karcher"}
    for method, (low, high, mean) in shown.items():
        for got, want in zip((low, high, mean), expected_band(method, 3, "variance_ratio")):
            np.testing.assert_allclose(got, want, rtol=1e-12)
    assert figure.data[1].fill == "tonexty" and list(figure.data[0].x) == list(range(LAYERS))

    viewer.metric_dropdown.value = "effective_rank_ratio"
    viewer.m_dropdown.value = 2
    viewer.method_select.value = ("linear", "karcher", "ties")
    assert viewer.figure is figure and viewer.error == ""
    shown = bands(figure)
    assert set(shown) == {"linear", "karcher", "ties"}
    for method, (low, high, mean) in shown.items():
        for got, want in zip((low, high, mean), expected_band(method, 2, "effective_rank_ratio")):
            np.testing.assert_allclose(got, want, rtol=1e-12)

    weights = pd.DataFrame([dict(pool="micro", order="far", method="linear", m=3, experts="a+b+c", scope="weights", task="",
                                 site="", layer=layer, metric="norm_ratio", mean=0.8 + 0.01 * layer, std=0.02)
                            for layer in range(LAYERS)], columns=RESULT_COLUMNS)
    viewer = CollapseViewer(pd.concat([synthetic_results(), weights]), methods=["linear"], m=3, metric="norm_ratio", site="")
    low, high, mean = bands(viewer.figure)["linear"]
    np.testing.assert_allclose(high, [0.82 + 0.01 * layer for layer in range(LAYERS)])

    path = tmp_path / "results.csv"
    synthetic_results().to_csv(path, index=False)
    from_csv = CollapseViewer(path, methods=["ties"], m=2, metric="variance_ratio")
    np.testing.assert_allclose(bands(from_csv.figure)["ties"][1], expected_band("ties", 2, "variance_ratio")[1])


def test_viewer_errors():
    table = synthetic_results()
    with pytest.raises(InputError, match="no per-layer rows"):
        CollapseViewer(table[table["scope"] == "task"])
    with pytest.raises(InputError, match="lacks column"):
        CollapseViewer(table.drop(columns=["std"]))
    with pytest.raises(InputError, match="not in the results"):
        CollapseViewer(table, methods=["dare"])
    viewer = CollapseViewer(table)
    viewer.method_select.value = ()
    assert viewer.error.startswith("InputError") and "no method" in viewer.error
    mixed = pd.concat([table, table.assign(experts="x+y+z")])  # two rows per method and layer
    assert not CollapseViewer(mixed).update()


def test_sync_figure_mutates_the_widget_in_place():
    widget = go.FigureWidget()
    widget.add_class("kl-figure")
    sync_figure(widget, go.Figure([go.Scatter(x=[0, 1], y=[1, 2], name="a"), go.Bar(x=["p"], y=[3])]), height=300)
    assert [t.type for t in widget.data] == ["scatter", "bar"] and widget.layout.height == 300
    first = widget.data[0]
    sync_figure(widget, go.Figure([go.Scatter(x=[0, 1, 2], y=[5, 6, 7], name="b")], layout=dict(title="t")))
    assert len(widget.data) == 1 and widget.data[0] is first
    assert list(widget.data[0].y) == [5, 6, 7] and widget.data[0].name == "b" and widget.layout.title.text == "t"
    assert widget._dom_classes == ("kl-figure",)


def trace(residuals, tol=1e-3):
    r = torch.tensor(residuals, dtype=torch.float64)
    return KarcherTrace(r, r[-1:], torch.tensor([len(residuals) - 1]), tol=tol, eta=1.0, max_iter=100)


def test_convergence_and_norm_figures():
    fig = convergence_figure({"a": trace([1.0, 0.1, 1e-4]), "b": trace([0.5, 0.2, 0.01, 1e-4])})
    np.testing.assert_allclose(fig.data[0].y, [1.0, 0.2, 0.01, 1e-4])  # max over tensors still iterating
    np.testing.assert_allclose(fig.data[1].y, [0.75, 0.15, 0.00505, 1e-4])  # median
    assert "3 steps, 2/2 tensors converged" in fig.layout.title.text
    assert len(convergence_figure({}).data) == 0
    table = pd.DataFrame(dict(model="merged", other=[None, None, "e"], tensor=["model.a", "model.b", "model.a"],
                              layer=[0, 0, 0], metric=["norm_ratio", "norm_ratio", "angle_deg"], mean=[0.8, 1.0, 30.0],
                              std=float("nan")))
    fig = norm_ratio_figure(table)
    assert list(fig.data[0].x) == ["a", "b"] and list(fig.data[0].y) == [0.8, 1.0]
    with pytest.raises(InputError):
        norm_ratio_figure(table[table["metric"] == "angle_deg"])
    with pytest.raises(InputError, match="missing"):
        band_curves(table, series="method")
