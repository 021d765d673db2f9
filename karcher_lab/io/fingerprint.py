"""Content fingerprints of checkpoints: what a cache of measurements keys an expert by.

A file's digest is BLAKE2b-128 over its bytes. Hashing gigabytes on every start would cost seconds, so
digests are remembered in a JSON file next to the cache, keyed by the file's resolved path, size,
modification time (ns) and inode: any write to the file changes its modification time and so forces
the file to be hashed again. The fingerprint of a source is the digest over its files' names and
digests (weights, config.json; an adapter folded on a base: both folders').
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from karcher_lab.io.checkpoint import Checkpoint

CHUNK = 1 << 24
"""Bytes read per step while hashing a file."""


def file_digest(path: Path) -> str:
    """BLAKE2b-128 of a file's bytes, in hex."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DigestMemo:
    """File digests remembered across runs in the JSON file ``path`` (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._known: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            self._known = {}

    def digest(self, file: Path) -> str:
        file = file.resolve()
        stat = file.stat()
        key = f"{file}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
        if key not in self._known:
            self._known[key] = file_digest(file)
            self._write()
        return self._known[key]

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps(self._known), encoding="utf-8")
        os.replace(partial, self.path)


def source_files(source: object) -> list[Path] | None:
    """The files a source's tensors come from (weights and config.json; for a PEFT adapter folded on a
    base, the base's and the adapter's); None for a model held in memory."""
    if not isinstance(source, Checkpoint):
        return None
    files = [*sorted({info.file for info in source.tensors.values()}), source.directory / "config.json"]
    adapter = getattr(source, "adapter_directory", None)
    if adapter is not None:
        files += sorted(f for f in Path(adapter).iterdir() if f.is_file())
    return files


def fingerprint(files: Iterable[Path], memo: DigestMemo) -> str:
    """The digest over the files' names and contents (see the module docstring)."""
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        digest.update(f"{Path(file).name}={memo.digest(Path(file))};".encode())
    return digest.hexdigest()
