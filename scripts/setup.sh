#!/usr/bin/env bash
# Set up vqkernels on a fresh machine: pinned torch (CPU wheel), Python deps, and the C++ build.
# Idempotent: re-running skips what is already installed and rebuilds only changed sources.
# Usage: bash scripts/setup.sh [extras]   (extras default: dev,models,bench,peers,triton)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-dev,models,bench,peers,triton}
PIP=("$PY" -m pip install -q --disable-pip-version-check)

# 1. torch first, pinned: everything else is installed under a constraint that keeps it.
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" else 1)' 2>/dev/null; then
    echo "[setup] installing torch==2.13.0"
    "${PIP[@]}" torch==2.13.0
fi
# 2. build tools + extras (the constraint file pins torch and triton).
"${PIP[@]}" -c .ci/constraints.txt setuptools wheel ninja
echo "[setup] installing vqkernels[$EXTRAS] and building the C++ extension"
MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" -c .ci/constraints.txt --no-build-isolation -e ".[$EXTRAS]"
"$PY" -m vqkernels
