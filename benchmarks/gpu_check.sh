#!/usr/bin/env bash
# The one script a GPU session runs: build the CUDA extension against the installed (CUDA) torch,
# run the test suite with the CUDA tests on, run the GPU benchmarks, collect the results.
#
# Usage: bash benchmarks/gpu_check.sh [STAGE ...] [--wheels DIR] [--quick]
#   STAGE: env | build | test-cuda | test | bench | collect | all (default: all, in that order).
#          Stages can be run one per call (a device call is limited to 10 minutes; build outputs
#          stay in the tree between calls on the same machine).
#   --wheels DIR   pip-install the wheels in DIR first (offline, --no-deps, into /tmp/site on
#                  PYTHONPATH) for packages the GPU image lacks (e.g. vector-quantize-pytorch);
#                  torch/triton/nvidia-* wheels are refused: the image's CUDA torch must stay.
#   --quick        benchmarks in --quick mode (small shapes, no result files).
# Env: PYTHON (default python3), MAX_JOBS (default 16), TORCH_CUDA_ARCH_LIST (default: the GPU's
#      own compute capability, e.g. 9.0, to build once instead of for sm_80 + sm_90),
#      VQKERNELS_TEST_ARGS (extra pytest args for the `test` stage), VQKERNELS_BENCHES (which
#      benchmark modules the `bench` stage runs, default: bench_nearest_code bench_ema_update
#      bench_quantize bench_layer; one per call fits the 10-minute limit better), OUT (when set,
#      logs and a results archive are copied there).
# Exit status: non-zero when any stage failed; every stage runs regardless, and a summary of
# the stages with their status and duration ends the output (and $OUT/gpu_check_summary.txt).
#
# A session with a lent GPU (device tool: 10 minutes a call, ~30 minutes in all; the machine
# has no network, and build outputs stay on it between calls while it is warm):
#   here:  bash benchmarks/gpu_wheels.sh          # vector-quantize-pytorch & co. into .whl/
#   run(carry=[".whl"]): bash benchmarks/gpu_check.sh --wheels .whl env build test-cuda
#   run(carry=[".whl"]): VQKERNELS_TEST_ARGS=-x bash benchmarks/gpu_check.sh --wheels .whl test
#   run(carry=[".whl"]): VQKERNELS_BENCHES=bench_nearest_code \
#                        bash benchmarks/gpu_check.sh --wheels .whl bench collect
#   (then bench_ema_update bench_quantize, and bench_layer, likewise), and commit the
#   benchmarks/results/gpu_* files unpacked from the returned gpu_results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
LOGDIR=${VQKERNELS_GPU_LOGDIR:-$ROOT/benchmarks/results/gpu_logs}
mkdir -p "$LOGDIR"

STAGES=()
WHEELS=""
QUICK=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --quick) QUICK="--quick"; shift ;;
        env|build|test-cuda|test|bench|collect) STAGES+=("$1"); shift ;;
        all) STAGES+=(env build test-cuda test bench collect); shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(env build test-cuda test bench collect)

SUMMARY=()
FAILED=0

# run_stage NAME CMD...: run with its output teed to $LOGDIR/NAME.log, record status + time.
run_stage() {
    local name=$1; shift
    local start=$SECONDS rc
    echo "=================== [gpu_check] $name: $*"
    "$@" 2>&1 | tee "$LOGDIR/$name.log"
    rc=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-28s %-6s %5ds' "$name" "$([[ $rc -eq 0 ]] && echo ok || echo FAIL:$rc)" $((SECONDS - start)))")
    [[ $rc -eq 0 ]] || FAILED=1
    return 0
}

