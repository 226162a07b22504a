#!/usr/bin/env bash
# Download, on a machine with package access, the pure-Python wheels that the GPU image lacks
# and the GPU check needs (vector-quantize-pytorch and its small dependencies: the peer of the
# layer/search benchmarks and of tests/compat/test_compat.py), into .whl/ (git-ignored, ~0.4 MB).
# The GPU machine reaches no network: carry the folder there and install it with
#     bash benchmarks/gpu_check.sh --wheels .whl STAGE ...
# (the device tool's `run` takes carry=[".whl"]).  Versions are the ones CI tests against;
# --no-deps everywhere: torch, triton and numpy must stay the image's own.
#
# Usage: bash benchmarks/gpu_wheels.sh [DIR]   (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
"$PY" -m pip download --no-deps --only-binary=:all: -q -d "$DIR" \
    vector-quantize-pytorch==1.32.0 einx==0.4.3 loguru==0.7.3 torch-einops-utils==0.2.0 \
    frozendict==2.5.1
ls -la "$DIR"
