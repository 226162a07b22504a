"""Peak extra memory of one benchmark provider, measured in a child process (VmHWM − VmRSS after a
warm-up on CPU, the CUDA allocator's peak on a GPU), and its calibration on known allocations.
Split out of :mod:`harness`, which re-exports every public name."""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness_output import REPO_ROOT, Skip, _is_cuda

MIB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # non-glibc: nothing to trim
        pass


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark (VmHWM) of this process; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child(module: str, factory: str, params_json: str, threads: int) -> None:
    """Entry point of the memory child process: prints one JSON line with the result."""
    torch.set_num_threads(threads)
    try:
        fn = getattr(importlib.import_module(module), factory)(**json.loads(params_json))
        out = None
        can_reset = _reset_hwm()
        if can_reset:
            out = fn()  # warm-up: one-time costs are not the provider's working memory
            del out
            gc.collect()
            _malloc_trim()
            _reset_hwm()
            method = "child VmHWM-VmRSS after warm-up, clear_refs reset, mmap_threshold=64KiB"
        else:
            method = "child VmHWM-VmRSS, first call (clear_refs unavailable)"
        base = _proc_status_kib("VmRSS")
        out = fn()  # noqa: F841  (kept alive: outputs are part of the peak)
        hwm = _proc_status_kib("VmHWM")
        res = {"ok": True, "extra_mib": max(hwm - base, 0) / 1024.0, "mem_method": method}
    except Skip as exc:
        res = {"ok": False, "skip": True, "reason": str(exc)}
    except Exception as exc:
        res = {"ok": False, "skip": False, "reason": f"{type(exc).__name__}: {exc}"}
    print("__MEMRESULT__" + json.dumps(res), flush=True)


def measure_memory(
    module: str,
    factory: str,
    params: dict[str, Any],
    *,
    device: str = "cpu",
    threads: int | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Extra peak memory of one call of ``module.factory(**params)()``.

    CPU: in a fresh child process (see the module docstring); CUDA: in this process with the
    caching allocator's peak statistics.

    Returns:
        ``{"ok": True, "extra_mib": float, "mem_method": str}`` or
        ``{"ok": False, "skip": bool, "reason": str}``.
    """
    threads = threads or torch.get_num_threads()
    if _is_cuda(device):
        try:
            fn = getattr(importlib.import_module(module), factory)(**params)
            out = fn()
            del out
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            del out, fn
            return {
                "ok": True,
                "extra_mib": max(peak - base, 0) / MIB,
                "mem_method": "torch.cuda.max_memory_allocated - memory_allocated (one call)",
            }
        except Skip as exc:
            return {"ok": False, "skip": True, "reason": str(exc)}
        except Exception as exc:
            return {"ok": False, "skip": False, "reason": f"{type(exc).__name__}: {exc}"}
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import sys; from benchmarks.harness_memory import _memory_child; "
        "_memory_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))"
    )
    cmd = [sys.executable, "-c", code, module, factory, json.dumps(params), str(threads)]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "skip": False, "reason": f"memory child timed out after {timeout_s}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("__MEMRESULT__"):
            return json.loads(line[len("__MEMRESULT__") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {
        "ok": False,
        "skip": False,
        "reason": f"memory child exited {proc.returncode}: {' | '.join(tail)}",
    }


# ---------------------------------------------------------------------------------------------
# Calibration: `python -m benchmarks.harness` (or .harness_memory) checks the memory method on known allocations.
# ---------------------------------------------------------------------------------------------


def calibration_factory(mib: float, device: str = "cpu") -> Callable[[], Any]:
    """A provider whose extra peak memory is known: it fills a ``mib`` MiB fp32 tensor and a
    temporary of the same size (peak 2·mib while both live), and returns the first one."""
    n = int(mib * MIB) // 4

    def fn() -> torch.Tensor:
        a = torch.ones(n, device=device)
        b = a * 2.0  # temporary: both live at the peak
        a.add_(b)
        del b
        return a

    return fn


def _calibrate(device: str = "cpu") -> int:
    failures = 0
    for mib in (16.0, 64.0, 256.0):
        m = measure_memory(
            "benchmarks.harness_memory",
            "calibration_factory",
            {"mib": mib, "device": device},
            device=device,
        )
        expected = 2 * mib
        ok = m["ok"] and abs(m["extra_mib"] - expected) <= 0.05 * expected + 2.0
        failures += not ok
        print(
            f"calibration {mib:6.0f} MiB x2: expected {expected:.0f} MiB, got {m}  "
            f"{'OK' if ok else 'FAIL'}"
        )
    return failures


if __name__ == "__main__":
    sys.exit(1 if _calibrate("cuda" if "--cuda" in sys.argv else "cpu") else 0)
