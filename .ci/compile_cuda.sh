#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc (object files into a temp dir,
# warnings as errors), so CI catches CUDA build breaks on machines without a GPU or a CUDA torch.
# The .cu files include no torch headers, so no CUDA torch is needed.  The torch binding
# (csrc/cuda/bindings.cpp) is linked by setup.py on a GPU machine; here it is syntax-checked
# (g++ -fsyntax-only) against the installed torch's headers when they include c10/cuda (the CPU
# wheel does, minus one generated header that a temp stub stands in for).
#
# Exit status: 0 when every file compiled (or nvcc is absent: a skip message is printed),
# non-zero when any file failed.  Env: NVCC (compiler, default: nvcc on PATH, then
# $CUDA_HOME/bin/nvcc), VQKERNELS_NVCC_JOBS (parallel jobs, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-}
if [[ -z "$NVCC" ]]; then
    if command -v nvcc >/dev/null 2>&1; then
        NVCC=$(command -v nvcc)
    elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
        NVCC="$CUDA_HOME/bin/nvcc"
    fi
fi
if [[ -z "$NVCC" ]] || ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "[compile_cuda] SKIP: nvcc not found (set NVCC or CUDA_HOME); CUDA kernels not compiled"
    exit 0
fi

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
    echo "[compile_cuda] no csrc/cuda/*.cu files"
    exit 0
fi

JOBS=${VQKERNELS_NVCC_JOBS:-2}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The flags setup.py uses for the extension, plus warnings as errors for host and device code.
# The -D flags are the ones torch's CUDAExtension adds (no implicit half/bf16 conversions).
FLAGS=(-O3 -std=c++17 -lineinfo -Icsrc
       -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
       -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -Xptxas -warn-spills)

echo "[compile_cuda] $("$NVCC" --version | tail -n 1)"
echo "[compile_cuda] compiling ${#SOURCES[@]} file(s) for sm_80 + sm_90 with $JOBS job(s)"
start=$SECONDS
export NVCC TMP
# One nvcc per file, $JOBS at a time; each writes its own log, printed on failure, and keeps
# its intermediate PTX (one per -gencode arch) in $TMP/keep_<name> for the check below.
printf '%s\n' "${SOURCES[@]}" | xargs -P "$JOBS" -I{} bash -c '
    src="{}"; name=$(basename "$src" .cu); mkdir -p "$TMP/keep_$name"
    if "$NVCC" "$@" -keep -keep-dir "$TMP/keep_$name" -c "$src" -o "$TMP/$name.o" \
            >"$TMP/$name.log" 2>&1; then
        echo "[compile_cuda] ok   $src"
    else
        echo "[compile_cuda] FAIL $src"; cat "$TMP/$name.log"; touch "$TMP/$name.failed"
    fi' _ "${FLAGS[@]}"

# IEEE fp32 everywhere (DESIGN.md §3; the host emulator and the reference assume it): no
# flush-to-zero (.ftz, e.g. from --use_fast_math or -ftz=true) and no approximate division,
# square root or reciprocal (.approx) in the PTX nvcc generated above, for every arch.
for src in "${SOURCES[@]}"; do
    name=$(basename "$src" .cu)
    [[ -e "$TMP/$name.failed" ]] && continue
    ptx=("$TMP/keep_$name"/*.ptx)
    if [[ ${#ptx[@]} -eq 0 ]]; then
        echo "[compile_cuda] FAIL $src: nvcc kept no PTX to check"; touch "$TMP/$name.ptx.failed"
    elif grep -nE '\.ftz|\.approx' "${ptx[@]}" >"$TMP/$name.inexact"; then
        echo "[compile_cuda] FAIL $src: non-IEEE fp32 ops in its PTX (flush-to-zero or approximate):"
        head -n 5 "$TMP/$name.inexact"; touch "$TMP/$name.ptx.failed"
    fi
done
ptx_failed=("$TMP"/*.ptx.failed)
[[ ${#ptx_failed[@]} -eq 0 ]] && echo "[compile_cuda] ok   PTX of every kernel: IEEE fp32 (no .ftz / .approx ops)"

# Syntax-check the torch binding (it cannot be linked without a CUDA torch).
PY=${PYTHON:-python3}
CUDA_INC=""
for dir in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" \
        /usr/local/cuda; do
    if [[ -n "$dir" && -f "$dir/include/cuda_runtime.h" ]]; then CUDA_INC="$dir/include"; break; fi
done
if [[ -f csrc/cuda/bindings.cpp && -n "$CUDA_INC" ]] && command -v g++ >/dev/null 2>&1 \
        && TORCH_INC=$("$PY" -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])' 2>/dev/null) \
        && [[ -f "$TORCH_INC/c10/cuda/CUDAStream.h" ]]; then
    mkdir -p "$TMP/stub/c10/cuda/impl"
    [[ -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]] \
        || echo '#pragma once' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
    PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    if g++ -std=c++17 -fsyntax-only -Wall -Wextra -Werror -isystem "$TMP/stub" -isystem "$TORCH_INC" \
            -isystem "$TORCH_INC/torch/csrc/api/include" -isystem "$PY_INC" -isystem "$CUDA_INC" \
            -Icsrc -DTORCH_EXTENSION_NAME=_C_cuda -DTORCH_API_INCLUDE_EXTENSION_H \
            csrc/cuda/bindings.cpp >"$TMP/bindings.log" 2>&1; then
        echo "[compile_cuda] ok   csrc/cuda/bindings.cpp (syntax only, torch headers at $TORCH_INC)"
    else
        echo "[compile_cuda] FAIL csrc/cuda/bindings.cpp (syntax check)"; cat "$TMP/bindings.log"
        touch "$TMP/bindings.failed"
    fi
else
    echo "[compile_cuda] skip csrc/cuda/bindings.cpp syntax check (no g++, CUDA headers or torch c10/cuda headers)"
fi

failed=("$TMP"/*.failed)
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "[compile_cuda] ${#failed[@]} file(s) failed ($((SECONDS - start)) s)"
    exit 1
fi
echo "[compile_cuda] all ${#SOURCES[@]} file(s) compiled ($((SECONDS - start)) s)"
