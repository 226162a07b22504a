"""``python -m vqkernels``: versions, and which backends are available (and why not)."""

from __future__ import annotations

import platform
import sys


def main() -> int:
    import torch

    import vqkernels
    from vqkernels import dispatch

    print(f"vqkernels {vqkernels.__version__}")
    print(f"python    {sys.version.split()[0]} ({platform.machine()})")
    print(f"torch     {torch.__version__} (cuda: {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"triton    not importable ({type(exc).__name__})")
    print(f"threads   {torch.get_num_threads()}")
    try:
        from vqkernels import _C

        print(f"cpu isa   {_C.cpu_isa()} (best this CPU supports: {_C.best_cpu_isa()}; "
              f"cap with VQKERNELS_CPU_ISA=scalar|avx2|avx512)")
    except Exception:  # noqa: BLE001 - the backend table below says why it is missing
        pass
    print()
    print("backends (import-level):")
    for name, why in dispatch.available_backends().items():
        print(f"  {name:9s} {'available' if not why else 'unavailable: ' + why}")
    print()
    print(dispatch.explain("cpu"))
    if torch.cuda.is_available():
        print(dispatch.explain("cuda"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
