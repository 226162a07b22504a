#!/usr/bin/env bash
# Run the Triton tests against another Triton release than the installed one (default 3.6.0,
# the release the GPU image ships beside torch 2.11), without touching the main environment:
# a throwaway venv layered over the installed torch and dependencies gets only that triton.
# It runs tests/backends/test_triton.py: the interpreter tests on CPU tensors and the sm_90
# ahead-of-time compiles (register spills, shared memory, wgmma use of every shipped config).
# This catches language/API drift and codegen differences before a GPU session meets them.
# It is not part of CI (it downloads a ~190 MB wheel); run it after changing a Triton kernel.
#
# Usage: bash scripts/check_triton_compat.sh [VERSION] [pytest args...]
#   e.g. bash scripts/check_triton_compat.sh 3.6.0 -k sm90
# Env: PYTHON (default python3), VENV (default /tmp/vqkernels-triton-<VERSION>; reused).
#
# Triton < 3.7's interpreter converts 1-element numpy arrays with int(), which numpy >= 2.4
# refuses ("only 0-dimensional arrays can be converted"): those releases get numpy < 2.4 in
# the venv too.  That is an interpreter-only problem; compiled kernels do not use numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.6.0}
[[ $# -gt 0 ]] && shift
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/vqkernels-triton-$VERSION}

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
# --no-deps: torch stays the installed one (an unpinned torch would pull CUDA packages).
"$VENV/bin/python" -m pip install -q --no-deps "triton==$VERSION"
if "$VENV/bin/python" - "$VERSION" <<'EOF'; then
import sys
major, minor = (int(p) for p in sys.argv[1].split(".")[:2])
sys.exit(0 if (major, minor) < (3, 7) else 1)
EOF
    "$VENV/bin/python" -m pip install -q "numpy<2.4"
fi
"$VENV/bin/python" -c 'import torch, triton, numpy; print(f"[triton_compat] triton {triton.__version__}, torch {torch.__version__}, numpy {numpy.__version__}")'
# The repo root first on the path: the tests import vqkernels from this checkout (its compiled
# CPU extension included), whatever the venv's site-packages hold.
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} CI=${CI:-true} \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/backends/test_triton.py "$@"
