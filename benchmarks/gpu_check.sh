#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and a CUDA build of torch in .venv/ (or $PYTHON), run the
# CUDA tests (merges and explorer updates on cuda equal the CPU's) and the scale benchmark on the GPU,
# with N = 5 experts of the Qwen2-0.5B shape. Prints the GPU, the test summary and the benchmark table.
#   bash benchmarks/gpu_check.sh [N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; install a CUDA build of torch first")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
"$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_pipeline.py tests/test_study_explorer.py
"$PY" benchmarks/explorer_scale.py --device cuda --n "${@:-5}" --baseline "" --folder "${SCALE_FOLDER:-/tmp/explorer_scale}"
