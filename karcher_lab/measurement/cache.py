"""A disk cache of the experts' own measurements (:class:`~karcher_lab.measurement.experts.ExpertMeasurements`),
so that a later session over the same experts, data and settings loads them instead of running every
expert again.

An entry holds everything measured on one expert: its answer log-probabilities, quality, activation
statistics, layer metrics and tensor norms. Its key is SHA-256 over:

- the expert's content fingerprint (:mod:`karcher_lab.io.fingerprint`: its files' bytes, so any change
  to a weight file or config.json is a new key);
- the task it is judged on, that task's examples and scoring options, the probe batch, the tokenizer
  (its vocabulary, special tokens and chat template);
- the measurement settings and the model dtype;
- the code of the measuring modules (:data:`MEASURING_MODULES`, without docstrings and comments) and the
  torch and transformers versions.

Entries live in ``<cache root>/measurements/`` (:func:`karcher_lab.cache_root.cache_root`), one file
each, written atomically; :func:`clear_measurements` (``karcher-lab cache clear``) deletes them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers

from karcher_lab.cache_root import cache_root, code_fingerprint
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.scoring import TaskScoring

MEASUREMENTS_DIR = "measurements"
DIGESTS_FILE = "file_digests.json"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
MEASURING_MODULES = (
    "diagnostics/activations.py", "diagnostics/collapse.py", "diagnostics/function.py", "diagnostics/scoring.py",
    "diagnostics/sequences.py", "diagnostics/weights.py", "measurement/experts.py",
)
"""The modules, relative to the package directory, whose code an expert's measurements depend on."""


def measurements_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache root>/measurements``."""
    return cache_root(cache_dir) / MEASUREMENTS_DIR


def clear_measurements(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every cached measurement (and the remembered file digests); returns the bytes freed."""
    directory = measurements_dir(cache_dir)
    if not directory.is_dir():
        return 0
    freed = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    shutil.rmtree(directory)
    return freed


def _hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of what the tokenizer encodes and decodes with: its class, vocabulary, special tokens,
    chat template and whether it adds BOS/EOS."""
    return _hash(type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                 getattr(tokenizer, "special_tokens_map", {}), getattr(tokenizer, "chat_template", None),
                 getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))


def code_identity() -> str:
    """A hash of the measuring modules' code and the torch / transformers versions."""
    return _hash([code_fingerprint((PACKAGE_DIR / m).read_text(encoding="utf-8")) for m in MEASURING_MODULES],
                 torch.__version__, transformers.__version__)


def entry_key(expert: str, task: str | None, examples: list[Example], scoring: TaskScoring | None,
              probes: tuple[torch.Tensor, torch.Tensor], tokenizer_id: str, settings: Any, code_id: str) -> str:
    """The key of one expert's entry (see the module docstring); ``expert`` is its content fingerprint."""
    ids, mask = probes
    return _hash(expert, task, [[e.prompt, e.answer] for e in examples],
                 None if scoring is None else dataclasses.asdict(scoring),
                 ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes(), list(ids.shape), tokenizer_id,
                 {k: str(v) for k, v in dataclasses.asdict(settings).items()}, code_id)


class MeasurementCache:
    """Entries in ``directory`` (default :func:`measurements_dir`), one file per key."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else measurements_dir()

    @property
    def digests_file(self) -> Path:
        """Where file digests are remembered (:class:`~karcher_lab.io.fingerprint.DigestMemo`)."""
        return self.directory / DIGESTS_FILE

    def _file(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``, or None (also for an unreadable file, which is then removed)."""
        file = self._file(key)
        if not file.is_file():
            return None
        try:
            return torch.load(file, weights_only=False)
        except Exception:  # a torn or foreign file: measure again
            file.unlink(missing_ok=True)
            return None

    def save(self, key: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` under ``key`` atomically (written aside, then renamed)."""
        file = self._file(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f".{file.name}.{os.getpid()}")
        torch.save(entry, partial)
        os.replace(partial, file)
