"""The sweep's results table: one tidy row per measurement, stored one file per finished cell.

Columns (:data:`RESULT_COLUMNS`, fixed so that widgets and notebooks can read any run):

``pool, order, method, m, experts, scope, task, site, layer, metric, mean, std``

- ``pool``: the name of the pool or study swept;
- ``experts``: the merged experts' names (a pool's experts are named by their task) joined with ``+``,
  in merge order;
- scope ``task``: ``task`` names a task, ``site = ""``, ``layer = -1``; metric in
  {accuracy, normalized_accuracy, nll, kl, fisher_rao};
- scope ``layer``: ``task = ""``, ``site`` in {residual, attention, mlp}, ``layer = 0..L-1``; metric in
  {variance, effective_rank, numerical_rank, variance_ratio, effective_rank_ratio, numerical_rank_ratio};
- scope ``weights``: whole-model weight metrics (``site = ""``, ``layer = -1``), e.g. ``norm_ratio``;
- scope ``summary``: one value per (order, method, m), e.g. ``avg_normalized_accuracy``, ``avg_nll``;
- the experts themselves appear as ``method = "expert"``, ``m = 1``, ``order = ""``, ``experts`` = the
  expert's name: their quality on their own task and their layer metrics (the reference every ratio is
  taken against).

A *cell* is one (order, method, m) of a run (or one expert). :class:`ResultStore` writes each finished
cell as its own CSV file under ``RUN/cells/``, atomically (a temporary file named by host, process and a
random token, fsync, rename), so an interrupted run loses at most the cells in flight and a rerun skips
every cell already on disk. Any number of writers, on any number of machines sharing the run directory,
may write cells at once: each writes only its own files and renames them into place, with no lock and
no file that two writers append to. A cell that raised is recorded as ``RUN/failed/KEY.json`` (its
identity, the error and its traceback) and is tried again by the next run; writing the cell removes
the record. :meth:`ResultStore.consolidate` gathers the cells into ``RUN/results.csv``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import traceback
import uuid
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from karcher_lab.errors import InputError

RESULT_COLUMNS = ["pool", "order", "method", "m", "experts", "scope", "task", "site", "layer", "metric", "mean", "std"]
SCOPES = ("task", "layer", "weights", "summary")
RESULTS_FILE = "results.csv"
CELLS_DIR = "cells"
CONFIG_FILE = "config.json"
FAILED_DIR = "failed"
FAILURE_COLUMNS = ["key", "order", "method", "m", "experts", "error", "message", "host"]
"""The columns of :meth:`ResultStore.failures`."""

_DTYPES = {"pool": str, "order": str, "method": str, "m": int, "experts": str, "scope": str, "task": str,
           "site": str, "layer": int, "metric": str, "mean": float, "std": float}


def _normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with exactly :data:`RESULT_COLUMNS`, in order, typed (empty strings, not NaN, in text columns)."""
    missing = [c for c in RESULT_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"results table lacks column(s) {missing}; expected {RESULT_COLUMNS}")
    frame = frame[RESULT_COLUMNS].copy()
    for column, kind in _DTYPES.items():
        frame[column] = frame[column].fillna("").astype(str) if kind is str else frame[column].astype(kind)
    bad = sorted(set(frame["scope"]) - set(SCOPES))
    if bad:
        raise InputError(f"results table has unknown scope(s) {bad}; scopes are {list(SCOPES)}")
    return frame.reset_index(drop=True)


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values={"mean": ["", "nan", "NaN"], "std": ["", "nan", "NaN"]})


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """The results of a run: ``path`` is a ``results.csv`` file or a run directory. A run directory
    is read from its finished cells (so a run still in progress, or interrupted, can be read);
    without cells, from its ``results.csv``. Rows in :data:`RESULT_COLUMNS`."""
    path = Path(path).expanduser()
    if path.is_dir():
        cells = sorted((path / CELLS_DIR).glob("*.csv")) if (path / CELLS_DIR).is_dir() else []
        if cells:
            return _normalize(pd.concat([_read_csv(c) for c in cells], ignore_index=True))
        path = path / RESULTS_FILE
    if not path.is_file():
        raise InputError(f"no sweep results at {path}: give a run directory (with {CELLS_DIR}/ or {RESULTS_FILE}) "
                         f"or a results CSV file")
    return _normalize(_read_csv(path))


