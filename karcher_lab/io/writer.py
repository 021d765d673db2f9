"""Streaming sharded safetensors output with no shard buffer.

Every output tensor's name, shape and dtype are known before the merge starts, so the shard layout and
each shard's safetensors header are fixed up front: tensors are assigned to shards greedily in merge
order (a new shard starts when the next tensor would exceed ``max_shard_bytes``; a larger tensor gets a
shard of its own), each header is written when its shard is opened, and each merged tensor's bytes go
straight to disk. Memory held by the writer is one tensor's bytes at most, whatever the shard size.

Files follow transformers' conventions: one shard is ``model.safetensors``; several are
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (``metadata.total_size`` and
``weight_map``). Headers are compact JSON in merge order, padded with spaces to a multiple of 8 bytes
(as the safetensors library does), with ``__metadata__ = {"format": "pt"}``: the same inputs give
byte-identical files.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

from karcher_lab.errors import ParameterError

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
INDEX_NAME = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB``, ``1.5G`` or a plain integer (KB/MB/GB are powers of 1000,
    KiB/MiB/GiB powers of 1024, as in transformers' ``max_shard_size``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ParameterError(f"shard size {text!r} is not a size such as 5GB, 500MB or 2GiB")
        unit = (match.group(2) or "").lower()
        scale = 1024 ** " kmgt".index(unit[0]) if unit.endswith("ib") else _UNITS[unit[:1]]
        value = int(float(match.group(1)) * scale)
    if value < 1:
        raise ParameterError(f"shard size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as written: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy assignment in the given order: start a new shard when the next tensor would not fit."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def _header(shard: Sequence[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        entries[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write the planned tensors, in plan order, into ``directory`` (see the module docstring).

    Call :meth:`write` once per tensor in the order of ``specs``, then :meth:`finish`; a tensor of
    another name, shape or dtype than planned is a programming error (AssertionError).
    """

    def __init__(self, directory: Path, specs: Sequence[TensorSpec], max_shard_bytes: int):
        self.directory = Path(directory)
        self.shards = plan_shards(specs, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self.bytes_written = 0
        self._order = [(s, i) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._file: BinaryIO | None = None

    def _open(self, shard_index: int) -> None:
        self._close_file()
        self._file = open(self.directory / self.file_names[shard_index], "wb")
        header = _header(self.shards[shard_index])
        self._file.write(header)
        self.bytes_written += len(header)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec, shard_index = self._order[self._next]
        assert (name, tuple(tensor.shape), tensor.dtype) == (spec.name, spec.shape, spec.dtype), (
            f"writer expected {spec}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
        )
        if self._next == 0 or self._order[self._next - 1][1] != shard_index:
            self._open(shard_index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self.bytes_written += spec.nbytes
        self._next += 1

    def finish(self) -> list[str]:
        """Close the last shard, write the index (several shards) and return the files written."""
        assert self._next == len(self._order), f"{len(self._order) - self._next} planned tensors were never written"
        self._close_file()
        files = list(self.file_names)
        if len(self.shards) > 1:
            weight_map = {s.name: f for shard, f in zip(self.shards, self.file_names) for s in shard}
            index = {"metadata": {"total_size": sum(s.nbytes for shard in self.shards for s in shard)}, "weight_map": dict(sorted(weight_map.items()))}
            text = json.dumps(index, indent=2) + "\n"
            (self.directory / INDEX_NAME).write_text(text, encoding="utf-8")
            self.bytes_written += len(text.encode("utf-8"))
            files.append(INDEX_NAME)
        return files

    def close(self) -> None:
        """Release the open file (on errors); the directory is discarded by the caller."""
        self._close_file()
