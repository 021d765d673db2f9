"""The experts' side of every measurement, computed once per expert and kept.

Whatever merge is measured, an expert's own numbers are the same: its teacher-forced answer
log-probabilities on the task it is judged on (the reference side of KL and Fisher–Rao) and its quality
there (exact match, NLL), both with the task's scoring options as the merged model's
(``data.scoring``), its activation statistics on the probe batch and their layer metrics (the
denominators of collapse ratios, kept as the layer metrics of every bootstrap draw, the experts'
curves), and its tensor norms (the denominators of norm
ratios). :class:`ExpertMeasurements` computes all of them in one visit per expert, the first time any
is asked for: the expert is loaded, measured, and released, so that one expert model at a time is in
memory. With a :class:`~karcher_lab.measurement.cache.MeasurementCache` and the expert's content
fingerprint, a visit's numbers are stored on disk and a later session loads them without loading the
model. The expert's tensors themselves (the weight metrics' relative distances) are read from its
:mod:`karcher_lab.io` source one at a time when one is given.
"""
from __future__ import annotations

from collections.abc import Mapping as MappingABC
from functools import cached_property
from typing import Any, Callable, Iterator, Mapping

import pandas as pd
import torch

from karcher_lab.diagnostics import capture_activations, task_quality, tensor_norms
from karcher_lab.diagnostics.activations import capturable_sites
from karcher_lab.diagnostics.collapse import COLUMNS as COLLAPSE_COLUMNS
from karcher_lab.diagnostics.collapse import DrawMetrics, draw_metrics, draw_table
from karcher_lab.diagnostics.function import QUALITY_COLUMNS, AnswerLogProbs, answer_log_probs
from karcher_lab.errors import EmptyInputError, InputError, NotSupportedError, ParameterError
from karcher_lab.io import Source
from karcher_lab.io.fingerprint import DigestMemo, fingerprint, source_files
from karcher_lab.measurement.resident import fits_exactly, write_source
from karcher_lab.measurement.cache import MeasurementCache, code_identity, entry_key, tokenizer_identity
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


class SourceTensors(MappingABC):
    """A source's tensors as a read-only mapping: each read from the source (a memory-mapped file) when
    indexed, on the CPU in float32."""

    def __init__(self, source: Source):
        self._source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._source.tensors:
            raise KeyError(name)
        return self._source.load(name).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.tensors)

    def __len__(self) -> int:
        return len(self._source.tensors)


