"""One engine that measures merged models against their experts: the sweep's cells and the explorer's
updates go through it.

A :class:`MeasurementEngine` is made from plain data: the experts (name → model or loader), a tokenizer,
evaluation examples per task, probe texts, the task each expert is judged on, one model that merged
states are loaded into, :class:`~karcher_lab.measurement.settings.MeasurementSettings`, and optionally
each task's :class:`~karcher_lab.diagnostics.scoring.TaskScoring` (chat template, answer normalization,
greedy budget), used by every function metric of the merged model and the experts alike. The experts'
side is computed once per expert (:class:`~karcher_lab.measurement.experts.ExpertMeasurements`). A merged
model is measured in three stages, each a method, so that a panel can draw each stage's figures as soon
as its numbers exist; :meth:`MeasurementEngine.measure` runs all three:

1. :meth:`~MeasurementEngine.weight_metrics`: from the merged state dict, per tensor ``norm_ratio`` =
   ‖x*‖ / Σ_i α_i ‖x_i‖ from cached expert norms (``norm_only``), or every
   :func:`~karcher_lab.diagnostics.weight_metrics` row (relative distance to each expert, …).
2. :meth:`~MeasurementEngine.function_metrics`: ONE teacher-forced pass of the merged model over the
   merged experts' own tasks and the held-out tasks no expert owns
   (:func:`~karcher_lab.diagnostics.function.answer_log_probs`), from which
   come the answer NLL, exact match (``teacher_forced`` mode, for tasks without a ``TaskScoring``;
   ``greedy``, and every task with one, decodes instead), KL(p_expert ‖ p_merged) (eq. 2) and the
   Fisher–Rao distance against each expert's cached log-probabilities on its own task, and the
   normalized accuracy (merged / expert exact match) on the tasks an expert owns. An expert that owns
   no task contributes to the merge and the layer metrics only.
3. :meth:`~MeasurementEngine.layer_metrics`: one forward of the merged model over the probe batch
   (:func:`~karcher_lab.diagnostics.capture_activations`): variance, effective rank and numerical rank
   per layer with bootstrap mean ± std, and optionally their paired ratios to the experts'. Only at the
   sites the architecture's activations can be read at
   (:func:`~karcher_lab.diagnostics.activations.capturable_sites`): the others are named in the result's
   ``note``, and where the decoder blocks are not found at all the tables are empty, so that the weight
   and function metrics of any causal LM can be measured.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from karcher_lab import diagnostics
from karcher_lab.checks import check_weights
from karcher_lab.diagnostics.activations import capturable_sites
from karcher_lab.diagnostics.collapse import COLUMNS as COLLAPSE_COLUMNS
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.function import DISTANCE_COLUMNS, QUALITY_COLUMNS, answer_log_probs
from karcher_lab.diagnostics.scoring import TaskScoring
from karcher_lab.errors import CheckpointError, InputError
from karcher_lab.io import Source
from karcher_lab.measurement.cache import MeasurementCache
from karcher_lab.measurement.data import Probes, evaluation_data
from karcher_lab.measurement.experts import ExpertMeasurements, ModelOrLoader, check_model_or_loader, loaded
from karcher_lab.measurement.resident import ResidentWriter, check_names
from karcher_lab.measurement.results import FunctionMetrics, LayerMetrics, Measurement
from karcher_lab.measurement.settings import MeasurementSettings

MERGED_LABEL = "merged"
"""The ``model`` of the merged model's rows."""


