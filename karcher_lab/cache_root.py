"""The lab's cache directory: built zoo pools (:mod:`karcher_lab.zoo.cache`), the SmolLM2 conversion
and the experts' cached measurements (:mod:`karcher_lab.measurement.cache`) live under it.

The root is, in order: a ``cache_dir`` argument (the CLI's ``--cache-dir``), the environment variable
``KARCHER_LAB_CACHE``, or ``~/.cache/karcher_lab``.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

CACHE_ENV = "KARCHER_LAB_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else $KARCHER_LAB_CACHE, else ~/.cache/karcher_lab."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "karcher_lab").expanduser()


def code_fingerprint(source: str) -> str:
    """A module's code without its docstrings and comments: the dump of its syntax tree (what cache keys
    hash, so that documentation edits keep a cache)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)
