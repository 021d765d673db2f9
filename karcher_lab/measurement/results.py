"""What a measurement of a merged model returns: its function metrics, layer metrics and weight metrics,
each a tidy table of :mod:`karcher_lab.diagnostics` (columns ``mean`` and ``std`` among others)."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class FunctionMetrics:
    """The merged model's function on the merged experts' tasks.

    Attributes
    ----------
    quality : DataFrame
        The merged model (``model`` = "merged") per task: ``accuracy`` (exact match, when measured),
        ``nll``, ``perplexity`` (:func:`~karcher_lab.diagnostics.task_quality` columns).
    expert_quality : DataFrame
        Each merged expert on its own task, the same metrics (``model`` = "expert").
    distance : DataFrame
        Per merged expert on its own task: ``kl`` = KL(p_expert ‖ p_merged) (the paper's eq. 2) and
        ``fisher_rao`` (``reference`` = the expert's name; :func:`~karcher_lab.diagnostics.function_distance`).
    normalized_accuracy : DataFrame
        Merged accuracy / expert accuracy per task (:func:`~karcher_lab.diagnostics.normalized_accuracy`);
        no rows without exact match.
    """

    quality: pd.DataFrame
    expert_quality: pd.DataFrame
    distance: pd.DataFrame
    normalized_accuracy: pd.DataFrame


@dataclass(frozen=True)
class LayerMetrics:
    """Layer metrics on the probe batch (:mod:`karcher_lab.diagnostics.collapse` columns), at the sites
    the model's activations can be read at (:func:`~karcher_lab.diagnostics.activations.capturable_sites`).

    Attributes
    ----------
    merged : DataFrame
        ``variance``, ``effective_rank``, ``numerical_rank`` of the merged model per site and layer
        (``model`` = "merged"), bootstrap mean ± std.
    experts : DataFrame
        The same for each merged expert (``model`` = its name).
    ratios : DataFrame or None
        ``*_ratio`` = merged / Σ_i α_i expert_i per draw, paired (:func:`~karcher_lab.diagnostics.collapse_ratios`);
        None when not asked for.
    note : str
        Why some requested sites, or all (then every table is empty), have no rows: "layer metrics
        unavailable: <reason>"; "" when every site was measured.
    """

    merged: pd.DataFrame
    experts: pd.DataFrame
    ratios: pd.DataFrame | None
    note: str = ""


@dataclass(frozen=True)
class Measurement:
    """Every measurement of one merged model.

    Attributes
    ----------
    function : FunctionMetrics
    layers : LayerMetrics
    weights : DataFrame
        Per tensor: ``norm_ratio`` = ‖merged‖ / Σ_i α_i ‖expert_i‖ (alone, or with the other
        :func:`~karcher_lab.diagnostics.weight_metrics` rows such as ``relative_distance``).
    """

    function: FunctionMetrics
    layers: LayerMetrics
    weights: pd.DataFrame
