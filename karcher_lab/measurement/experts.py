"""The experts' side of every measurement, computed once per expert on first use and kept.

Whatever merge is measured, an expert's own numbers are the same: its teacher-forced answer
log-probabilities on the task it is judged on (the reference side of KL and Fisher–Rao) and its quality
there (exact match, NLL), both with the task's scoring options as the merged model's
(``data.scoring``), its activation statistics on the probe batch and their layer metrics (the
denominators of collapse ratios, the experts' curves), its tensors and their norms (the denominators of
norm ratios). :class:`ExpertMeasurements` loads an expert lazily and computes each of these at most once.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import pandas as pd
import torch

from karcher_lab.diagnostics import capture_activations, collapse_metrics, task_quality, tensor_norms
from karcher_lab.diagnostics.activations import ActivationStats, capturable_sites
from karcher_lab.diagnostics.collapse import COLUMNS as COLLAPSE_COLUMNS
from karcher_lab.diagnostics.function import QUALITY_COLUMNS, AnswerLogProbs, answer_log_probs
from karcher_lab.errors import EmptyInputError, InputError, ParameterError
from karcher_lab.measurement.data import EvaluationData
from karcher_lab.measurement.settings import MeasurementSettings

ModelOrLoader = torch.nn.Module | Callable[[], torch.nn.Module]
"""A loaded model, or a function without arguments that loads it (called once, when first needed)."""

EXPERT_LABEL = "expert"
"""The ``model`` of the experts' quality rows: each task is measured on its own expert."""


def check_model_or_loader(value: Any, what: str) -> None:
    """InputError unless ``value`` is a torch module or a callable that loads one."""
    if not isinstance(value, torch.nn.Module) and not callable(value):
        raise InputError(f"{what} must be a torch model or a function that loads one, got {type(value).__name__}")


def loaded(value: ModelOrLoader, device: torch.device, what: str) -> torch.nn.Module:
    """The model ``value`` is or loads, on ``device``; InputError when a loader returns something else."""
    model = value if isinstance(value, torch.nn.Module) else value()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"the loader of {what} returned {type(model).__name__}, not a torch model")
    return model.to(device)