# ---------------------------------------------------------------------------------- wheels
if [[ -n "$WHEELS" ]]; then
    shopt -s nullglob
    wheels=()
    for w in "$WHEELS"/*.whl; do
        case "$(basename "$w")" in
            torch-*|triton-*|nvidia_*|nvidia-*) echo "[gpu_check] refusing to install $w" ;;
            *) wheels+=("$w") ;;
        esac
    done
    if [[ ${#wheels[@]} -gt 0 ]]; then
        run_stage wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site "${wheels[@]}"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi

stage_env() {
    nvidia-smi -L || true
    nvcc --version | tail -n 2 || true
    "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch sees no GPU"
p = torch.cuda.get_device_properties(0)
print("device", p.name, "cc %d.%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
      "mem %.1f GiB" % (p.total_memory / 2**30))
for mod in ("triton", "vector_quantize_pytorch", "faiss", "matplotlib", "hypothesis"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "MISSING:", type(exc).__name__, exc)
EOF
}

stage_build() {
    if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
        TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
        export TORCH_CUDA_ARCH_LIST
    fi
    echo "[gpu_check] TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    # In place (no pip, no network): vqkernels/_C*.so and vqkernels/_C_cuda*.so next to the code.
    VQKERNELS_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace || return 1
    "$PY" - <<'EOF'
import torch, vqkernels
from vqkernels import dispatch
print(dispatch.explain("cuda"))
why = vqkernels.available_backends("cuda")["cuda"]
assert not why, why
x = torch.randn(1000, 64, device="cuda"); cb = torch.randn(300, 64, device="cuda")
i = vqkernels.nearest_code(x, cb, backend="cuda")
r = vqkernels.nearest_code(x, cb, backend="reference")
print("smoke: cuda vs reference indices agree on", int((i == r).sum()), "/ 1000 rows")
EOF
}

stage_test_cuda() {
    # The CUDA backend's own tests first (fast feedback), failing if the extension is missing.
    VQKERNELS_REQUIRE_CUDA=1 "$PY" -m pytest -q -ra tests/backends/test_cuda.py
}

stage_test() {
    # The whole suite with the GPU visible: every shared op test also runs the cuda and triton
    # backends on CUDA tensors (marker `cuda`).
    # shellcheck disable=SC2086
    VQKERNELS_REQUIRE_CUDA=1 CI=true "$PY" -m pytest -q -ra ${VQKERNELS_TEST_ARGS:-} tests
}

stage_bench() {
    local rc=0 b
    for b in ${VQKERNELS_BENCHES:-bench_nearest_code bench_ema_update bench_quantize bench_layer}; do
        if [[ ! -f "benchmarks/$b.py" ]]; then
            echo "[gpu_check] benchmarks/$b.py not present: skipped"
            continue
        fi
        echo "----- $b"
        # shellcheck disable=SC2086
        "$PY" -m "benchmarks.$b" --device cuda --out benchmarks/results $QUICK || rc=1
    done
    return $rc
}

stage_collect() {
    [[ -n "${OUT:-}" ]] || { echo "[gpu_check] OUT not set: results stay in benchmarks/results"; return 0; }
    mkdir -p "$OUT"
    # One archive (the device tool returns at most 8 files): result files, plots, logs.
    tar czf "$OUT/gpu_results.tgz" benchmarks/results/gpu_* 2>/dev/null \
        || tar czf "$OUT/gpu_results.tgz" --files-from /dev/null
    ls -la "$OUT"
}

for s in "${STAGES[@]}"; do
    case "$s" in
        env) run_stage env stage_env ;;
        build) run_stage build stage_build ;;
        test-cuda) run_stage test-cuda stage_test_cuda ;;
        test) run_stage test stage_test ;;
        bench) run_stage bench stage_bench ;;
        collect) run_stage collect stage_collect ;;
    esac
done

echo "=================== [gpu_check] summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$LOGDIR/summary.txt"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp "$LOGDIR/summary.txt" "$OUT/gpu_check_summary.txt"
    # The logs as one file too (cheap), whichever stages ran in this call.
    tar czf "$OUT/gpu_logs.tgz" -C "$LOGDIR" . 2>/dev/null || true
fi
exit $FAILED
