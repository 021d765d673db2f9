"""Lazy, read-only access to the tensors of a checkpoint, one tensor at a time.

A checkpoint is a directory with ``config.json`` and weights, looked up in this order:
``model.safetensors.index.json`` (sharded), ``model.safetensors``, any other ``*.safetensors``,
``pytorch_model.bin.index.json``, ``pytorch_model.bin``, other ``*.bin``/``*.pt`` weight files.
Only the safetensors headers are read up front (names, shapes, dtypes); :meth:`Checkpoint.load` reads
one tensor through safetensors' lazy ``safe_open`` and closes the file again, so the memory mapping of a
multi-gigabyte shard never accumulates in the process's resident set. ``.bin``/``.pt`` files are read
only with ``torch.load(weights_only=True, mmap=True)``: no arbitrary object is ever unpickled.
Sources are opened read-only and never written.

:class:`StateDictSource` offers the same interface for models already in memory (a state dict, or a
transformers model), so notebooks can merge without writing checkpoints first.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from karcher_lab.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt")


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, and the file that holds it (None in memory)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class Checkpoint:
    """A checkpoint directory: ``config`` (config.json as a dict), ``tensors`` (name → TensorInfo, in
    stored order) and :meth:`load` for one tensor at a time. ``label`` names it in messages."""

    def __init__(self, directory: str | Path, label: str | None = None):
        self.directory = Path(directory)
        self.label = label or str(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file() and (self.directory / "adapter_config.json").is_file():
            raise CheckpointError(f"model {self.label} is a LoRA adapter (adapter_config.json); merge it into its base model first")
        if not config_path.is_file():
            raise CheckpointError(f"model {self.label}: no config.json in {self.directory}")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"model {self.label}: config.json is not valid JSON ({exc})") from None
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        files = self._weight_files()
        for file in files:
            if file.suffix == ".safetensors":
                self._add_safetensors(file)
            else:
                self._add_pickled(file)

    def _weight_files(self) -> list[Path]:
        d = self.directory
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CheckpointError(f"model {self.label}: {index_name} has no valid 'weight_map'") from None
                files = sorted({d / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"model {self.label}: shard(s) {missing} listed in {index_name} are missing")
                return files
        for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin", "*.pt"):
            files = sorted(f for f in d.glob(pattern) if f.is_file() and f.name not in NOT_WEIGHTS)
            if files:
                return files
        raise CheckpointError(f"model {self.label}: no weights (*.safetensors, *.bin, *.pt) in {d}")

    def _add(self, name: str, info: TensorInfo) -> None:
        if name in self.tensors:
            raise CheckpointError(f"model {self.label}: tensor {name!r} is stored twice ({self.tensors[name].file.name}, {info.file.name})")
        self.tensors[name] = info

    def _add_safetensors(self, file: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = sl.get_dtype()
                    if dtype not in SAFETENSORS_DTYPES:
                        raise CheckpointError(f"model {self.label}: tensor {name!r} has unsupported dtype {dtype}")
                    self._add(name, TensorInfo(tuple(sl.get_shape()), SAFETENSORS_DTYPES[dtype], file))
        except SafetensorError as exc:
            raise CheckpointError(f"model {self.label}: {file.name} is not a valid safetensors file ({exc})") from None

    def _add_pickled(self, file: Path) -> None:
        for name, t in self._pickled_state(file).items():
            self._add(name, TensorInfo(tuple(t.shape), t.dtype, file))

    def _pickled_state(self, file: Path) -> dict[str, torch.Tensor]:
        """A .bin/.pt state dict via torch.load(weights_only=True), memory-mapped when the format allows."""
        if file not in self._pickled:
            try:
                try:
                    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:  # legacy (non-zip) serialization cannot be memory-mapped
                    if "mmap" not in str(exc):
                        raise
                    state = torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"model {self.label}: {file.name} holds objects other than tensors, and karcher-lab loads "
                    f".bin/.pt files only with weights_only=True (never unpickling arbitrary code): {exc}"
                ) from None
            except (RuntimeError, EOFError, OSError) as exc:
                raise CheckpointError(f"model {self.label}: cannot read {file.name} ({exc})") from None
            if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
                state = state["state_dict"]
            if not isinstance(state, Mapping):
                raise CheckpointError(f"model {self.label}: {file.name} does not hold a state dict")
            self._pickled[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._pickled[file]

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype)."""
        info = self.tensors[name]
        if info.file.suffix != ".safetensors":
            return self._pickled_state(info.file)[name]
        from safetensors import safe_open

        with safe_open(info.file, framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor (CPU, stored dtype); from a safetensors file only those bytes
        are read."""
        info = self.tensors[name]
        if info.file.suffix != ".safetensors":
            return self._pickled_state(info.file)[name][start:stop]
        from safetensors import safe_open

        with safe_open(info.file, framework="pt", device="cpu") as f:
            return f.get_slice(name)[start:stop]


class StateDictSource:
    """An in-memory model with the :class:`Checkpoint` interface: a ``{name: tensor}`` mapping, or any
    object with ``state_dict()`` (a transformers model, whose ``config`` is used when present). A tied
    head (a tensor sharing the input embedding's storage) is left out, as ``save_pretrained`` does."""

    directory: Path | None = None

    def __init__(self, model: Any, label: str, config: Mapping[str, Any] | None = None):
        state = model.state_dict() if hasattr(model, "state_dict") else model
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"model {label}: expected a path, a hub id, a {{name: tensor}} dict or a model, got {type(model).__name__}")
        if config is None and hasattr(getattr(model, "config", None), "to_dict"):
            config = model.config.to_dict()
        self.label = label
        self.config: dict[str, Any] = dict(config or {})
        head = state.get("lm_head.weight")
        if head is not None and any(k != "lm_head.weight" and v.data_ptr() == head.data_ptr() for k, v in state.items()):
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        self._state = state
        self.tensors = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}

    def load(self, name: str) -> torch.Tensor:
        return self._state[name].detach()

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._state[name].detach()[start:stop]
