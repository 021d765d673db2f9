"""The sweep's report: a self-contained HTML page (plotly's JavaScript inlined, no network needed) and
the console summary.

Sections: the Figure 1 analog (average normalized accuracy and NLL against m, a line per method, one
column per expert order) and collapse against m; the Figure 2 analog (layerwise activation variance and
effective rank of each method's merge and of its experts, at m = 2 and at the largest m); the Table 7
analog (those values per layer, mean ± std over bootstrap draws); the heterogeneity of the experts.

Heterogeneity shows what is known of each expert: a zoo pool's record (its heterogeneity level, its
accuracy and the base's, from pool.json) or, for a study, which has none, each expert's accuracy on its
own task from the sweep's expert rows; the distances from the base (``norm``, ``angle``:
:mod:`karcher_lab.experiment.distances`) wherever near and far are ordered by them; and the pairwise
angles between the experts' task vectors, per layer (between their weights where there is no base; none
with a single expert). The page says which of these it leaves out, and by what near and far are ordered.
"""
from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from karcher_lab import plots
from karcher_lab.diagnostics import expert_angles
from karcher_lab.experiment.grid import DEFAULT_METHODS, NAMED_ORDERS, describe_distance, order_distance
from karcher_lab.experiment.measure import EXPERT
from karcher_lab.experiment.subject import SweepSubject, sweep_subject
from karcher_lab.study import Study
from karcher_lab.zoo import Pool

FIGURE2_METRICS = ("variance", "effective_rank")
FIGURE2_METHODS = ("linear", "ties", "model_stock", "karcher")
"""The methods drawn in the Figure 2 analog (the paper's Lerp, Ties and Karcher, and model_stock) where
the sweep has them; the Table 7 analog below each figure lists every method."""
DISTANCE_COLUMNS = {"norm": "relative distance", "angle": "angle (°)"}
"""The report's column names of the distances from the base (or the experts' mean; the page says which)."""
ANGLE_TITLES = {"task_vector_angle_deg": "task-vector angles", "angle_deg": "angles between the experts' weights (no base)"}
"""What the pairwise angle heatmaps show, by metric."""


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


def expert_table(subject: SweepSubject, results: pd.DataFrame, distance: str) -> tuple[pd.DataFrame, str]:
    """Per expert, what is known besides the merges (see the module docstring), sorted near to far, and
    a note on what is left out."""
    table, notes = subject.metadata(), []
    if table is None:
        own = results[(results["method"] == EXPERT) & (results["scope"] == "task") & (results["metric"] == "accuracy")]
        table = pd.DataFrame({"accuracy": own.set_index("experts")["mean"]}).reindex(pd.Index(subject.experts, name="expert"))
        notes.append(f"No heterogeneity levels or base accuracies: a {subject.kind}'s experts carry no zoo record; "
                     "accuracy is each expert's exact match on its own task in this sweep.")
    if distance != "level":
        table = table.join(subject.distances.rename(columns=DISTANCE_COLUMNS))
        notes.append(f"Distances from the {'base' if subject.has_base else 'mean of the experts'}: "
                     f"{describe_distance(subject, 'norm')}, and {describe_distance(subject, 'angle')}.")
    key = "level" if distance == "level" else DISTANCE_COLUMNS[distance]
    return table.sort_values(key, kind="stable"), " ".join(notes)


def pairwise_angles(subject: SweepSubject) -> tuple[pd.DataFrame | None, str]:
    """The pairwise angles per tensor between the experts' task vectors (between their weights without
    a base; :func:`karcher_lab.diagnostics.expert_angles`) and the metric shown; None for one expert."""
    experts, base = subject.sources()
    if len(experts) < 2:
        return None, ""
    metric = "task_vector_angle_deg" if base is not None else "angle_deg"
    return expert_angles(list(experts.values()), base=base, names=list(experts)), metric


def write_report(results: pd.DataFrame, source: SweepSubject | Pool | Study | str, path: str | os.PathLike, *,
                 distance: str | None = None) -> Path:
    """Write the self-contained HTML report of a sweep's ``results`` to ``path``.

    Parameters
    ----------
    results : DataFrame
        The sweep's results table (:func:`~karcher_lab.experiment.results.load_results`).
    source : Pool, Study or str
        What was swept (as :func:`~karcher_lab.experiment.sweep.run_sweep` takes it).
    path : str or path-like
        The HTML file to write (atomically).
    distance : {"level", "norm", "angle"}, optional
        What near and far were ordered by (default: as the sweep's default for ``source``).

    Returns
    -------
    Path
        ``path``.
    """
    subject = sweep_subject(source)
    distance = order_distance(subject, distance)
    path = Path(path)
    merges = in_display_order(results[results["method"] != EXPERT])
    orders = list(dict.fromkeys(merges["order"]))
    summary = merges[merges["scope"] == "summary"]
    figures: list[tuple[str, object]] = []
    sections = [f"<h1>Merging sweep on {html.escape(subject.label)}</h1>",
                f"<p>{len(summary[['order', 'method', 'm']].drop_duplicates())} merges: orders {', '.join(orders)}; "
                f"m = {sorted(set(merges['m'].astype(int)))}; equal weights 1/m. Normalized accuracy = merged exact match / "
                f"the expert's own, averaged over the m merged experts' tasks (1 = no loss).</p>"]

    def figure(title: str, fig, note: str = "") -> None:
        figures.append((title, fig))
        sections.append(f"<h2>{html.escape(title)}</h2>" + (f"<p>{note}</p>" if note else "") + f"{{figure{len(figures) - 1}}}")

    figure("Figure 1 analog: function against the number of merged experts",
           plots.sweep_curves(summary, ("avg_normalized_accuracy", "avg_nll")),
           "Hover for ± std over the merged tasks. Order near: experts closest to the base first; far: farthest first; "
           f"by {html.escape(describe_distance(subject, distance))}.")
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
    table, note = expert_table(subject, results, distance)
    angles, metric = pairwise_angles(subject)
    if angles is None:
        angle_note = "A single expert: no pairwise angles."
    else:
        pairs = angles[angles["metric"] == metric].groupby(["model", "other"])["mean"].mean()
        angle_note = (f"{ANGLE_TITLES[metric].capitalize()}, mean over tensors: {pairs.min():.1f}° to {pairs.max():.1f}° "
                      f"(mean {pairs.mean():.1f}°).")
    level = "Level: the zoo's heterogeneity knob (0 = nearest to the base). " if subject.levels is not None else ""
    sections.append(f"<h2>Heterogeneity of the {subject.kind}</h2><p>{level}{html.escape(note)}{' ' if note else ''}"
                    f"{angle_note}</p>" + _html_table(table, 2))
    if angles is not None:
        figure(f"Pairwise {ANGLE_TITLES[metric]}", plots.angle_heatmaps(angles, metric, title=ANGLE_TITLES[metric]))
    body = "\n".join(sections)
    for index, (_, fig) in enumerate(figures):
        body = body.replace(f"{{figure{index}}}", fig.to_html(full_html=False, include_plotlyjs=index == 0))
    style = ("body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
             "table.results{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
             "table.results td,table.results th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sweep {html.escape(subject.name)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path
