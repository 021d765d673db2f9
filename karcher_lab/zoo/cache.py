"""Where built pools live: a cache directory, keyed by a hash of the building code, data and config.

The cache root is, in order: the ``cache_dir`` argument (the CLI's ``--cache-dir``), the environment
variable ``KARCHER_LAB_CACHE``, or ``~/.cache/karcher_lab``. A pool lives in
``<root>/zoo/<size>-<key>`` where ``key`` is the first 16 hex digits of SHA-256 over the code of the
modules that build it (``BUILD_MODULES``: the zoo's, and the diagnostics modules it tokenizes and
decodes examples with; their syntax tree without docstrings and comments, so documentation edits keep
the cache), the task data files, the config, and the torch / transformers versions: changing any of
them builds a new pool instead of reusing a stale one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import transformers

from karcher_lab.cache_root import CACHE_ENV, cache_root, code_fingerprint  # noqa: F401  (re-exported)
from karcher_lab.zoo.corpus import DATA_DIR

PACKAGE_DIR = Path(__file__).resolve().parents[1]
BUILD_MODULES = (
    "zoo/build.py", "zoo/catalog.py", "zoo/config.py", "zoo/conflicts.py", "zoo/corpus.py", "zoo/evaluate.py",
    "zoo/synthetic.py", "zoo/tasks.py", "zoo/tokenizer.py", "zoo/train.py",
    "diagnostics/examples.py", "diagnostics/sequences.py",
)
"""The modules, relative to the package directory, whose code a pool's weights and scores depend on."""



def build_key(config_dict: dict) -> str:
    """Hash of the building code, the task data, the config and the library versions."""
    digest = hashlib.sha256()
    for name in BUILD_MODULES:
        digest.update(name.encode() + code_fingerprint((PACKAGE_DIR / name).read_text()).encode())
    for path in sorted(DATA_DIR.glob("*.txt")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(json.dumps(config_dict, sort_keys=True).encode())
    digest.update(f"torch={torch.__version__};transformers={transformers.__version__}".encode())
    return digest.hexdigest()[:16]


def pool_dir(config_dict: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of the pool built from ``config_dict`` (it may not exist yet)."""
    return cache_root(cache_dir) / "zoo" / f"{config_dict['size']}-{build_key(config_dict)}"