class ExpertMeasurements:
    """Each expert's own measurements, computed in one visit per expert (see the module docstring).

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
    sources : mapping of str to (Source or callable), optional
        Where each expert's tensors are read from (:meth:`state`), or a function without arguments that
        opens it (called when first needed); an expert without one is loaded and its state dict kept
        when its tensors are asked for.
    cache : MeasurementCache, optional
        The disk cache of visits, keyed by each expert's content fingerprint
        (:mod:`karcher_lab.io.fingerprint`); used for the experts whose source is a checkpoint on disk
        that the expert is loaded from.
    host : callable, optional
        Returns a model the experts may be measured in, or None: an expert whose source fits it exactly
        (:func:`~karcher_lab.measurement.resident.fits_exactly`: the same tensors, shapes and dtypes) is
        written into it instead of being loaded as a second model.

    Raises
    ------
    EmptyInputError
        No experts.
    InputError
        An expert that is neither a model nor a loader.
    ParameterError
        An expert missing from ``expert_tasks``, a task of an unknown expert, or a task without examples.
    """

    def __init__(self, experts: Mapping[str, ModelOrLoader], expert_tasks: Mapping[str, str | None],
                 data: EvaluationData, settings: MeasurementSettings, *, sources: Mapping[str, Source] | None = None,
                 cache: MeasurementCache | None = None, host: Callable[[], torch.nn.Module | None] | None = None):
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
        self._tensor_sources: dict[str, Source | Callable[[], Source]] = dict(sources or {})
        self.tasks: dict[str, str | None] = dict(expert_tasks)
        """The task each expert is judged on (None: it owns none)."""
        self.data, self.settings = data, settings
        self.cache = cache
        self._host = host
        self._visits: dict[str, dict[str, Any]] = {}
        self._states: dict[str, Mapping[str, torch.Tensor]] = {}
        self.loads = 0
        """How many times an expert model was loaded (at most once per expert and session)."""

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

    def judged(self, names: list[str]) -> list[str]:
        """Those of ``names`` that own a task, in the given order."""
        return [name for name in names if self.tasks[name] is not None]

    @property
    def owned_tasks(self) -> set[str]:
        """The tasks some expert is judged on."""
        return {task for task in self.tasks.values() if task is not None}

    def model(self, name: str) -> torch.nn.Module:
        """The expert's model on the settings' device (not kept): the host model with the expert's tensors
        written into it where they fit it exactly, else loaded now."""
        self.loads += 1
        host = self._host() if self._host is not None and name in self._tensor_sources else None
        if host is not None and fits_exactly(host, self._source(name)):
            write_source(host, self._source(name))
            return host
        return loaded(self._sources[name], self.settings.device, f"expert {name!r}")

    def visit_all(self) -> None:
        """Every expert's measurements, from the disk cache or measured now (each expert once)."""
        for name in self.names:
            self._visit(name)

    def state(self, name: str) -> Mapping[str, torch.Tensor]:
        """The expert's tensors by name, on the CPU: read one at a time from its source when it has one,
        else its model's state dict, kept from its visit."""
        if name in self._tensor_sources:
            return SourceTensors(self._source(name))
        if name not in self._states:
            self._visits.pop(name, None)  # a visit from the disk cache kept no tensors: visit the model
            self._visits[name] = self._measure(name)
        return self._states[name]

    def _source(self, name: str) -> Source:
        """The expert's tensor source, opened on first use."""
        source = self._tensor_sources[name]
        if callable(source) and not hasattr(source, "tensors"):
            source = self._tensor_sources[name] = source()
        return source

    def examples(self, name: str) -> dict[str, list]:
        """``{task: examples}`` of the task the expert is judged on; ParameterError when it owns none."""
        task = self.tasks[name]
        if task is None:
            raise ParameterError(f"expert {name!r} owns no task: it has no quality or log-probabilities")
        return {task: self.data.examples[task]}

    def _key(self, name: str) -> str | None:
        has_source = self.cache is not None and name in self._tensor_sources
        files = source_files(self._source(name)) if has_source else None
        if files is None:
            return None
        task = self.tasks[name]
        data = self.data
        return entry_key(fingerprint(files, self._digests), task, data.examples[task] if task is not None else [],
                         data.scoring.get(task) if task is not None else None, (data.probe_ids, data.probe_mask),
                         self._tokenizer_id, self.settings, self._code_id)

    @cached_property
    def _digests(self) -> DigestMemo:
        """The cache's remembered file digests, read once."""
        return DigestMemo(self.cache.digests_file)

    @cached_property
    def _tokenizer_id(self) -> str:
        return tokenizer_identity(self.data.tokenizer)

    @cached_property
    def _code_id(self) -> str:
        return code_identity()

    def _visit(self, name: str) -> dict[str, Any]:
        """Every number of the expert, from the disk cache or measured now in one visit."""
        if name in self._visits:
            return self._visits[name]
        key = self._key(name)
        entry = self.cache.load(key) if key is not None else None
        if entry is None:
            entry = self._measure(name)
            if key is not None:
                self.cache.save(key, entry)
        self._visits[name] = entry
        return entry

    def _measure(self, name: str) -> dict[str, Any]:
        model, s, data, task = self.model(name), self.settings, self.data, self.tasks[name]
        if name not in self._tensor_sources and name not in self._states:  # no source to read them from again
            self._states[name] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        entry: dict[str, Any] = dict(norms=tensor_norms(model.state_dict()), log_probs=None,
                                     quality=pd.DataFrame(columns=QUALITY_COLUMNS))
        if task is not None:
            examples, scoring = self.examples(name), data.scoring_of([task])
            log_probs = answer_log_probs(model, data.tokenizer, examples, batch_size=s.eval_batch_size, scoring=scoring)
            entry["log_probs"] = log_probs[task]
            entry["quality"] = task_quality(model, data.tokenizer, examples, model_name=EXPERT_LABEL,
                                            batch_size=s.eval_batch_size, accuracy=s.exact_match,
                                            exact_match=s.exact_match_mode, log_probs=log_probs, scoring=scoring)
        sites, unreadable = capturable_sites(model, s.sites, layers_path=s.layers_path)
        entry["layer_sites"], entry["unreadable"] = sites, unreadable
        entry["draw_metrics"] = (draw_metrics(capture_activations(model, data.probe_ids, data.probe_mask, sites=sites,
                                                                  batch_size=s.probe_batch_size,
                                                                  layers_path=s.layers_path),
                                              draws=s.draws, seed=s.seed)
                                 if sites else None)
        entry["collapse"] = (draw_table(entry["draw_metrics"], name) if sites
                             else pd.DataFrame(columns=COLLAPSE_COLUMNS))
        return entry

    def norms(self, name: str) -> dict[str, float]:
        """‖x‖₂ of each floating-point tensor (:func:`~karcher_lab.diagnostics.tensor_norms`)."""
        return self._visit(name)["norms"]

    def log_probs(self, name: str) -> AnswerLogProbs:
        """The expert's teacher-forced answer log-probabilities on its task's examples, with the task's
        scoring options (:func:`~karcher_lab.diagnostics.function.answer_log_probs`)."""
        self.examples(name)  # ParameterError when it owns no task
        return self._visit(name)["log_probs"]

    def quality(self, name: str) -> pd.DataFrame:
        """The expert's exact match (with the settings' ``exact_match`` and the task's scoring options), NLL
        and perplexity on its task (:func:`~karcher_lab.diagnostics.task_quality`; ``model`` =
        :data:`EXPERT_LABEL`); no rows for an expert that owns no task."""
        return self._visit(name)["quality"]

    def layer_sites(self, name: str) -> tuple[str, ...]:
        """The settings' sites at which the expert's activations can be read
        (:func:`~karcher_lab.diagnostics.activations.capturable_sites`; empty where its decoder blocks are
        not found)."""
        return tuple(self._visit(name)["layer_sites"])

    def draw_metrics(self, name: str) -> DrawMetrics:
        """The expert's layer metrics under every bootstrap draw at :meth:`layer_sites`
        (:func:`~karcher_lab.diagnostics.collapse.draw_metrics`: the denominators of collapse ratios;
        its activation statistics are not kept). NotSupportedError saying why when no site can be read."""
        entry = self._visit(name)
        if entry["draw_metrics"] is None:
            raise NotSupportedError(f"expert {name!r}: no activation site can be read: "
                                    f"{'; '.join(dict.fromkeys(entry['unreadable'].values()))}")
        return entry["draw_metrics"]

    def collapse(self, name: str) -> pd.DataFrame:
        """The expert's layer metrics at :meth:`layer_sites` (:func:`~karcher_lab.diagnostics.collapse_metrics`;
        ``model`` = its name); no rows when there are none."""
        return self._visit(name)["collapse"]
