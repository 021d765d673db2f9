"""The paper's Table 2 analog: pairwise merges (m = 2) of two experts at each model scale, every method.

Each scale is a pool (``tiny``, ``small``, ``medium`` or a pool directory); its two experts are the
first two of ``order`` (default ``near``: the two experts closest to the base, the paper's "nearby"
regime). Each pool gets its own sweep run under ``out/<pool>`` (resumable), and the table reports each
method's mean normalized accuracy and mean answer NLL over the two experts' tasks.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from karcher_lab import plots
from karcher_lab.errors import ParameterError
from karcher_lab.experiment.grid import DEFAULT_METHODS, make_grid
from karcher_lab.experiment.report import method_rank
from karcher_lab.experiment.sweep import run_sweep

PAIRWISE_METRICS = ("avg_normalized_accuracy", "avg_nll")


def run_pairwise(
    sizes: Sequence[str] = ("tiny", "small", "medium"),
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    order: str = "near",
    out: str | os.PathLike = "runs/pairwise",
    params: Mapping[str, Mapping[str, Any]] | None = None,
    log: Callable[[str], None] | None = print,
    **measure: Any,
) -> pd.DataFrame:
    """Run the pairwise merges and return the table (a row per method, a column per (metric, pool));
    also writes ``out/pairwise.csv`` and ``out/pairwise.html``. ``measure``: per_task, probes_per_task,
    draws, sites, seed, device, progress (as for :func:`run_sweep`)."""
    sizes = list(dict.fromkeys(sizes))
    if not sizes:
        raise ParameterError("no pool sizes given")
    for size in sizes:  # every pool and the grid are checked before any merge
        make_grid(size, methods=methods, m_values=[2], orders=[order], params=params)
    out = Path(out)
    summaries = []
    for size in sizes:
        if log:
            log(f"--- pool {size}")
        results = run_sweep(size, methods=methods, m_values=[2], orders=[order], out=out / Path(size).name,
                            params=params, report=False, log=log, **measure)
        rows = results[(results["scope"] == "summary") & results["metric"].isin(PAIRWISE_METRICS)]
        summaries.append(rows.assign(pool=Path(size).name))
    summary = pd.concat(summaries, ignore_index=True)
    table = summary.pivot_table(index="method", columns=["metric", "pool"], values="mean")
    table = table.loc[sorted(table.index, key=method_rank), [(m, Path(s).name) for m in PAIRWISE_METRICS for s in sizes]]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "pairwise.csv")
    bars = plots.task_bars(summary[summary["metric"] == "avg_normalized_accuracy"].drop(columns="task").rename(columns={"method": "model", "pool": "task"}),
                           "avg_normalized_accuracy", title="pairwise merges (m = 2): mean normalized accuracy per pool")
    experts = ", ".join(f"{s}: {' + '.join(summary.loc[summary['pool'] == Path(s).name, 'experts'].iloc[0].split('+'))}" for s in sizes)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pairwise merges</title></head><body>"
            f"<h1>Table 2 analog: pairwise merges across scales</h1><p>Experts ({html.escape(order)} order): "
            f"{html.escape(experts)}.</p>{table.to_html(float_format=lambda x: f'{x:.3f}', border=0)}"
            f"{bars.to_html(full_html=False, include_plotlyjs=True)}</body></html>")
    (out / "pairwise.html").write_text(page)
    if log:
        log(f"pairwise merges (m = 2, {order} order): {experts}\n{table.round(3).to_string(na_rep='-')}")
        log(f"table: {out / 'pairwise.csv'}; page: {out / 'pairwise.html'}")
    return table
