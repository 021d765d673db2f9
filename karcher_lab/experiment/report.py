"""The sweep's report: a self-contained HTML page (plotly's JavaScript inlined, no network needed) and
the console summary.

Sections: the Figure 1 analog (average normalized accuracy and NLL against m, a line per method, one
column per expert order) and collapse against m; the Figure 2 analog (layerwise activation variance and
effective rank of each method's merge and of its experts, at m = 2 and at the largest m); the Table 7
analog (those values per layer, mean ± std over bootstrap draws); the pool's heterogeneity (each
expert's level and pairwise task-vector angles, per layer).
"""
from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from karcher_lab import plots
from karcher_lab.diagnostics import expert_angles
from karcher_lab.experiment.grid import DEFAULT_METHODS, NAMED_ORDERS
from karcher_lab.experiment.measure import EXPERT
from karcher_lab.io import Checkpoint
from karcher_lab.zoo import Pool

FIGURE2_METRICS = ("variance", "effective_rank")
FIGURE2_METHODS = ("linear", "ties", "model_stock", "karcher")
"""The methods drawn in the Figure 2 analog (the paper's Lerp, Ties and Karcher, and model_stock) where
the sweep has them; the Table 7 analog below each figure lists every method."""


def summary_pivot(results: pd.DataFrame, metric: str = "avg_normalized_accuracy") -> pd.DataFrame:
    """``metric`` per (order, method) × m from the summary rows."""
    rows = results[(results["scope"] == "summary") & (results["metric"] == metric)]
    table = rows.pivot_table(index=["order", "method"], columns="m", values="mean")
    return table.loc[sorted(table.index, key=lambda key: (order_rank(key[0]), method_rank(key[1])))]


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: the paper's order of methods (:data:`DEFAULT_METHODS`), others after, by name."""
    return (DEFAULT_METHODS.index(method), "") if method in DEFAULT_METHODS else (len(DEFAULT_METHODS), method)


def order_rank(order: str) -> tuple[int, str]:
    """Sort key: near, far, pool, then explicit task lists by name."""
    return (NAMED_ORDERS.index(order), "") if order in NAMED_ORDERS else (len(NAMED_ORDERS), order)


