"""What models are measured on: a tokenizer, the evaluation examples of each task, how each task is
scored and the probe batch of the layer metrics, checked and encoded once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from karcher_lab.diagnostics.activations import encode_probes
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.scoring import TaskScoring, check_scoring
from karcher_lab.errors import EmptyInputError, InputError

Probes = Sequence[str] | tuple[torch.Tensor, torch.Tensor]
"""Probe texts, or an encoded right-padded ``(input_ids [N, T], attention_mask [N, T])`` pair."""


@dataclass(frozen=True)
class EvaluationData:
    """The data every model of a measurement is run on.

    Attributes
    ----------
    tokenizer
        The tokenizer all models share.
    examples : dict of str to list of Example
        Held-out prompt/answer examples per task (the function metrics).
    probe_ids, probe_mask : torch.Tensor, int64 [N, T]
        The right-padded probe batch of the layer metrics and its attention mask (0 on padding).
    scoring : dict of str to TaskScoring
        The scoring options of the tasks that have them (:mod:`karcher_lab.diagnostics.scoring`); the
        others are scored by the plain rules.
    """

    tokenizer: Any
    examples: dict[str, list[Example]]
    probe_ids: torch.Tensor
    probe_mask: torch.Tensor
    scoring: dict[str, TaskScoring] = field(default_factory=dict)

    def scoring_of(self, tasks: Iterable[str]) -> dict[str, TaskScoring]:
        """The scoring options of those of ``tasks`` that have them (the ``scoring`` argument of the
        :mod:`karcher_lab.diagnostics.function` metrics on these tasks)."""
        return {task: self.scoring[task] for task in tasks if task in self.scoring}


def evaluation_data(tokenizer: Any, examples: Mapping[str, Sequence[Example]], probes: Probes,
                    scoring: Mapping[str, TaskScoring] | None = None) -> EvaluationData:
    """Check and encode evaluation data.

    Parameters
    ----------
    tokenizer
        A transformers tokenizer (right padding is requested when probe texts are encoded).
    examples : mapping of str to sequence of Example
        At least one task, each with at least one example.
    probes : sequence of str, or (input_ids, attention_mask)
        Probe texts (encoded with :func:`~karcher_lab.diagnostics.encode_probes`) or an encoded batch.
    scoring : mapping of str to TaskScoring, optional
        Scoring options by task (a task not named: the plain rules; :mod:`karcher_lab.diagnostics.scoring`).

    Returns
    -------
    EvaluationData

    Raises
    ------
    EmptyInputError
        No task, a task without examples, or no probe.
    InputError
        An example that is not an :class:`~karcher_lab.diagnostics.examples.Example`, probes given as
        one string, an encoded probe pair whose shapes differ, or a task that asks for a chat template
        the tokenizer lacks.
    ParameterError
        ``scoring`` names a task without examples or holds something other than a TaskScoring.
    """
    if not examples:
        raise EmptyInputError("no evaluation examples given: give at least one task with examples")
    checked = {}
    for task, task_examples in examples.items():
        task_examples = list(task_examples)
        if not task_examples:
            raise EmptyInputError(f"task {task!r} has no evaluation examples")
        wrong = next((e for e in task_examples if not isinstance(e, Example)), None)
        if wrong is not None:
            raise InputError(f"task {task!r}: evaluation examples must be Example(prompt, answer), got {type(wrong).__name__}")
        checked[task] = task_examples
    task_scoring = check_scoring(tokenizer, scoring, checked)
    if isinstance(probes, tuple) and len(probes) == 2 and all(isinstance(p, torch.Tensor) for p in probes):
        ids, mask = probes
        if ids.shape != mask.shape or ids.ndim != 2 or ids.shape[0] == 0:
            raise InputError(f"encoded probes must be input_ids and attention_mask of one shape [N > 0, T], "
                             f"got {tuple(ids.shape)} and {tuple(mask.shape)}")
    else:
        if isinstance(probes, str):
            raise InputError("probes must be a list of texts (or encoded input_ids and attention_mask), got one string")
        if len(probes) == 0:
            raise EmptyInputError("no probe texts given: give a list of texts or encoded (input_ids, attention_mask)")
        ids, mask = encode_probes(tokenizer, list(probes))
    return EvaluationData(tokenizer, checked, ids, mask, task_scoring)
