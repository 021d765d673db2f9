"""Measuring one model of the sweep: its function on the merged experts' tasks and its activations.

:class:`Reference` holds what every cell is measured against and computes it once: the task examples,
the probe set, and per expert its model, its quality on its own task and its activation statistics
(expert evaluations do not depend on the merge method). :func:`measure_merge` turns one merged state
dict into result rows (:data:`karcher_lab.experiment.results.RESULT_COLUMNS`):

- scope ``task``, per merged expert's task: ``accuracy`` (greedy exact match), ``normalized_accuracy``
  (merged / expert accuracy), ``nll`` (answer tokens), ``kl`` = KL(p_expert ‖ p_merged) (the paper's
  function distance, eq. 2) and ``fisher_rao`` on that task (:mod:`karcher_lab.diagnostics.function`);
- scope ``layer``, per site and layer, on the probe set (``probes_per_task`` held-out examples of every
  task of the pool, :func:`probe_tasks`: the same for every cell, so that curves compare across m): ``variance``,
  ``effective_rank``, ``numerical_rank`` and their ratios to the equal-weight mean of the merged
  experts (paired bootstrap, mean ± std over draws; :mod:`karcher_lab.diagnostics.collapse`);
- scope ``weights``: ``norm_ratio`` (‖merged‖ / mean ‖expert‖) and ``relative_distance``
  (‖merged − expertᵢ‖ / ‖expertᵢ‖), averaged over tensors (and experts), std over tensors;
- scope ``summary``: averages over the merged tasks (``avg_accuracy``, ``avg_normalized_accuracy``,
  ``avg_nll``, ``avg_kl``, ``avg_fisher_rao``; std over tasks), over the residual layers
  (``avg_variance_ratio``, ``avg_effective_rank_ratio``; std over layers) and ``merge_seconds``.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from karcher_lab.diagnostics import (
    capture_activations, collapse_metrics, collapse_ratios, encode_probes, function_distance, normalized_accuracy,
    task_quality, weight_metrics,
)
from karcher_lab.experiment.results import RESULT_COLUMNS
from karcher_lab.zoo import Pool, get_task, load

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


def probe_tasks(pool: Pool) -> tuple[str, ...]:
    """The tasks of the probe set: every expert's task of the pool, in pool order, whatever the grid, so
    that every cell of a run (and of a resumed run with a larger grid) is measured on the same probes."""
    return tuple(e["task"] for e in pool.experts)


class Reference:
    """The experts, task examples and probe set of a sweep, loaded and measured once (lazily)."""

    def __init__(self, pool: Pool, tasks: Sequence[str], *, per_task: int, probes_per_task: int,
                 sites: Sequence[str], draws: int, seed: int = 0, device: str = "cpu", batch_size: int = 64):
        self.pool, self.tasks, self.sites, self.draws, self.seed = pool, tuple(tasks), tuple(sites), draws, seed
        self.device, self.batch_size = torch.device(device), batch_size
        self.base, self.tokenizer = load(str(pool.base_path))
        self.base.to(self.device)
        self.base_state = {k: v.detach().cpu().clone() for k, v in self.base.state_dict().items()}
        self.examples = {t: get_task(t).examples("eval", per_task, seed=seed) for t in self.tasks}
        self.probe_tasks = probe_tasks(pool)
        texts = [e.prompt + e.answer for t in self.probe_tasks for e in get_task(t).examples("eval", probes_per_task, seed=seed)]
        self.probe_ids, self.probe_mask = encode_probes(self.tokenizer, texts)
        self._models: dict[str, torch.nn.Module] = {}
        self._quality: dict[str, pd.DataFrame] = {}
        self._stats: dict = {}

    def model(self, task: str) -> torch.nn.Module:
        if task not in self._models:
            self._models[task] = load(str(self.pool.expert_path(task)))[0].to(self.device)
        return self._models[task]

    def state(self, task: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model(task).state_dict().items()}

    def quality(self, task: str) -> pd.DataFrame:
        """The expert's accuracy and NLL on its own task."""
        if task not in self._quality:
            self._quality[task] = task_quality(self.model(task), self.tokenizer, {task: self.examples[task]},
                                               model_name=task, batch_size=self.batch_size)
        return self._quality[task]

    def capture(self, model: torch.nn.Module):
        return capture_activations(model, self.probe_ids, self.probe_mask, sites=self.sites, batch_size=self.batch_size)

    def stats(self, task: str):
        if task not in self._stats:
            self._stats[task] = self.capture(self.model(task))
        return self._stats[task]

    def expert_rows(self, pool_name: str, task: str) -> pd.DataFrame:
        """The expert's own rows: quality on its task and its layer metrics on the probe set."""
        identity = dict(pool=pool_name, order="", method=EXPERT, m=1, experts=task)
        quality = self.quality(task)
        rows = _rows(quality[quality["metric"] != "perplexity"], identity, "task")
        rows += _rows(collapse_metrics(self.stats(task), model=task, draws=self.draws, seed=self.seed),
                      identity, "layer", task=None, site="site", layer="layer")
        return pd.DataFrame(rows, columns=RESULT_COLUMNS)

    def merged_model(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The base model's architecture carrying ``state`` (one instance, reused)."""
        self.base.load_state_dict(state)
        return self.base


def measure_merge(reference: Reference, state: dict[str, torch.Tensor], identity: dict, tasks: Sequence[str],
                  merge_seconds: float) -> pd.DataFrame:
    """Every result row of one merged model (see the module docstring); ``identity`` fills pool, order,
    method, m and experts."""
    ref, tasks = reference, list(tasks)
    model = ref.merged_model(state)
    name = identity["method"]
    quality = task_quality(model, ref.tokenizer, {t: ref.examples[t] for t in tasks}, model_name=name,
                           batch_size=ref.batch_size)
    normalized = normalized_accuracy(quality, pd.concat([ref.quality(t) for t in tasks]))
    distance = pd.concat([function_distance(ref.model(t), model, ref.tokenizer, {t: ref.examples[t]}, reference_name=t,
                                            model_name=name, batch_size=ref.batch_size) for t in tasks])
    stats = ref.capture(model)
    layers = pd.concat([collapse_metrics(stats, model=name, draws=ref.draws, seed=ref.seed),
                        collapse_ratios(stats, [ref.stats(t) for t in tasks], model=name, draws=ref.draws, seed=ref.seed)])
    weights = weight_metrics(state, [ref.state(t) for t in tasks], merged_name=name, names=tasks)
    weights = weights[weights["metric"].isin(["norm_ratio", "relative_distance"])]
    weights = weights.groupby("metric")["mean"].agg(["mean", "std"]).reset_index()

    task_rows = pd.concat([quality[quality["metric"] != "perplexity"], normalized, distance])
    rows = _rows(task_rows, identity, "task")
    rows += _rows(layers, identity, "layer", task=None, site="site", layer="layer")
    rows += _rows(weights, identity, "weights", task=None)
    for metric in ("accuracy", "normalized_accuracy", "nll", "kl", "fisher_rao"):
        rows.append(_summary(identity, f"avg_{metric}", task_rows.loc[task_rows["metric"] == metric, "mean"]))
    residual = layers[layers["site"] == "residual"] if "residual" in ref.sites else layers[layers["site"] == ref.sites[0]]
    for metric in ("variance_ratio", "effective_rank_ratio"):
        rows.append(_summary(identity, f"avg_{metric}", residual.loc[residual["metric"] == metric, "mean"]))
    rows.append(dict(identity, scope="summary", task="", site="", layer=-1, metric="merge_seconds",
                     mean=merge_seconds, std=float("nan")))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