class ExpertMeasurements:
    """Each expert's own measurements, computed at most once.

    Parameters
    ----------
    experts : mapping of str to model or loader
        The experts by name (in this order), each a torch causal LM or a function that loads one.
    expert_tasks : mapping of str to (str or None)
        The task each expert is judged on (with examples in ``data``), or None for an expert that owns no
        task: it has no quality, log-probabilities or distances, only layer metrics and norms.
    data : EvaluationData
        Tokenizer, evaluation examples and probe batch.
    settings : MeasurementSettings

    Raises
    ------
    EmptyInputError
        No experts.
    InputError
        An expert that is neither a model nor a loader.
    ParameterError
        An expert missing from ``expert_tasks``, a task of an unknown expert, or a task without examples.
    """

    def __init__(self, experts: Mapping[str, ModelOrLoader], expert_tasks: Mapping[str, str], data: EvaluationData,
                 settings: MeasurementSettings):
        if not experts:
            raise EmptyInputError("no experts given")
        for name, value in experts.items():
            check_model_or_loader(value, f"expert {name!r}")
        unknown = [name for name in expert_tasks if name not in experts]
        missing = [name for name in experts if name not in expert_tasks]
        if unknown or missing:
            raise ParameterError(f"expert_tasks must name the task of every expert and nothing else: "
                                 f"no task for {missing}, unknown experts {unknown} (experts: {list(experts)})")
        untested = {name: task for name, task in expert_tasks.items() if task is not None and task not in data.examples}
        if untested:
            raise ParameterError(f"expert(s) judged on tasks without evaluation examples: {untested} "
                                 f"(tasks with examples: {list(data.examples)})")
        self._sources = dict(experts)
        self.tasks: dict[str, str | None] = dict(expert_tasks)
        """The task each expert is judged on (None: it owns none)."""
        self.data, self.settings = data, settings
        self._cache: dict[tuple[str, str], Any] = {}

    @property
    def names(self) -> list[str]:
        """The experts' names, in the order given."""
        return list(self._sources)

    def check_names(self, names: list[str]) -> None:
        """Check a list of experts' names: EmptyInputError when empty, ParameterError for an unknown or
        repeated name."""
        if not names:
            raise EmptyInputError("no experts given: name at least one")
        unknown = [n for n in names if n not in self._sources]
        if unknown:
            raise ParameterError(f"unknown expert(s) {unknown}; the experts are {self.names}")
        if len(set(names)) != len(names):
            raise ParameterError(f"experts {names} name one expert twice")

    def _once(self, kind: str, name: str, compute: Callable[[], Any]) -> Any:
        key = (kind, name)
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def model(self, name: str) -> torch.nn.Module:
        """The expert's model, loaded (first call) and moved to the settings' device."""
        return self._once("model", name, lambda: loaded(self._sources[name], self.settings.device, f"expert {name!r}"))

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """The expert's tensors by name, on the CPU (views of the model's own when it is on the CPU)."""
        return self._once("state", name, lambda: {k: v.detach().cpu() for k, v in self.model(name).state_dict().items()})

    def norms(self, name: str) -> dict[str, float]:
        """‖x‖₂ of each floating-point tensor (:func:`~karcher_lab.diagnostics.tensor_norms`)."""
        return self._once("norms", name, lambda: tensor_norms(self.model(name).state_dict()))

    def judged(self, names: list[str]) -> list[str]:
        """Those of ``names`` that own a task, in the given order."""
        return [name for name in names if self.tasks[name] is not None]

    @property
    def owned_tasks(self) -> set[str]:
        """The tasks some expert is judged on."""
        return {task for task in self.tasks.values() if task is not None}

    def examples(self, name: str) -> dict[str, list]:
        """``{task: examples}`` of the task the expert is judged on; ParameterError when it owns none."""
        task = self.tasks[name]
        if task is None:
            raise ParameterError(f"expert {name!r} owns no task: it has no quality or log-probabilities")
        return {task: self.data.examples[task]}

    def log_probs(self, name: str) -> AnswerLogProbs:
        """The expert's teacher-forced answer log-probabilities on its task's examples, with the task's
        scoring options (:func:`~karcher_lab.diagnostics.function.answer_log_probs`)."""
        return self._once("log_probs", name, lambda: answer_log_probs(
            self.model(name), self.data.tokenizer, self.examples(name), batch_size=self.settings.eval_batch_size,
            scoring=self.data.scoring_of([self.tasks[name]]))[self.tasks[name]])

    def quality(self, name: str) -> pd.DataFrame:
        """The expert's exact match (with the settings' ``exact_match`` and the task's scoring options), NLL
        and perplexity on its task (:func:`~karcher_lab.diagnostics.task_quality`; ``model`` =
        :data:`EXPERT_LABEL`); no rows for an expert that owns no task."""
        s = self.settings
        if self.tasks[name] is None:
            return pd.DataFrame(columns=QUALITY_COLUMNS)
        return self._once("quality", name, lambda: task_quality(
            self.model(name), self.data.tokenizer, self.examples(name), model_name=EXPERT_LABEL,
            batch_size=s.eval_batch_size, accuracy=s.exact_match, exact_match=s.exact_match_mode,
            log_probs={self.tasks[name]: self.log_probs(name)}, scoring=self.data.scoring_of([self.tasks[name]])))

    def layer_sites(self, name: str) -> tuple[str, ...]:
        """The settings' sites at which the expert's activations can be read
        (:func:`~karcher_lab.diagnostics.activations.capturable_sites`; empty where its decoder blocks are
        not found)."""
        return self._once("layer_sites", name, lambda: capturable_sites(self.model(name), self.settings.sites,
                                                                            layers_path=self.settings.layers_path)[0])

    def activations(self, name: str) -> ActivationStats:
        """The expert's activation statistics on the probe batch at :meth:`layer_sites`
        (NotSupportedError saying why when there are none)."""
        sites = self.layer_sites(name) or self.settings.sites  # none readable: the capture raises why
        return self._once("activations", name, lambda: capture_activations(
            self.model(name), self.data.probe_ids, self.data.probe_mask, sites=sites,
            batch_size=self.settings.probe_batch_size, layers_path=self.settings.layers_path))

    def collapse(self, name: str) -> pd.DataFrame:
        """The expert's layer metrics at :meth:`layer_sites` (:func:`~karcher_lab.diagnostics.collapse_metrics`;
        ``model`` = its name); no rows when there are none."""
        return self._once("collapse", name, lambda: collapse_metrics(
            self.activations(name), model=name, draws=self.settings.draws, seed=self.settings.seed)
            if self.layer_sites(name) else pd.DataFrame(columns=COLLAPSE_COLUMNS))
