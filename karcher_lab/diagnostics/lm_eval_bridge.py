"""lm-evaluation-harness as a quality source: a model held in memory scored on lm-eval tasks, the metrics
and their standard errors as one tidy table.

    table = lm_eval_scores(model, tokenizer, {"hellaswag": "hellaswag", "units": "zoo_units_mc"},
                           include=["my_tasks/"], limit=200)

- The model is wrapped by lm-eval's Hugging Face wrapper (``lm_eval.models.huggingface.HFLM``) as it is:
  nothing is saved or reloaded, so a merged state loaded into a model in memory is what is scored.
- The tokenizer's own special-token behaviour is kept (``add_bos_token=None``): a tokenizer that
  prepends its BOS token to a text (a model trained with one) has every context scored with it, one that
  does not, without.
- Tasks are found by lm-eval's :class:`~lm_eval.tasks.TaskManager`; ``include`` adds local task folders
  as lm-eval's ``--include_path`` does. When every task is found in them, lm-eval's built-in task index
  is not read at all.
- A task's data are loaded by lm-eval (the ``datasets`` library, from its local cache or the files a
  task names). :func:`check_tasks` loads them before any model runs: data that cannot be loaded give
  lm-eval's own error, wrapped in a :class:`~karcher_lab.errors.DataError` that names the task and keeps
  the original as its cause (:func:`evaluate` lets lm-eval's error through as it is).

lm-eval is an optional dependency (``pip install 'karcher-lab[lm-eval]'``); without it every function
here raises :class:`~karcher_lab.errors.NotSupportedError` saying so.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from karcher_lab.errors import DataError, NotSupportedError, ParameterError

LM_EVAL_COLUMNS = ["task", "metric", "mean", "std", "n"]
"""The columns of :func:`scores_table`: ``mean`` is lm-eval's value of the metric, ``std`` its standard
error (NaN where lm-eval gives none), ``n`` the documents scored."""
INSTALL_HINT = "pip install 'karcher-lab[lm-eval]'"
NO_FILTER = "none"
"""lm-eval's name of the unfiltered responses (metric keys ``METRIC,FILTER``)."""


def require_lm_eval() -> Any:
    """The ``lm_eval`` module.

    Raises
    ------
    NotSupportedError
        lm-eval is not installed (the message says how to install it).
    """
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401
    except ImportError as err:
        raise NotSupportedError(f"lm-evaluation-harness tasks need the lm-eval package ({err}): {INSTALL_HINT}") from None
    return lm_eval