def in_display_order(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` sorted by order, method (as :func:`order_rank`, :func:`method_rank`), m, site and layer."""
    keys = pd.DataFrame({"order": rows["order"].map(order_rank), "method": rows["method"].map(method_rank)}, index=rows.index)
    index = sorted(rows.index, key=lambda i: (keys.at[i, "order"], keys.at[i, "method"], rows.at[i, "m"],
                                              rows.at[i, "site"], rows.at[i, "layer"]))
    return rows.loc[index]


def summary_table(results: pd.DataFrame) -> str:
    """The console summary: mean normalized accuracy and mean answer NLL per method and m, per order."""
    parts = []
    for metric, what in (("avg_normalized_accuracy", "mean normalized accuracy (merged / expert exact match)"),
                         ("avg_nll", "mean answer NLL (nats/token)")):
        table = summary_pivot(results, metric)
        if not table.empty:
            parts.append(f"{what}, over the merged experts' tasks:\n{table.round(3).to_string(na_rep='-')}")
    return "\n\n".join(parts)


def layer_profile(results: pd.DataFrame, order: str, m: int, site: str = "residual") -> pd.DataFrame:
    """Per-layer ``FIGURE2_METRICS`` of every method's merge at (order, m), plus ``experts (mean)``: the
    mean over the merged experts of their own values (std over those experts). Columns model, layer,
    metric, mean, std."""
    layers = results[(results["scope"] == "layer") & (results["site"] == site) & results["metric"].isin(FIGURE2_METRICS)]
    cell = in_display_order(layers[(layers["order"] == order) & (layers["m"] == m) & (layers["method"] != EXPERT)])
    if cell.empty:
        return cell.assign(model=[])[["model", "layer", "metric", "mean", "std"]]
    tasks = cell["experts"].iloc[0].split("+")
    experts = layers[(layers["method"] == EXPERT) & layers["experts"].isin(tasks)]
    reference = experts.groupby(["layer", "metric"])["mean"].agg(["mean", "std"]).reset_index().assign(model="experts (mean)")
    merged = cell.rename(columns={"method": "model"})[["model", "layer", "metric", "mean", "std"]]
    return pd.concat([merged, reference[["model", "layer", "metric", "mean", "std"]]], ignore_index=True)


def table7(profile: pd.DataFrame) -> pd.DataFrame:
    """A layer profile as the paper's Table 7: a row per model, a column per (metric, layer), "mean ± std"."""
    cells = profile.assign(value=[f"{a:.4g} ± {b:.2g}" if b == b else f"{a:.4g}" for a, b in zip(profile["mean"], profile["std"])],
                           column=[f"{plots.TITLES.get(m, m)} L{int(l)}" for m, l in zip(profile["metric"], profile["layer"])])
    table = cells.pivot_table(index="model", columns="column", values="value", aggfunc="first", sort=False)
    return table.rename_axis(index=None, columns=None)


def _html_table(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.to_html(float_format=lambda x: f"{x:.{digits}f}", na_rep="–", border=0, classes="results")


def heterogeneity(pool: Pool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each expert's heterogeneity level and own-task quality, and the pairwise task-vector angles per
    tensor (:func:`karcher_lab.diagnostics.expert_angles`)."""
    levels = pd.DataFrame([{"task": e["task"], "level": e.get("level"), "accuracy": e.get("accuracy"),
                            "base accuracy": e.get("base_accuracy")} for e in pool.experts]).set_index("task")
    angles = expert_angles([Checkpoint(e["path"]) for e in pool.experts], base=Checkpoint(pool.base_path),
                           names=levels.index.tolist())
    return levels, angles


def write_report(results: pd.DataFrame, pool: Pool, path: str | os.PathLike) -> Path:
    """Write the self-contained HTML report of a sweep's ``results`` on ``pool`` to ``path``."""
    path = Path(path)
    merges = in_display_order(results[results["method"] != EXPERT])
    orders = list(dict.fromkeys(merges["order"]))
    summary = merges[merges["scope"] == "summary"]
    figures: list[tuple[str, object]] = []
    sections = [f"<h1>Merging sweep on pool {html.escape(pool.name)}</h1>",
                f"<p>{len(summary[['order', 'method', 'm']].drop_duplicates())} merges: orders {', '.join(orders)}; "
                f"m = {sorted(set(merges['m'].astype(int)))}; equal weights 1/m. Normalized accuracy = merged exact match / "
                f"the expert's own, averaged over the m merged experts' tasks (1 = no loss).</p>"]

    def figure(title: str, fig, note: str = "") -> None:
        figures.append((title, fig))
        sections.append(f"<h2>{html.escape(title)}</h2>" + (f"<p>{note}</p>" if note else "") + f"{{figure{len(figures) - 1}}}")

    figure("Figure 1 analog: function against the number of merged experts",
           plots.sweep_curves(summary, ("avg_normalized_accuracy", "avg_nll")),
           "Hover for ± std over the merged tasks. Order near: experts closest to the base first; far: farthest first.")
    sections.append("<h3>Mean normalized accuracy</h3>" + _html_table(summary_pivot(results)))
    sections.append("<h3>Mean answer NLL</h3>" + _html_table(summary_pivot(results, "avg_nll")))
    figure("Collapse against m", plots.sweep_curves(summary, ("avg_variance_ratio", "avg_effective_rank_ratio")),
           "Residual stream, mean over layers of merged / mean of the merged experts (paired bootstrap); below 1 = collapse.")
    for order in orders:
        ms = sorted(set(merges.loc[merges["order"] == order, "m"].astype(int)))
        for m in dict.fromkeys([ms[0], ms[-1]]):
            profile = layer_profile(results, order, m)
            if profile.empty:
                continue
            drawn = profile[profile["model"].isin([*FIGURE2_METHODS, "experts (mean)"])]
            curves = plots.layer_curves(drawn if drawn["model"].nunique() > 1 else profile, list(FIGURE2_METRICS), site=None,
                                        title=f"residual stream, order {order}, m = {m}").update_xaxes(dtick=1)
            figure(f"Figure 2 analog: order {order}, m = {m}", curves,
                   "Mean ± std over bootstrap draws of the probe set; 'experts (mean)' averages the merged experts' own values "
                   f"(std over the experts). Drawn: {', '.join(FIGURE2_METHODS)}; the table lists every method.")
            sections.append(f"<h3>Table 7 analog: order {html.escape(order)}, m = {m}</h3>" + _html_table(table7(profile)))
    levels, angles = heterogeneity(pool)
    tv = angles[angles["metric"] == "task_vector_angle_deg"]
    pairs = tv.groupby(["model", "other"])["mean"].mean()
    sections.append("<h2>Heterogeneity of the pool</h2><p>Level: the zoo's heterogeneity knob (0 = nearest to the base). "
                    f"Task-vector angles, mean over tensors: {pairs.min():.1f}° to {pairs.max():.1f}° "
                    f"(mean {pairs.mean():.1f}°).</p>" + _html_table(levels.sort_values("level"), 2))
    figure("Pairwise task-vector angles", plots.angle_heatmaps(angles, "task_vector_angle_deg", title="task-vector angles"))
    body = "\n".join(sections)
    for index, (_, fig) in enumerate(figures):
        body = body.replace(f"{{figure{index}}}", fig.to_html(full_html=False, include_plotlyjs=index == 0))
    style = ("body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
             "table.results{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
             "table.results td,table.results th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sweep {html.escape(pool.name)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path
