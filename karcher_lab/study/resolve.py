"""Turning a :class:`~karcher_lab.study.spec.Study` into what the lab runs on: evaluation examples per
task, probe texts, and the experts as models (loaded lazily) or state dicts for merging.

- A task source that is an existing file (relative paths against the study's folder) or data is read
  by :func:`karcher_lab.diagnostics.load_examples`; a string that is no file but a built-in zoo task's
  name gives that task's held-out examples; anything else is refused, naming the missing file.
- Scoring: every task is scored with its options (:func:`task_scoring`), except a built-in zoo task
  given without options, which keeps the zoo's plain rules (:mod:`karcher_lab.diagnostics.scoring`).
- Probes: :func:`karcher_lab.diagnostics.load_probes` of the study's ``probes``, or by default the
  prompts of every task's examples.
- An expert directory holding ``adapter_config.json`` is a PEFT adapter: its update is folded onto the
  base (W + (α/r) B A) when the expert is loaded.
- Every expert must share one vocabulary with the base (or the first expert): checked on the
  tokenizers' vocabularies, before any model is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from karcher_lab.diagnostics import load_examples, load_probes
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.scoring import TaskScoring
from karcher_lab.errors import DataError, InputError, VocabularyMismatchError
from karcher_lab.io import Checkpoint, Source, StateDictSource
from karcher_lab.io.lora import AdapterOnBase, fold_into_state, read_adapter
from karcher_lab.io.resolve import resolve_model_dir
from karcher_lab.study.spec import Study, TaskSpec
from karcher_lab.zoo.catalog import TASKS, get_task

ZOO_TASK_EXAMPLES = 64
"""Held-out examples of a built-in zoo task when neither its ``limit`` nor the caller says how many."""

ADAPTER_CONFIG = "adapter_config.json"


def task_examples(study: Study, spec: TaskSpec, per_task: int | None = None, seed: int = 0) -> list[Example]:
    """The examples of one task: every one, or the first ``limit`` / ``per_task`` (the smaller)."""
    cap = min(n for n in (spec.limit, per_task) if n is not None) if (spec.limit or per_task) else None
    source = study.path(spec.source)
    if is_zoo_task(study, spec):
        return get_task(source).examples("eval", cap or ZOO_TASK_EXAMPLES, seed=seed)
    if isinstance(source, (str, Path)) and not Path(source).expanduser().is_file():
        raise DataError(f"task {spec.name!r}: no file {source} (relative paths resolve against "
                        f"{study.relative_to or Path.cwd()}), and no built-in task of that name "
                        f"(built-in: {', '.join(sorted(TASKS))})")
    return load_examples(source, prompt_field=spec.prompt_field, answer_field=spec.answer_field, limit=cap,
                         label=spec.name)


def is_zoo_task(study: Study, spec: TaskSpec) -> bool:
    """Whether the task's source is a built-in zoo task's name (a string that names no file)."""
    source = study.path(spec.source)
    return isinstance(source, str) and source in TASKS and not Path(source).expanduser().is_file()


def task_scoring(study: Study, spec: TaskSpec) -> TaskScoring | None:
    """How the task is scored: its options as a :class:`~karcher_lab.diagnostics.scoring.TaskScoring`,
    or None (the zoo's plain rules) for a built-in zoo task without options."""
    scoring = TaskScoring(spec.chat_template, spec.case_sensitive, spec.max_new_tokens)
    return None if is_zoo_task(study, spec) and scoring == TaskScoring() else scoring


def study_examples(study: Study, per_task: int | None = None, seed: int = 0) -> dict[str, list[Example]]:
    """Every task's examples (:func:`task_examples`), by task name."""
    return {name: task_examples(study, spec, per_task, seed) for name, spec in study.task_specs.items()}


def probe_texts(study: Study, examples: dict[str, list[Example]], per_task: int | None = None) -> list[str]:
    """The study's probe texts, or the first ``per_task`` prompts of every task's examples."""
    if study.probes is not None:
        return load_probes(study.path(study.probes), limit=None)
    return [e.prompt for task in examples.values() for e in (task if per_task is None else task[:per_task])]


def model_dir(study: Study, source: Any) -> Path:
    """The local directory of an expert or base given by path or cached hub id."""
    return resolve_model_dir(str(study.path(source)), None, study.relative_to)


def model_folder(study: Study, source: Any) -> Path | None:
    """The resolved folder of a model given by path or cached hub id; None for a model or state dict
    held in memory."""
    return None if isinstance(source, (torch.nn.Module, Mapping)) else model_dir(study, source)


def is_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def expert_loader(study: Study, name: str, dtype: str = "auto") -> Callable[[], torch.nn.Module]:
    """A function that loads expert ``name`` as a causal LM in eval mode, in ``dtype`` (:func:`load_model`;
    an adapter folded on the study's base); in-memory models are returned as given."""
    source = study.experts[name]
    if isinstance(source, torch.nn.Module):
        return lambda: source
    directory = model_dir(study, source)
    if not is_adapter(directory):
        return lambda: load_model(directory, dtype)
    if study.base is None:
        raise InputError(f"expert {name!r} is a PEFT adapter ({directory}); folding it needs the study's base")
    base_dir = model_dir(study, study.base)

    def load_folded() -> torch.nn.Module:
        model = load_model(base_dir, dtype)
        adapter = read_adapter(directory, label=name)
        model.load_state_dict(fold_into_state(model.state_dict(), adapter.factors(), adapter.fan_in_fan_out))
        return model

    return load_folded


def check_adapters_have_base(study: Study) -> None:
    """InputError naming the PEFT adapter experts when the study's base is no model folder or cached
    hub id to fold them onto (folders are resolved, no weights read)."""
    folders = {name: model_folder(study, source) for name, source in study.experts.items()}
    adapters = [name for name, folder in folders.items() if folder is not None and is_adapter(folder)]
    if adapters and (study.base is None or model_folder(study, study.base) is None):
        raise InputError(f"expert(s) {adapters} are PEFT adapters; folding them needs the study's base as a "
                         "model folder or cached hub id")


def merge_sources(study: Study, names: Sequence[str] | None = None) -> tuple[dict[str, Source], Source | None]:
    """The experts ``names`` (default: every one) by name and the base (None without one) as
    :mod:`karcher_lab.io` sources read one tensor at a time: a model folder or cached hub id as a
    :class:`~karcher_lab.io.Checkpoint` (memory-mapped safetensors), a PEFT adapter folded onto the base
    as each tensor is read (:class:`~karcher_lab.io.lora.AdapterOnBase`), a model or state dict in
    memory as given. Only the named experts' files are opened.

    Raises
    ------
    InputError
        Adapter experts without the study's base as a model folder or cached hub id
        (:func:`check_adapters_have_base`).
    CheckpointError
        A named expert's or the base's checkpoint cannot be read.
    """
    check_adapters_have_base(study)
    base_folder = model_folder(study, study.base) if study.base is not None else None
    experts: dict[str, Source] = {}
    for name in study.experts if names is None else names:
        source = study.experts[name]
        folder = model_folder(study, source)
        if folder is None:
            experts[name] = StateDictSource(source, name)
        elif is_adapter(folder):
            experts[name] = AdapterOnBase(base_folder, folder, name)
        else:
            experts[name] = Checkpoint(folder, label=name)
    if study.base is None:
        return experts, None
    return experts, StateDictSource(study.base, "base") if base_folder is None else Checkpoint(base_folder, label="base")


def check_vocabularies(study: Study) -> None:
    """VocabularyMismatchError unless every expert's tokenizer has the vocabulary of the base's (or of
    the first expert's); adapters use the base's. Tokenizers only: no model is loaded."""
    from transformers import AutoTokenizer

    named = ([("base", study.base)] if study.base is not None else []) + list(study.experts.items())
    reference_label, reference = None, None
    for label, source in named:
        if isinstance(source, torch.nn.Module):
            continue
        directory = model_dir(study, source)
        if is_adapter(directory) and not any(directory.glob("tokenizer*")):
            continue
        vocabulary = AutoTokenizer.from_pretrained(directory).get_vocab()
        if reference is None:
            reference_label, reference = label, vocabulary
        elif vocabulary != reference:
            extra = sorted(set(vocabulary) - set(reference))[:5]
            missing = sorted(set(reference) - set(vocabulary))[:5]
            raise VocabularyMismatchError(
                f"expert {label!r} has another vocabulary than {reference_label!r} ({len(vocabulary)} vs "
                f"{len(reference)} tokens; e.g. only in {label!r}: {extra}, only in {reference_label!r}: {missing}); "
                "the experts of a study must share one tokenizer")


def load_model(directory: Path, dtype: str = "auto") -> torch.nn.Module:
    """The causal LM saved in ``directory``, in eval mode, in ``dtype``: ``"auto"`` keeps the
    checkpoint's own (its config's dtype, else its weights'), else the named torch dtype."""
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).eval()
