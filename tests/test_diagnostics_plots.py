"""Plotly figures from the diagnostics' tidy tables: the figure's data is the table's."""
import pandas as pd
import pytest

from karcher_lab import plots
from karcher_lab.errors import InputError


def _collapse_table():
    rows = []
    for model, scale in (("linear", 0.5), ("karcher", 1.0)):
        for site in ("residual", "mlp"):
            for layer in range(3):
                for metric in ("variance_ratio", "effective_rank_ratio"):
                    rows.append(dict(model=model, site=site, layer=layer, metric=metric,
                                     mean=scale * (layer + 1) + (site == "mlp"), std=0.1 * layer, point=0.0, draws=10))
    return pd.DataFrame(rows)


def test_layer_curves_plot_the_means_per_model_and_metric():
    fig = plots.layer_curves(_collapse_table())
    assert len(fig.data) == 4  # 2 metrics × 2 models, residual only
    linear = [t for t in fig.data if t.name == "linear"]
    assert list(linear[0].x) == [0, 1, 2] and list(linear[0].y) == [0.5, 1.0, 1.5]
    assert list(linear[0].error_y.array) == [0.0, 0.1, 0.2]
    assert [t.showlegend for t in linear] == [True, False]
    assert len(fig.layout.shapes) == 2  # a reference line at 1 on each ratio panel
    assert (fig.layout.xaxis.tick0, fig.layout.xaxis.dtick, fig.layout.xaxis2.dtick) == (0, 1, 1)  # whole layers
    thirty = pd.concat([_collapse_table().assign(layer=lambda t, k=k: t["layer"] + 3 * k) for k in range(10)])
    assert plots.layer_curves(thirty).layout.xaxis.dtick == 3  # 30 layers: every third
    both_sites = plots.layer_curves(_collapse_table(), ["variance_ratio"], site=None)
    assert sorted(t.name for t in both_sites.data) == ["karcher / mlp", "karcher / residual", "linear / mlp", "linear / residual"]


def test_layer_curves_skip_rows_outside_the_blocks():
    table = pd.DataFrame([
        dict(model="m", other=None, layer=0, metric="norm_ratio", mean=0.9, std=0.01, tensors=3),
        dict(model="m", other=None, layer=pd.NA, metric="norm_ratio", mean=0.5, std=float("nan"), tensors=1),
    ])
    table["layer"] = table["layer"].astype("Int64")
    fig = plots.layer_curves(table)
    assert list(fig.data[0].y) == [0.9]
    assert len(fig.layout.shapes) == 1  # norm_ratio is a ratio: reference line at 1


def test_task_bars():
    table = pd.DataFrame([
        dict(model="linear", task="a", metric="accuracy", mean=0.2, std=0.1, n=5),
        dict(model="linear", task="b", metric="accuracy", mean=0.4, std=0.1, n=5),
        dict(model="karcher", task="a", metric="accuracy", mean=0.6, std=0.1, n=5),
        dict(model="karcher", task="a", metric="nll", mean=2.0, std=0.1, n=5),
    ])
    fig = plots.task_bars(table)
    assert [t.name for t in fig.data] == ["linear", "karcher"]
    assert list(fig.data[0].x) == ["a", "b"] and list(fig.data[0].y) == [0.2, 0.4]
    with pytest.raises(InputError, match="perplexity"):
        plots.task_bars(table, "perplexity")


def test_angle_heatmaps_one_symmetric_grid_per_layer_with_a_slider():
    rows = []
    for layer, base in ((0, 10.0), (1, 20.0), (pd.NA, 30.0)):
        for (a, b), extra in ((("x", "y"), 1.0), (("x", "z"), 2.0), (("y", "z"), 3.0)):
            for tensor in ("t1", "t2"):
                rows.append(dict(model=a, other=b, tensor=tensor, layer=layer, metric="angle_deg",
                                 mean=base + extra + (tensor == "t2"), std=float("nan")))
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    fig = plots.angle_heatmaps(table)
    assert [t.name for t in fig.data] == ["layer 0", "layer 1", "layer other"]
    grid = fig.data[1].z  # layer 1: mean over the two tensors
    assert grid[0][1] == grid[1][0] == pytest.approx(21.5)
    assert grid[1][2] == pytest.approx(23.5) and grid[2][2] == 0.0
    steps = fig.layout.sliders[0].steps
    assert len(steps) == 3 and steps[2].args[0]["visible"] == [False, False, True]
    assert [t.visible for t in fig.data] == [True, False, False]


def test_bad_tables():
    with pytest.raises(InputError, match="missing"):
        plots.layer_curves(pd.DataFrame({"model": ["m"]}))
    with pytest.raises(InputError, match="empty"):
        plots.task_bars(pd.DataFrame(columns=["model", "task", "metric", "mean", "std"]))
    with pytest.raises(InputError, match="no rows"):
        plots.layer_curves(_collapse_table(), ["variance"])