class MeasurementEngine:
    """Measures merged models against a fixed set of experts (see the module docstring).

    Parameters
    ----------
    experts : mapping of str to model or loader
        The experts by name, each a torch causal LM (the layer metrics need decoder blocks that
        :func:`~karcher_lab.diagnostics.activations.decoder_layers` finds) or a function without
        arguments that loads one.
    tokenizer
        The tokenizer every model shares.
    examples : mapping of str to sequence of Example
        Held-out evaluation examples per task.
    probes : sequence of str, or (input_ids, attention_mask)
        The probe batch of the layer metrics: texts, or already encoded and right-padded.
    model : model or loader
        The one model every merged state is loaded into (:meth:`load_state`; the experts' architecture).
    expert_tasks : mapping of str to (str or None), optional
        The task each expert is judged on (None: it owns none); default: its name. Tasks of
        ``examples`` that no expert owns are held-out tasks: every merged model is measured on them.
    settings : MeasurementSettings, optional
        Sites, bootstrap draws, seed, exact match, batch sizes, device (defaults: ``MeasurementSettings()``).
    scoring : mapping of str to TaskScoring, optional
        Scoring options by task (:mod:`karcher_lab.diagnostics.scoring`); a task not named is scored by
        the plain rules (prompt as the tokenizer encodes it, exact string match).
    sources : mapping of str to (Source or callable), optional
        Where each expert's tensors are read from (or a function that opens it), one at a time (the
        weight metrics), and what its
        cached measurements are keyed by (:class:`~karcher_lab.measurement.experts.ExpertMeasurements`).
    cache : MeasurementCache, optional
        A disk cache of the experts' measurements (:mod:`karcher_lab.measurement.cache`).

    Every argument is checked before any model is loaded or run.
    """

    def __init__(
        self,
        experts: Mapping[str, ModelOrLoader],
        tokenizer: Any,
        examples: Mapping[str, Sequence[Example]],
        probes: Probes,
        *,
        model: ModelOrLoader,
        expert_tasks: Mapping[str, str] | None = None,
        settings: MeasurementSettings | None = None,
        scoring: Mapping[str, TaskScoring] | None = None,
        sources: Mapping[str, Source | Callable[[], Source]] | None = None,
        cache: MeasurementCache | None = None,
    ):
        settings = MeasurementSettings() if settings is None else settings
        if not isinstance(settings, MeasurementSettings):
            raise InputError(f"settings must be MeasurementSettings, got {type(settings).__name__}")
        check_model_or_loader(model, "model")
        self.settings = settings
        self.data = evaluation_data(tokenizer, examples, probes, scoring)
        """Tokenizer, evaluation examples, their scoring options and encoded probe batch."""
        tasks = {name: name for name in experts} if expert_tasks is None else expert_tasks
        self.experts = ExpertMeasurements(experts, tasks, self.data, settings, sources=sources, cache=cache,
                                          host=self._host)
        """The experts' own measurements, each computed once."""
        self._model_source = model
        self._model: torch.nn.Module | None = None
        self._holds_merge = False

    @property
    def model(self) -> torch.nn.Module:
        """The model merged states are loaded into (loaded on first use, on the settings' device)."""
        if self._model is None:
            self._model = loaded(self._model_source, self.settings.device, "model")
        return self._model

    def load_state(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """Copy a merged state dict into :attr:`model` (nothing is re-instantiated) and return the model.

        Raises
        ------
        CheckpointError
            The state lacks a tensor of the model (other than a tied output head) or has one it lacks.
        """
        check_names(self.model, state, "the merged state")
        writer = self.merge_writer()
        for name, value in state.items():
            writer(name, value)
        return self.model

    def merge_writer(self) -> ResidentWriter:
        """A merge's sink writing each merged tensor into :attr:`model` in place
        (:class:`~karcher_lab.measurement.resident.ResidentWriter`; check it with ``check_complete`` after
        the merge). From now on the model holds a merge: experts not yet measured are loaded on their own."""
        self._holds_merge = True
        return ResidentWriter(self.model)

    def measure_experts(self) -> None:
        """Measure every expert now (or read it from the disk cache), before any merge is loaded: an expert
        whose checkpoint fits :attr:`model` exactly is written into it and measured there, so no second
        model is held (:meth:`ExpertMeasurements.visit_all`)."""
        self.experts.visit_all()

    def _host(self) -> torch.nn.Module | None:
        """The model experts may be measured in: :attr:`model` until a merge is written into it."""
        return None if self._holds_merge else self.model

    def _checked(self, members: Sequence[str], weights: Sequence[float] | None) -> tuple[list[str], list[float] | None]:
        """The members as a list of experts' names and their weights normalized to α (None: equal)."""
        names = list(members)
        self.experts.check_names(names)
        if weights is None:
            return names, None
        return names, check_weights(weights, len(names), normalize=True, label="merge weights: ",
                                    what="merged experts").tolist()

    def weight_metrics(self, state: Mapping[str, torch.Tensor], members: Sequence[str],
                       weights: Sequence[float] | None = None, *, norm_only: bool = False) -> pd.DataFrame:
        """Weight-space metrics of the merged ``state`` against the ``members`` (experts' names).

        Parameters
        ----------
        state : mapping of str to torch.Tensor
            The merged tensors by name.
        members : sequence of str
            The merged experts.
        weights : sequence of float, optional
            Their merge weights (normalized to α here; default equal).
        norm_only : bool
            Only ``norm_ratio`` = ‖x*‖ / Σ_i α_i ‖x_i‖ per tensor, from the experts' cached norms
            (:func:`~karcher_lab.diagnostics.norm_ratios`); else every
            :func:`~karcher_lab.diagnostics.weight_metrics` row (``other`` = the expert's name).

        Returns
        -------
        DataFrame
            One row per tensor × metric (× expert), :mod:`karcher_lab.diagnostics.weights` columns.
        """
        names, alpha = self._checked(members, weights)
        if norm_only:
            return diagnostics.norm_ratios(diagnostics.tensor_norms(state), [self.experts.norms(n) for n in names],
                                           weights=alpha, merged_name=MERGED_LABEL)
        return diagnostics.weight_metrics(state, [self.experts.state(n) for n in names], weights=alpha,
                                          merged_name=MERGED_LABEL, names=names)

    def judged_tasks(self, members: Sequence[str]) -> list[str]:
        """The tasks the merged model of ``members`` is measured on: the members' own tasks (in member
        order), then the tasks no expert owns (held-out sets, in the examples' order)."""
        own = [self.experts.tasks[n] for n in self.experts.judged(list(members))]
        held_out = [t for t in self.data.examples if t not in self.experts.owned_tasks]
        return list(dict.fromkeys(own + held_out))

    def function_metrics(self, members: Sequence[str]) -> FunctionMetrics:
        """Quality of :attr:`model` on :meth:`judged_tasks` and its distance to each member that owns a
        task on that task, from one teacher-forced pass (see
        :class:`~karcher_lab.measurement.results.FunctionMetrics`). Empty tables when there is no task to
        measure (no member owns one and the engine has no held-out task)."""
        names, _ = self._checked(members, None)
        judged = self.experts.judged(names)
        tasks = self.judged_tasks(names)
        if not tasks:
            return FunctionMetrics(_table(QUALITY_COLUMNS), _table(QUALITY_COLUMNS), _table(DISTANCE_COLUMNS),
                                   _table(QUALITY_COLUMNS))
        s, tokenizer, model = self.settings, self.data.tokenizer, self.model
        examples = {task: self.data.examples[task] for task in tasks}
        scoring = self.data.scoring_of(tasks)
        scores = answer_log_probs(model, tokenizer, examples, batch_size=s.eval_batch_size, scoring=scoring)
        quality = diagnostics.task_quality(model, tokenizer, examples, model_name=MERGED_LABEL,
                                           batch_size=s.eval_batch_size, accuracy=s.exact_match,
                                           exact_match=s.exact_match_mode, log_probs=scores, scoring=scoring)
        expert_quality = _concat([self.experts.quality(n) for n in judged], QUALITY_COLUMNS)
        distance = _concat([
            diagnostics.function_distance({task: self.experts.log_probs(n)}, {task: scores[task]}, tokenizer,
                                          {task: examples[task]}, reference_name=n, model_name=MERGED_LABEL,
                                          batch_size=s.eval_batch_size, scoring=self.data.scoring_of([task]))
            for n, task in ((n, self.experts.tasks[n]) for n in judged)
        ], DISTANCE_COLUMNS)
        owned = quality[quality["task"].isin(self.experts.tasks[n] for n in judged)]
        return FunctionMetrics(quality, expert_quality, distance, diagnostics.normalized_accuracy(owned, expert_quality))

    def layer_metrics(self, members: Sequence[str], weights: Sequence[float] | None = None, *,
                      ratios: bool = False) -> LayerMetrics:
        """Layer metrics of :attr:`model` on the probe batch, the ``members``' (cached), and with
        ``ratios`` the merged model's over the members' α-weighted ones (``weights`` normalized; default
        equal), paired per bootstrap draw (see :class:`~karcher_lab.measurement.results.LayerMetrics`).

        Only the settings' sites whose activations can be read in this architecture are measured; the
        result's ``note`` names the others and why. Where none can be (decoder blocks not found), every
        table is empty and nothing runs.
        """
        names, alpha = self._checked(members, weights)
        s = self.settings
        sites, unreadable = capturable_sites(self.model, s.sites, layers_path=s.layers_path)
        note = _unreadable_note(sites, unreadable)
        if not sites:
            empty = pd.DataFrame(columns=COLLAPSE_COLUMNS)
            return LayerMetrics(empty, empty.copy(), empty.copy() if ratios else None, note)
        stats = diagnostics.capture_activations(self.model, self.data.probe_ids, self.data.probe_mask, sites=sites,
                                                batch_size=s.probe_batch_size, layers_path=s.layers_path)
        merged = diagnostics.collapse_metrics(stats, model=MERGED_LABEL, draws=s.draws, seed=s.seed)
        experts = pd.concat([self.experts.collapse(n) for n in names], ignore_index=True)
        ratio_table = (diagnostics.collapse_ratios(stats, [self.experts.draw_metrics(n) for n in names], alpha,
                                                   model=MERGED_LABEL, draws=s.draws, seed=s.seed)
                       if ratios else None)
        return LayerMetrics(merged, experts, ratio_table, note)

    def measure(self, state: Mapping[str, torch.Tensor], members: Sequence[str], weights: Sequence[float] | None = None,
                *, norm_only: bool = False, ratios: bool = True) -> Measurement:
        """Load ``state`` into :attr:`model` and run the three stages (weights, function, layers).

        Parameters
        ----------
        state : mapping of str to torch.Tensor
            The merged model's tensors.
        members : sequence of str
            The experts it merges.
        weights : sequence of float, optional
            Their merge weights (normalized to α; default equal): the norm ratios' and collapse ratios'
            denominators Σ_i α_i (·)_i.
        norm_only, ratios : bool
            As in :meth:`weight_metrics` and :meth:`layer_metrics`.

        Returns
        -------
        Measurement
        """
        self._checked(members, weights)
        self.load_state(state)
        weight_table = self.weight_metrics(state, members, weights, norm_only=norm_only)
        return Measurement(self.function_metrics(members), self.layer_metrics(members, weights, ratios=ratios),
                           weight_table)


def _table(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=list(columns))


def _concat(frames: Sequence[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """The frames one below the other (an empty table with ``columns`` when there are none)."""
    return pd.concat(frames, ignore_index=True) if frames else _table(columns)


def _unreadable_note(readable: Sequence[str], unreadable: Mapping[str, str]) -> str:
    """The :class:`~karcher_lab.measurement.results.LayerMetrics` note on the sites that cannot be read
    (each distinct reason once); "" when there are none."""
    if not unreadable:
        return ""
    what = "layer metrics" if not readable else f"layer metrics at site(s) {', '.join(unreadable)}"
    return f"{what} unavailable: {'; '.join(dict.fromkeys(unreadable.values()))}"
