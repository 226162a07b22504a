#!/usr/bin/env bash
# Set up (pinned torch, deps, C++ build) and run the whole test suite. CI runs this via .ci/run.
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -k nearest_code
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
# Every .cu file must compile for sm_80 and sm_90 even where nothing CUDA can run.
bash .ci/compile_cuda.sh
export CI=${CI:-true}              # selects the bounded hypothesis profile
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$PY" -m pytest -q "$@"