def task_manager(tasks: Sequence[str], include: Sequence[str | os.PathLike] = ()) -> Any:
    """An lm-eval ``TaskManager`` that knows every task of ``tasks``: the ``include`` folders alone when
    they hold them all, else the folders and lm-eval's built-in tasks.

    Raises
    ------
    DataError
        An include folder that does not exist, or a task that neither knows.
    NotSupportedError
        lm-eval is not installed.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    folders = [str(Path(p).expanduser()) for p in include]
    missing = [p for p in folders if not Path(p).is_dir()]
    if missing:
        raise DataError(f"lm-eval include folder(s) {missing} do not exist")
    if folders:
        manager = TaskManager(include_path=folders, include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
    manager = TaskManager(include_path=folders or None)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        where = f" nor in the include folder(s) {folders}" if folders else ""
        raise DataError(f"lm-eval knows no task(s) {unknown} among its built-in tasks{where}")
    return manager


def check_tasks(tasks: Sequence[str], include: Sequence[str | os.PathLike] = ()) -> None:
    """Check that lm-eval knows every task and can load its data, before any model is run.

    Raises
    ------
    DataError
        An unknown task, a missing include folder, or data that cannot be loaded (lm-eval's own error as
        the cause).
    NotSupportedError
        lm-eval is not installed.
    """
    manager = task_manager(tasks, include)
    try:
        manager.load(list(tasks))
    except Exception as err:  # lm-eval and datasets raise many types; the message and the cause are kept
        raise DataError(f"lm-eval could not load the data of task(s) {tasks}: {type(err).__name__}: {err} (nothing "
                        "is downloaded by karcher-lab; the data must be in the local datasets cache or in the "
                        "files the task names)") from err


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], *, include: Sequence[str | os.PathLike] = (),
             limit: int | None = None, batch_size: int = 8, bootstrap_iters: int = 1000,
             log_samples: bool = False) -> dict:
    """lm-eval's result of scoring ``model`` in memory on ``tasks`` (see the module docstring).

    Parameters
    ----------
    model : transformers causal LM
        Scored as it is, on its own device (nothing is saved, reloaded or moved).
    tokenizer
        Its tokenizer; its special-token behaviour is kept.
    tasks : sequence of str
        lm-eval task names.
    include : sequence of path-like
        Local task folders (lm-eval's ``--include_path``).
    limit : int, optional
        Score only the first ``limit`` documents of each task.
    batch_size : int
        Requests per forward pass.
    bootstrap_iters : int
        lm-eval's bootstrap resamples for the standard errors of metrics without a closed form.
    log_samples : bool
        Keep each document's requests and scores (``result["samples"]``).

    Returns
    -------
    dict
        What ``lm_eval.simple_evaluate`` returns: ``results`` per task (``METRIC,FILTER`` and
        ``METRIC_stderr,FILTER``), ``n-samples``, and ``samples`` with ``log_samples``.

    Raises
    ------
    ParameterError
        No task, or a bad ``limit`` or ``batch_size``.
    DataError, NotSupportedError
        An unknown task or include folder, or lm-eval not installed (:func:`task_manager`); data that
        cannot be loaded raise lm-eval's own error.
    """
    tasks = list(tasks)
    if not tasks:
        raise ParameterError("no lm-eval task given")
    for name, value in (("limit", limit), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ParameterError(f"{name} must be an integer >= 1, got {value!r}")
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=None)
    return lm_eval.simple_evaluate(model=wrapped, tasks=tasks, task_manager=manager, limit=limit,
                                   bootstrap_iters=bootstrap_iters, log_samples=log_samples, verbosity="ERROR")


def scores_table(result: Mapping[str, Any], names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The metrics of an lm-eval result (:func:`evaluate`) as rows of :data:`LM_EVAL_COLUMNS`.

    Parameters
    ----------
    result : mapping
        lm-eval's result.
    names : mapping of str to str, optional
        lm-eval task → the name its rows get (default: lm-eval's name).

    Returns
    -------
    DataFrame
        One row per (task, metric); a metric of a filter other than lm-eval's unfiltered ``none`` is named
        ``METRIC,FILTER``.
    """
    names = dict(names or {})
    rows = []
    for task, values in result["results"].items():
        n = result.get("n-samples", {}).get(task, {}).get("effective", float("nan"))
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            rows.append(dict(task=names.get(task, task), metric=metric if filter_name == NO_FILTER else key,
                             mean=float(value), std=float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                             n=n))
    return pd.DataFrame(rows, columns=LM_EVAL_COLUMNS)


def lm_eval_scores(model: Any, tokenizer: Any, tasks: Mapping[str, str], *, include: Sequence[str | os.PathLike] = (),
                   limit: int | None = None, batch_size: int = 8, bootstrap_iters: int = 1000) -> pd.DataFrame:
    """``model`` in memory scored on lm-eval ``tasks`` ({name: lm-eval task}) as a tidy table
    (:data:`LM_EVAL_COLUMNS`, ``task`` = the given name); parameters and errors as :func:`evaluate`."""
    result = evaluate(model, tokenizer, list(tasks.values()), include=include, limit=limit, batch_size=batch_size,
                      bootstrap_iters=bootstrap_iters)
    return scores_table(result, {task: name for name, task in tasks.items()})
