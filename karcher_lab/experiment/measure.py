"""The sweep's result rows (:data:`karcher_lab.experiment.results.RESULT_COLUMNS`) of one merged model and
of each expert, from the measurement engine (:class:`karcher_lab.measurement.MeasurementEngine`).

:func:`measure_merge` turns one merged state dict into rows:

- scope ``task``, per task the merge is measured on (each merged expert's own task, and the held-out
  tasks no expert owns; :meth:`~karcher_lab.measurement.MeasurementEngine.judged_tasks`): ``accuracy``
  (exact match) and ``nll`` (answer tokens); on the merged experts' own tasks also ``normalized_accuracy``
  (merged / expert accuracy), ``kl`` = KL(p_expert ‖ p_merged) (the paper's function distance, eq. 2)
  and ``fisher_rao`` (:mod:`karcher_lab.diagnostics.function`);
- scope ``layer``, per site and layer, on the probe set (``probes_per_task`` held-out examples of every
  task of the pool, :func:`~karcher_lab.study.from_pool.probe_tasks`: the same for every cell, so that curves
  compare across m): ``variance``, ``effective_rank``, ``numerical_rank`` and their ratios to the
  equal-weight mean of the merged experts (paired bootstrap, mean ± std over draws;
  :mod:`karcher_lab.diagnostics.collapse`);
- scope ``weights``: ``norm_ratio`` (‖merged‖ / mean ‖expert‖) and ``relative_distance``
  (‖merged − expertᵢ‖ / ‖expertᵢ‖), averaged over tensors (and experts), std over tensors;
- scope ``summary``: averages over the measured tasks (``avg_accuracy``, ``avg_normalized_accuracy``,
  ``avg_nll``, ``avg_kl``, ``avg_fisher_rao``; std over tasks), over the residual layers
  (``avg_variance_ratio``, ``avg_effective_rank_ratio``; std over layers) and ``merge_seconds``.

:func:`expert_rows` gives an expert's own rows (quality on its task, layer metrics).

Layer rows exist only at the sites the architecture's activations can be read at
(:class:`~karcher_lab.measurement.results.LayerMetrics` ``note``); where none can be (decoder blocks not
found), there are no layer rows and the layer summaries are NaN, the other rows being unchanged.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from karcher_lab.experiment.results import RESULT_COLUMNS
from karcher_lab.measurement import MeasurementEngine

EXPERT = "expert"
"""The ``method`` of the experts' own rows (m = 1, order "")."""


def _rows(frame: pd.DataFrame, identity: dict, scope: str, *, task="task", site=None, layer=None) -> list[dict]:
    """Result rows from a diagnostics table (columns metric, mean, std and the named ones)."""
    return [dict(identity, scope=scope, task=r[task] if task else "", site=r[site] if site else "",
                 layer=int(r[layer]) if layer else -1, metric=r["metric"], mean=float(r["mean"]), std=float(r["std"]))
            for _, r in frame.iterrows()]


def _summary(identity: dict, metric: str, values: pd.Series) -> dict:
    values = values.astype(float)
    return dict(identity, scope="summary", task="", site="", layer=-1, metric=metric, mean=float(values.mean()),
                std=float(values.std()) if len(values) > 1 else float("nan"))


def expert_rows(engine: MeasurementEngine, pool_name: str, task: str) -> pd.DataFrame:
    """The expert's own rows: quality on its own task (none when it owns no task) and its layer metrics
    on the probe set."""
    identity = dict(pool=pool_name, order="", method=EXPERT, m=1, experts=task)
    quality = engine.experts.quality(task)
    rows = _rows(quality[quality["metric"] != "perplexity"], identity, "task")
    rows += _rows(engine.experts.collapse(task), identity, "layer", task=None, site="site", layer="layer")
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def measure_merge(engine: MeasurementEngine, state: dict[str, torch.Tensor], identity: dict, tasks: Sequence[str],
                  merge_seconds: float) -> pd.DataFrame:
    """Every result row of one merged model of the experts ``tasks`` with equal weights (see the module
    docstring); ``identity`` fills pool, order, method, m and experts."""
    measured = engine.measure(state, list(tasks))
    function, layers = measured.function, measured.layers
    weights = measured.weights[measured.weights["metric"].isin(["norm_ratio", "relative_distance"])]
    weights = weights.groupby("metric")["mean"].agg(["mean", "std"]).reset_index()
    layer_rows = pd.concat([layers.merged, layers.ratios])

    quality = function.quality
    task_rows = pd.concat([quality[quality["metric"] != "perplexity"], function.normalized_accuracy, function.distance])
    rows = _rows(task_rows, identity, "task")
    rows += _rows(layer_rows, identity, "layer", task=None, site="site", layer="layer")
    rows += _rows(weights, identity, "weights", task=None)
    for metric in ("accuracy", "normalized_accuracy", "nll", "kl", "fisher_rao"):
        rows.append(_summary(identity, f"avg_{metric}", task_rows.loc[task_rows["metric"] == metric, "mean"]))
    sites = engine.settings.sites
    residual = layer_rows[layer_rows["site"] == ("residual" if "residual" in sites else sites[0])]
    for metric in ("variance_ratio", "effective_rank_ratio"):
        rows.append(_summary(identity, f"avg_{metric}", residual.loc[residual["metric"] == metric, "mean"]))
    rows.append(dict(identity, scope="summary", task="", site="", layer=-1, metric="merge_seconds",
                     mean=merge_seconds, std=float("nan")))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
