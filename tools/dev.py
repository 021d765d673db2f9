#!/usr/bin/env python3
"""Set up `.venv/` idempotently and run the project's two entry points.

    python3 tools/dev.py demo [ARGS...]   # the main job on the embedded default data
    python3 tools/dev.py test [ARGS...]   # the whole test suite (pytest ARGS...)

Only the standard library is used here, so this runs on a fresh machine with nothing but Python 3.
The virtual environment lives at `<repo>/.venv`; it is (re)installed only when pyproject.toml or this
file changed since the last install (a hash stamp in `.venv/`). torch is pinned to 2.13.0 when the
environment has no torch yet, so that a CPU wheel is used rather than a multi-GB CUDA build.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".karcher_lab_install_stamp"
TORCH_PIN = "torch==2.13.0"
PYTEST_NO_TESTS_COLLECTED = 5


def _stamp() -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", Path(__file__).resolve()):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_venv() -> None:
    if not PY.exists():
        _run([sys.executable, "-m", "venv", str(VENV)])
    if STAMP.exists() and STAMP.read_text() == _stamp():
        return
    has_torch = subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        _run([str(PY), "-m", "pip", "install", "--quiet", TORCH_PIN])
    _run([str(PY), "-m", "pip", "install", "--quiet", "-e", ".[test]"])
    STAMP.write_text(_stamp())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    ensure_venv()
    command, rest = argv[0], argv[1:]
    if command == "setup":
        return 0
    if command == "demo":
        return subprocess.run([str(BIN / "karcher-lab"), "demo", *rest], cwd=ROOT).returncode
    code = subprocess.run([str(PY), "-m", "pytest", *rest], cwd=ROOT).returncode
    if code == PYTEST_NO_TESTS_COLLECTED:
        print("error: no tests ran", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
