"""The catalogue of zoo tasks: every task by name, in the pool's order."""
from __future__ import annotations

from karcher_lab.errors import ParameterError
from karcher_lab.zoo.corpus import TEXT_TASKS
from karcher_lab.zoo.synthetic import SYNTHETIC_TASKS
from karcher_lab.zoo.tasks import Task

TASKS: dict[str, Task] = {task.name: task for task in SYNTHETIC_TASKS + TEXT_TASKS}


def get_task(name: str) -> Task:
    """The task called ``name``; a clear error listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ParameterError(f"unknown zoo task {name!r}; known tasks: {', '.join(TASKS)}") from None
