"""Prompt/answer examples: what the function-space metrics score a model on.

An :class:`Example` is one instance of a task: the model sees ``prompt`` and should continue it with
``answer``. The zoo's tasks generate them (:mod:`karcher_lab.zoo.tasks`), users' files, lists and datasets
give them (:mod:`karcher_lab.diagnostics.task_data`); metrics take any list of them
(:mod:`karcher_lab.diagnostics.function`), tokenized by :mod:`karcher_lab.diagnostics.sequences`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One task instance: the model sees ``prompt`` and should continue it with ``answer``."""

    prompt: str
    answer: str
