"""Build vqkernels' compiled backends against the *installed* torch.

* ``vqkernels._C``: C++ CPU kernels (``csrc/cpu/*.cpp``), always built. OpenMP + SIMD: the hot
  loops are compiled for AVX2/FMA and AVX-512 with function-level target attributes and picked at
  run time, with a portable scalar fallback, so one build runs on any x86-64 (and non-x86) CPU.
* ``vqkernels._C_cuda``: CUDA kernels (``csrc/cuda/*.cu``, plain CUDA with C-style launchers) plus
  their torch binding (``csrc/cuda/bindings.cpp``). Built when the installed torch has CUDA and a
  CUDA toolkit is found, or forced with ``VQKERNELS_BUILD_CUDA=1`` (``=0`` skips it).

Always build with ``pip install --no-build-isolation -e .`` so the extension is compiled against
the torch you run with; ``MAX_JOBS`` limits parallel compile jobs.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit(
        "vqkernels: torch must be installed before building (pip install torch==2.13.0), and the "
        "build must see it: pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value not in ("0", "false", "False", "no")


# Flags for the CPU extension. -O3 for the kernels; OpenMP for row-block parallelism; no -march:
# ISA-specific loops carry __attribute__((target(...))) and are dispatched at run time.
CPU_CXX_FLAGS = [
    "-O3",
    "-fopenmp",
    # torch 2.13 is built as C++20 and its headers use C++20 features (warnings under c++17).
    "-std=c++20",
    "-Wall",
    "-Wno-unknown-pragmas",
    # No contraction of a*b+c into FMA behind our back: the elementwise fp32 formulas then round
    # exactly like the reference's separate ops; the SIMD kernels call FMA explicitly.
    "-ffp-contract=off",
]
CPU_LINK_FLAGS = ["-fopenmp"]
if os.environ.get("VQKERNELS_DEBUG") == "1":
    CPU_CXX_FLAGS = [f for f in CPU_CXX_FLAGS if f != "-O3"] + ["-O0", "-g"]

ext_modules = [
    CppExtension(
        name="vqkernels._C",
        sources=_rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CPU_CXX_FLAGS},
        extra_link_args=CPU_LINK_FLAGS,
    )
]

want_cuda = _env_flag("VQKERNELS_BUILD_CUDA")
has_cuda_torch = torch.version.cuda is not None
if want_cuda is None:
    want_cuda = has_cuda_torch and CUDA_HOME is not None
    if not want_cuda:
        why = "the installed torch has no CUDA" if not has_cuda_torch else "no CUDA toolkit found"
        print(f"vqkernels: skipping the CUDA extension ({why}); the CPU extension is built.")
if want_cuda:
    if not has_cuda_torch:
        sys.exit(
            "vqkernels: VQKERNELS_BUILD_CUDA=1 but the installed torch is a CPU-only build; install a "
            "CUDA torch, or compile-check the kernels alone with `bash .ci/compile_cuda.sh`"
        )
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # No --use_fast_math: it implies -ftz=true, which flushes subnormals in every fp32 op, the
    # explicit __f*_rn intrinsics included (seen in the PTX as fma.rn.ftz.f32), so results would
    # depart from the reference and from the host emulator the tests run the kernels on.  The
    # kernels spell out their rounding with _rn intrinsics; fp32 FMA runs at full rate with
    # subnormals on sm_80+.  .ci/compile_cuda.sh fails on any .ftz / .approx op in the PTX.
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
    if not arch_list:
        nvcc_flags += [
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
    ext_modules.append(
        CUDAExtension(
            name="vqkernels._C_cuda",
            sources=_rel(
                glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
            ),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
        )
    )

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