def cell_key(order: str, method: str, m: int, experts: str) -> str:
    """A file-name-safe, unique name for a cell (readable prefix, hash of the exact identity)."""
    identity = f"{order}\x00{method}\x00{m}\x00{experts}"
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{order or 'expert'}__{method}__m{m:02d}")[:80]
    return f"{readable}__{hashlib.sha1(identity.encode()).hexdigest()[:10]}"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of this writer's own (host, process, random
    token) and an atomic rename: readers see the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ResultStore:
    """The results of one run directory: which cells are done, writing a finished cell, the run's
    config: the pool or study swept and the measurement settings (a rerun with another config would mix
    incomparable numbers: refused)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir).expanduser()
        self.cells_dir = self.run_dir / CELLS_DIR
        self.failed_dir = self.run_dir / FAILED_DIR

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's config (what is swept, the measurement settings), or check that it matches the
        recorded one.

        Raises
        ------
        InputError
            Naming every entry that differs, recorded and now.
        """
        file = self.run_dir / CONFIG_FILE
        wanted = json.loads(json.dumps(dict(config), sort_keys=True))
        if file.is_file():
            recorded = json.loads(file.read_text())
            differ = {k: (recorded.get(k), wanted.get(k)) for k in sorted(set(recorded) | set(wanted))
                      if recorded.get(k) != wanted.get(k)}
            if differ:
                raise InputError(
                    f"{self.run_dir} holds results measured with other settings "
                    + "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, (a, b) in differ.items())
                    + ". Use another --out directory (or the same settings to resume)."
                )
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(file, json.dumps(wanted, indent=1, sort_keys=True) + "\n")

    def has(self, key: str) -> bool:
        return (self.cells_dir / f"{key}.csv").is_file()

    def done(self) -> set[str]:
        """Keys of every finished cell."""
        return {p.stem for p in self.cells_dir.glob("*.csv")} if self.cells_dir.is_dir() else set()

    def read(self, key: str) -> pd.DataFrame:
        return _normalize(_read_csv(self.cells_dir / f"{key}.csv"))

    def write(self, key: str, rows: pd.DataFrame) -> None:
        """Store one finished cell (atomically: it is either all on disk or not at all) and remove the
        record of an earlier failure of it."""
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.cells_dir / f"{key}.csv", _normalize(rows).to_csv(index=False))
        (self.failed_dir / f"{key}.json").unlink(missing_ok=True)

    def write_failure(self, key: str, identity: Mapping[str, Any], error: BaseException) -> Path:
        """Record that cell ``key`` raised ``error`` (its identity: order, method, m, experts; the error's
        type, message and traceback; the host) and return the record's path."""
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        record = dict(key=key, **{k: identity.get(k, "") for k in ("order", "method", "m", "experts")},
                      error=type(error).__name__, message=str(error), host=socket.gethostname(),
                      traceback="".join(traceback.format_exception(error)))
        path = self.failed_dir / f"{key}.json"
        _write_atomic(path, json.dumps(record, indent=1) + "\n")
        return path

    def failures(self) -> pd.DataFrame:
        """The cells recorded as failed and not written since, one row each (:data:`FAILURE_COLUMNS`)."""
        files = sorted(self.failed_dir.glob("*.json")) if self.failed_dir.is_dir() else []
        records = [json.loads(f.read_text()) for f in files]
        records = [r for r in records if not self.has(r["key"])]
        return pd.DataFrame([{c: r[c] for c in FAILURE_COLUMNS} for r in records], columns=FAILURE_COLUMNS)

    def consolidate(self) -> Path:
        """Write every finished cell into ``RUN/results.csv`` (atomically) and return its path."""
        path = self.run_dir / RESULTS_FILE
        _write_atomic(path, load_results(self.run_dir).to_csv(index=False))
        return path
