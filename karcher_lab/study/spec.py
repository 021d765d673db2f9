"""A Study: which experts to merge, on which evaluation tasks and probe texts they are measured.

Everything is given by reference (paths, hub ids, file names, zoo task names) or as plain data, and
checked when the Study is made, before any model or file is loaded:

- ``experts``: name → a Hugging Face model directory, a hub id in the local cache, or a PEFT adapter
  directory (folded onto ``base`` when loaded); also an in-memory model or state dict.
- ``base``: the base model (optional; required for adapter experts and for methods that use a base).
- ``tasks``: name → a task source (a JSONL / JSON / CSV / Parquet file, a list of dicts or Examples, a
  ``datasets`` dataset, or a built-in zoo task name), or a mapping with ``source`` and the options of
  :class:`TaskSpec`. An expert's own task is the task of the same name; tasks no expert owns (a general
  held-out set) and experts that own no task are allowed.
- ``probes``: the texts of the layer metrics: a text file (one probe per line), a list of strings, or
  None for the tasks' prompts.
- ``layers_path``: the dotted path of the decoder blocks, where they are not found by themselves.
- ``device``: where the explorer and the sweep merge and measure this study (``cpu``, ``cuda``,
  ``cuda:1``; default cpu); a ``device`` given to them overrides it. Checked to be a device name here,
  and to exist when a session opens.
- A task whose source is ``"lm_eval:TASK"`` (or a mapping with that ``source`` and optionally ``limit``)
  is an lm-evaluation-harness task (:class:`LmEvalTask`): the sweep scores every expert and merge on it
  through lm-eval (:mod:`karcher_lab.diagnostics.lm_eval_bridge`). It is kept apart from the example
  tasks (:attr:`Study.lm_eval_tasks`, not :attr:`Study.task_specs`) and is no expert's own task.
  ``lm_eval_include``: local lm-eval task folders, added as lm-eval's ``--include_path`` adds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from karcher_lab.checks import check_count
from karcher_lab.errors import DataError, EmptyInputError, ParameterError

TASK_OPTIONS = ("source", "prompt_field", "answer_field", "limit", "chat_template", "case_sensitive", "max_new_tokens")
"""The keys of a task given as a mapping."""
LM_EVAL_PREFIX = "lm_eval:"
"""A task source ``lm_eval:TASK`` names lm-evaluation-harness task TASK."""
LM_EVAL_OPTIONS = ("source", "limit")
"""The keys of an lm-eval task given as a mapping."""


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task of a study.

    Attributes
    ----------
    name : str
    source : path, list, dataset or str
        Where the examples come from (see the module docstring); a str that is no existing file is a
        built-in zoo task name.
    prompt_field, answer_field : str
        The columns (keys) holding prompt and answer.
    limit : int, optional
        Use the first ``limit`` examples only (default: all).
    chat_template : bool
        Apply the tokenizer's chat template to each prompt.
    case_sensitive : bool
        Whether exact match compares answers case-sensitively.
    max_new_tokens : int, optional
        Greedy decoding stops after this many tokens (default: each reference answer's token count plus
        :data:`~karcher_lab.diagnostics.scoring.ANSWER_MARGIN`), or earlier at EOS or a newline.
    """

    name: str
    source: Any
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    limit: int | None = None
    chat_template: bool = False
    case_sensitive: bool = True
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.source is None or (isinstance(self.source, (str, list, tuple)) and len(self.source) == 0):
            raise EmptyInputError(f"{where}: no source given")
        for key in ("prompt_field", "answer_field"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ParameterError(f"{where}: {key} must be a non-empty string, got {getattr(self, key)!r}")
        for key in ("limit", "max_new_tokens"):
            if getattr(self, key) is not None:
                check_count(f"{where}: {key}", getattr(self, key))
        for key in ("chat_template", "case_sensitive"):
            if not isinstance(getattr(self, key), bool):
                raise ParameterError(f"{where}: {key} must be true or false, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class LmEvalTask:
    """One lm-evaluation-harness task of a study.

    Attributes
    ----------
    name : str
        The task's name in the study (the ``task`` of its result rows).
    task : str
        lm-eval's name of the task.
    limit : int, optional
        Score only the first ``limit`` documents (default: all).
    """

    name: str
    task: str
    limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task.strip():
            raise ParameterError(f"task {self.name!r}: {LM_EVAL_PREFIX} must be followed by an lm-eval task name")
        if self.limit is not None:
            check_count(f"task {self.name!r}: limit", self.limit)


def is_lm_eval(source: Any) -> bool:
    """Whether a task source names an lm-eval task (``lm_eval:TASK``)."""
    return isinstance(source, str) and source.startswith(LM_EVAL_PREFIX)


def lm_eval_task(name: str, value: Any) -> LmEvalTask:
    """The :class:`LmEvalTask` of one ``tasks`` entry whose source is ``lm_eval:TASK``."""
    options = dict(value) if isinstance(value, Mapping) else {"source": value}
    unknown = sorted(set(options) - set(LM_EVAL_OPTIONS))
    if unknown:
        raise ParameterError(f"task {name!r} is an lm-eval task: option(s) {unknown} do not apply (only "
                             f"{list(LM_EVAL_OPTIONS)}; lm-eval's task config holds the rest)")
    return LmEvalTask(name, options["source"][len(LM_EVAL_PREFIX):].strip(), options.get("limit"))


def task_spec(name: str, value: Any) -> TaskSpec:
    """The :class:`TaskSpec` of one ``tasks`` entry: a source, or a mapping of :data:`TASK_OPTIONS`."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(TASK_OPTIONS))
        if unknown:
            raise ParameterError(f"task {name!r}: unknown option(s) {unknown}; known: {list(TASK_OPTIONS)}")
        if "source" not in value:
            raise ParameterError(f"task {name!r}: a mapping needs 'source' (the file, data or zoo task name)")
        return TaskSpec(name, **value)
    return TaskSpec(name, value)


@dataclass
class Study:
    """Experts, base, evaluation tasks and probe texts of an exploration (see the module docstring)."""

    experts: Mapping[str, Any]
    base: Any = None
    tasks: Mapping[str, Any] = field(default_factory=dict)
    probes: Any = None
    layers_path: str | None = None
    name: str = "study"
    lm_eval_include: Sequence[str | Path] = ()
    """Local lm-eval task folders (relative paths against :attr:`relative_to`)."""
    relative_to: Path | None = None
    """Folder that relative paths are resolved against (the YAML's folder for :func:`load_study`)."""
    device: str | None = None
    """Where sessions over this study run by default (None: cpu)."""

    def __post_init__(self) -> None:
        if not isinstance(self.experts, Mapping) or not self.experts:
            raise EmptyInputError("a study needs experts: a mapping of name → model directory, hub id or adapter")
        for label, names in (("expert", self.experts), ("task", self.tasks)):
            bad = [n for n in names if not isinstance(n, str) or not n]
            if bad:
                raise ParameterError(f"{label} names must be non-empty strings, got {bad}")
        if not isinstance(self.tasks, Mapping):
            raise ParameterError(f"tasks must be a mapping of name → source, got {type(self.tasks).__name__}")
        self.experts = dict(self.experts)
        sources = {n: v.get("source") if isinstance(v, Mapping) else v for n, v in self.tasks.items()}
        self.task_specs: dict[str, TaskSpec] = {n: task_spec(n, v) for n, v in self.tasks.items()
                                                if not is_lm_eval(sources[n])}
        self.lm_eval_tasks: dict[str, LmEvalTask] = {n: lm_eval_task(n, v) for n, v in self.tasks.items()
                                                     if is_lm_eval(sources[n])}
        if not self.task_specs and not self.lm_eval_tasks:
            raise EmptyInputError("a study needs at least one evaluation task (tasks: name → file, data, zoo task "
                                  "or lm_eval:TASK)")
        folders = [self.lm_eval_include] if isinstance(self.lm_eval_include, (str, Path)) else self.lm_eval_include
        if not isinstance(folders, Sequence) or not all(isinstance(f, (str, Path)) and str(f) for f in folders):
            raise ParameterError(f"lm_eval_include must be a folder or a list of folders, got {self.lm_eval_include!r}")
        folders = [Path(self.path(folder)).expanduser() for folder in folders]
        missing = [str(folder) for folder in folders if not folder.is_dir()]
        if missing:
            raise DataError(f"lm_eval_include: no folder {missing} (relative paths resolve against "
                            f"{self.relative_to or Path.cwd()})")
        self.lm_eval_include = [folder.resolve() for folder in folders]
        if isinstance(self.probes, (list, tuple)) and not self.probes:
            raise EmptyInputError("probes: an empty list; give probe texts, a probe file, or leave probes out")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ParameterError(f"device must be a device name such as 'cpu' or 'cuda', got {self.device!r}") from None
            self.device = str(self.device)
        if self.layers_path is not None and (not isinstance(self.layers_path, str) or not self.layers_path):
            raise ParameterError(f"layers_path must be a dotted module path such as 'transformer.h', got {self.layers_path!r}")

    def own_task(self, expert: str) -> str | None:
        """The task ``expert`` is judged on: the task of the same name, or None."""
        return expert if expert in self.task_specs else None

    def path(self, value: Any) -> Any:
        """``value`` with a relative path made absolute against :attr:`relative_to` (other values as given)."""
        if isinstance(value, (str, Path)) and self.relative_to is not None:
            candidate = Path(value).expanduser()
            if not candidate.is_absolute() and (self.relative_to / candidate).exists():
                return str(self.relative_to / candidate)
        return value
