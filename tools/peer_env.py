#!/usr/bin/env python3
"""A throw-away virtual environment holding the peer, mergekit, for golden fixtures and benchmarks.

mergekit is never a dependency of karcher_lab: it is installed here, outside the project's `.venv/`,
at ``$KARCHER_LAB_PEER_VENV`` (default ``~/.cache/karcher_lab/peer-venv-mergekit-<version>``), with
the same local CPU torch wheel. ``python3 tools/peer_env.py`` prints the interpreter's path.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"


def peer_venv_dir() -> Path:
    default = Path.home() / ".cache" / "karcher_lab" / f"peer-venv-mergekit-{MERGEKIT_VERSION}"
    return Path(os.environ.get("KARCHER_LAB_PEER_VENV", default))


def ensure_peer_python() -> Path:
    """Create the peer venv if needed (idempotent) and return its python executable."""
    venv = peer_venv_dir()
    python = venv / "bin" / "python"
    probe = [str(python), "-c", f"import mergekit, importlib.metadata as m; assert m.version('mergekit') == '{MERGEKIT_VERSION}'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", TORCH_PIN], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return python


if __name__ == "__main__":
    print(ensure_peer_python())
