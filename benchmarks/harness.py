"""Shared benchmark harness: timing, peak memory, metadata, result files, plots, CLI.

Every ``benchmarks/bench_*.py`` script uses this module so that all numbers are measured and
recorded the same way (DESIGN.md §6).

Timing (:func:`time_fn`)
    ``warmup`` untimed calls, then ``repeat`` timed calls; reports the median and the 20 % / 80 %
    quantiles in milliseconds.  On CPU each call is timed with ``time.perf_counter``; on CUDA each
    call is bracketed by CUDA events and the device is synchronized before the first and after
    the last call, so asynchronous launches are fully counted.  When ``repeat`` is not given it is
    chosen from the time of the first timed call so that a case costs about ``target_s`` seconds
    (clamped to ``[min_repeat, max_repeat]``): slow providers get few repeats, fast ones many.
    The thread count is whatever ``torch.set_num_threads`` set (``--threads``); it is recorded in
    the metadata.

Peak memory (:func:`measure_memory`), measured SEPARATELY from timing
    * CUDA: ``torch.cuda.reset_peak_memory_stats`` after the inputs exist and one warm-up call,
      then ``max_memory_allocated − memory_allocated(before)`` over one call.  This counts only
      the PyTorch caching allocator (cuBLAS workspaces, Triton scratch are not allocator-backed).
    * CPU: ``tracemalloc`` does not see torch's allocations and torch has no CPU allocator
      statistics, so memory is measured at the OS level in a *fresh child process* per provider
      and shape: the child builds the inputs, makes one warm-up call (one-time costs such as
      ``torch.compile``, OpenMP thread stacks or lazily loaded libraries are not counted), frees
      garbage, calls ``malloc_trim(0)``, resets the kernel's resident-set high-water mark by
      writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0), reads ``VmRSS`` as the baseline,
      makes ONE call, keeps its outputs alive and reads ``VmHWM``.  Extra peak memory is
      ``VmHWM − baseline``: the largest amount of additional memory the call made resident,
      outputs included.  The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (a fixed threshold
      also disables glibc's dynamic threshold) so every buffer above 64 KiB is its own mapping
      that is returned to the OS when freed; otherwise memory freed by the warm-up call could be
      reused silently and the measured peak would be too low.  Resolution is one page (4 KiB),
      noise from the interpreter is a few hundred KiB.  If ``clear_refs`` cannot be written the
      child falls back to ``VmHWM`` before/after without the warm-up call (first-call costs are
      then included) and says so in the ``mem_method`` field.

Providers are described by *factories*: a module-level function ``factory(**params)`` that builds
the inputs and returns a zero-argument callable running the provider once.  A factory raises
:class:`Skip` (with the reason) when the provider cannot run here; the reason is recorded in the
row.  Being module-level functions with JSON parameters, factories can be re-run in the memory
child process.

Results (:func:`write_results`)
    ``<out>/<name>.json`` (``{"meta": ..., "rows": [...]}``) and ``<out>/<name>.csv`` (one line per
    row, meta columns ``commit``/``torch``/``device`` repeated), plus plots via :func:`plot_rows`
    (matplotlib, Agg backend, no display needed).

Typical use (see ``bench_nearest_code.py``)::

    args = harness.parse_args(harness.make_parser("nearest_code benchmark"))
    row = harness.bench_case(
        "nearest_code", "cpu", "benchmarks.bench_nearest_code", "make_vqkernels",
        dict(n=4096, d=64, k=512, device="cpu"), args=args, memory=True,
    )
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness_memory import (  # noqa: F401 - re-exported: the benchmarks use harness.<name>
    MIB,
    _calibrate,
    calibration_factory,
    measure_memory,
)
from benchmarks.harness_output import (  # noqa: F401 - re-exported: the benchmarks use harness.<name>
    REPO_ROOT,
    TIMING_COLUMNS,
    Skip,
    _cell,
    _is_cuda,
    format_table,
    metadata,
    plot_rows,
    print_op_tables,
    save_op_results,
    write_markdown,
    write_results,
)

__all__ = [
    "Skip",
    "Timing",
    "time_fn",
    "measure_memory",
    "bench_case",
    "gemm_peak_flops",
    "metadata",
    "make_parser",
    "parse_args",
    "write_results",
    "plot_rows",
    "format_table",
    "RESULTS_DIR",
]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


class IndexAgreement:
    """The ``agree`` column: the share of a provider's indices equal to a reference provider's on
    the same case.  The reference runs once per case, and only the latest case's indices are kept
    (one case's worth of memory); a reference that raises :class:`Skip` leaves the column out."""

    def __init__(self, make_provider: Callable[..., Callable[[], Any]], reference: str):
        self._make_provider, self._reference = make_provider, reference
        self._case: tuple | None = None
        self._indices: Any = None

    def check(self, *case: Any) -> Callable[[Any], dict[str, Any]]:
        def agree(indices) -> dict[str, Any]:
            if self._case != case:
                self.clear()
                try:
                    self._indices = self._make_provider(self._reference, *case)()
                except Skip:
                    return {}
                self._case = case
            return {"agree": float((indices == self._indices).float().mean())}

        return agree

    def clear(self) -> None:
        self._case, self._indices = None, None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock statistics of one provider on one case, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    warmup: int
    times_ms: list[float]


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default 'linear')."""
    if len(sorted_vals) == 1:
        return float(sorted_vals[0])
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    frac = pos - lo
    return float(sorted_vals[lo] * (1.0 - frac) + sorted_vals[hi] * frac)


def _time_once(fn: Callable[[], Any], cuda: bool) -> float:
    """Milliseconds of one call: CUDA events around it (then wait for the end event) on a GPU,
    ``perf_counter`` on the CPU."""
    if cuda:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _timing(times: list[float], warmup: int) -> Timing:
    srt = sorted(times)
    return Timing(
        median_ms=float(statistics.median(srt)),
        p20_ms=_quantile(srt, 0.2),
        p80_ms=_quantile(srt, 0.8),
        repeats=len(times),
        warmup=warmup,
        times_ms=list(times),
    )


def time_fn(
    fn: Callable[[], Any],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeat: int | None = None,
    min_repeat: int = 3,
    max_repeat: int = 50,
    target_s: float = 1.5,
) -> Timing:
    """Time ``fn()`` (see the module docstring for the method).

    Args:
        fn: zero-argument callable running the provider once (inputs already built).
        device: where ``fn`` runs; CUDA uses events and synchronization.
        warmup: untimed calls first (compilation, caches, thread pools).
        repeat: timed calls; ``None`` = adaptive from the first timed call's duration.
        min_repeat, max_repeat: bounds of the adaptive repeat count.
        target_s: approximate total timed seconds of an adaptive case.

    Returns:
        :class:`Timing` with median and 20/80 % quantiles in ms and every sample.
    """
    cuda = _is_cuda(device)

    def one() -> float:
        return _time_once(fn, cuda)

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = [one()]
    if repeat is None:
        est_s = max(times[0], 1e-3) / 1e3
        repeat = int(min(max_repeat, max(min_repeat, round(target_s / est_s))))
    for _ in range(repeat - 1):
        times.append(one())
    if cuda:
        torch.cuda.synchronize()
    return _timing(times, warmup)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    device: str | torch.device = "cpu",
    min_rounds: int = 3,
    max_rounds: int = 20,
    target_s: float = 1.5,
    max_calls_per_round: int = 8,
) -> dict[str, Timing]:
    """Time several already warmed-up providers of ONE case round-robin.

    On a shared machine the load changes over minutes; timing provider A for a while and then
    provider B compares them under different loads.  Here every round calls every provider
    (fast ones several times, so each round spends comparable time on each), so all providers
    see the same load history and their *ratios* are meaningful even when absolute times are not.

    Each provider's first timed call estimates its cost ``t_p``; a round gives provider ``p``
    ``clamp(round(max_q t_q / t_p), 1, max_calls_per_round)`` calls; the number of rounds makes
    the whole case last about ``target_s · len(fns)`` seconds, within ``[min_rounds, max_rounds]``.

    Returns:
        provider -> :class:`Timing` over all its timed calls (warmup = 0: the caller warmed up).
    """
    cuda = _is_cuda(device)
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {p: [_time_once(f, cuda)] for p, f in fns.items()}
    est = {p: max(t[0], 1e-3) for p, t in times.items()}
    slowest = max(est.values())
    calls = {p: int(min(max_calls_per_round, max(1, round(slowest / e)))) for p, e in est.items()}
    round_ms = sum(calls[p] * est[p] for p in fns)
    rounds = int(min(max_rounds, max(min_rounds, round(target_s * 1e3 * len(fns) / round_ms))))
    for _ in range(rounds):
        for p, f in fns.items():
            for _ in range(calls[p]):
                times[p].append(_time_once(f, cuda))
    return {p: _timing(t, 0) for p, t in times.items()}


# ---------------------------------------------------------------------------------------------
# One case = one provider on one shape: time it, optionally measure memory, return a row.
# ---------------------------------------------------------------------------------------------


def _new_row(
    op: str,
    provider: str,
    params: dict[str, Any],
    extra: dict[str, Any] | None,
    **more: Any,
) -> dict[str, Any]:
    """A result row before anything ran: the case's keys, status ok, no numbers yet."""
    row: dict[str, Any] = {"op": op, "provider": provider, **params, **(extra or {})}
    row.update(status="ok", reason="", median_ms=None, p20_ms=None, p80_ms=None, repeats=0)
    row.update(extra_mib=None, mem_method="", **more)
    return row


def _record_failure(row: dict[str, Any], exc: Exception) -> None:
    """A provider that raised: :class:`Skip` is 'skipped' with its reason, anything else an
    'error' (traceback printed when VQKERNELS_BENCH_TRACEBACK is set); the run goes on."""
    if isinstance(exc, Skip):
        row.update(status="skipped", reason=str(exc))
        return
    row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    if os.environ.get("VQKERNELS_BENCH_TRACEBACK"):
        traceback.print_exc()


def bench_case(
    op: str,
    provider: str,
    module: str,
    factory: str,
    params: dict[str, Any],
    *,
    args: argparse.Namespace | None = None,
    time_it: bool = True,
    memory: bool = False,
    extra: dict[str, Any] | None = None,
    check: Callable[[Any], dict[str, Any]] | None = None,
    **time_kwargs: Any,
) -> dict[str, Any]:
    """Build ``module.factory(**params)``, time it, optionally measure its memory; one result row.

    Row keys: ``op, provider, status ('ok'|'skipped'|'error'), reason, median_ms, p20_ms, p80_ms,
    repeats, extra_mib, mem_method`` plus every key of ``params`` and ``extra``.  A factory that
    raises :class:`Skip`, or fails, gives a row with the reason instead of aborting the run.

    ``check(output) -> dict`` (optional) receives the output of the first call (which then also
    serves as the warm-up call) and its dict is merged into the row, e.g. agreement with the
    reference: a benchmark of a wrong answer is worthless.
    """
    device = params.get("device", "cpu")
    row = _new_row(op, provider, params, extra)
    # The 1-minute load average when the case starts: on a shared machine a load above the
    # thread count means timings include waiting for a core (OpenMP barriers suffer most).
    row["loadavg"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args is not None and getattr(args, "quick", False):
        time_kwargs.setdefault("target_s", 0.3)
        time_kwargs.setdefault("max_repeat", 5)
        time_kwargs.setdefault("min_repeat", 2)
    if time_it:
        fn = None
        try:
            fn = getattr(importlib.import_module(module), factory)(**params)
            if check is not None:
                out = fn()
                if _is_cuda(device):
                    torch.cuda.synchronize()
                row.update(check(out))
                del out
                time_kwargs.setdefault("warmup", 0)  # the checked call was the warm-up
            t = time_fn(fn, device=device, **time_kwargs)
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats)
        except Exception as exc:
            _record_failure(row, exc)
        finally:
            del fn
            gc.collect()
            if _is_cuda(device):
                torch.cuda.empty_cache()
    if memory and row["status"] == "ok":
        threads = getattr(args, "threads", None) if args is not None else None
        m = measure_memory(module, factory, params, device=device, threads=threads)
        if m["ok"]:
            row.update(extra_mib=m["extra_mib"], mem_method=m["mem_method"])
        else:
            row.update(
                status="skipped" if m.get("skip") else "error", reason="memory: " + m["reason"]
            )
    return row


def memory_case(
    op: str, provider: str, module: str, params: dict[str, Any], *, args: argparse.Namespace
) -> dict[str, Any]:
    """:func:`bench_case` of an op at the shape ``params["n"], ["d"], ["k"]``, memory only (no
    timing): the peak extra memory of ``module.make_provider(**params)`` in a child process."""
    return bench_case(
        op,
        provider,
        module,
        "make_provider",
        params,
        args=args,
        time_it=False,
        memory=True,
        extra={"case": shape_label(params["n"], params["d"], params["k"])},
    )


def bench_group(
    op: str,
    module: str,
    factory: str,
    cases: Sequence[tuple[str, dict[str, Any], dict[str, Any] | None, Callable | None]],
    *,
    args: argparse.Namespace | None = None,
    **interleave_kwargs: Any,
) -> list[dict[str, Any]]:
    """All providers of one shape, timed round-robin (see :func:`time_interleaved`).

    Args:
        cases: ``(provider, params, extra, check)`` per provider: ``module.factory(**params)``
            builds it, ``extra`` is merged into its row, ``check(output) -> dict`` (or None)
            checks the output of its first call, which is also its warm-up.

    Returns:
        One row per provider, with the keys of :func:`bench_case`; providers that raise
        :class:`Skip` or fail while building, checking or warming up get a row with the reason
        and do not take part in the timing.
    """
    if args is not None and getattr(args, "quick", False):
        interleave_kwargs.setdefault("target_s", 0.3)
        interleave_kwargs.setdefault("max_rounds", 3)
        interleave_kwargs.setdefault("min_rounds", 2)
    rows: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], Any]] = {}
    device = "cpu"
    for provider, params, extra, check in cases:
        device = params.get("device", "cpu")
        row = _new_row(op, provider, params, extra, timing="interleaved")
        rows[provider] = row
        try:
            fn = getattr(importlib.import_module(module), factory)(**params)
            out = fn()  # warm-up (compilation, lazy init) and the checked output
            if _is_cuda(device):
                torch.cuda.synchronize()
            if check is not None:
                row.update(check(out))
            del out
            fns[provider] = fn
        except Exception as exc:
            _record_failure(row, exc)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if fns:
        try:
            timings = time_interleaved(fns, device=device, **interleave_kwargs)
        except Exception as exc:  # one provider failing mid-run: fall back to one at a time
            timings = {}
            for p, f in fns.items():
                try:
                    timings[p] = time_fn(f, device=device, warmup=0)
                except Exception as exc2:
                    rows[p].update(status="error", reason=f"{type(exc2).__name__}: {exc2}")
            print(f"interleaved timing failed ({exc}); timed one provider at a time", flush=True)
        for p, t in timings.items():
            rows[p].update(
                median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats
            )
    for row in rows.values():
        row["loadavg"] = load
    del fns
    gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# GEMM peak (the FLOP floor yardstick)
# ---------------------------------------------------------------------------------------------


def gemm_peak_flops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None
) -> dict[str, Any]:
    """Measured matmul throughput: the best of a few ``torch.mm`` of square ``size`` matrices.

    Uses the *best* (not median) time: the peak is an upper bound on achievable throughput, and
    the noisy shared machine can only make individual calls slower.

    Returns:
        ``{"flops": float (FLOP/s), "size": int, "dtype": str, "best_ms": float}``.
    """
    if size is None:
        size = 8192 if _is_cuda(device) else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b), device=device, warmup=2, repeat=7)
    best = min(t.times_ms)
    return {
        "flops": 2.0 * size**3 / (best / 1e3),
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "best_ms": best,
    }




# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def make_parser(description: str) -> argparse.ArgumentParser:
    """Parser with the flags every benchmark shares: --device, --quick, --out, --threads,
    --providers, --no-memory."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke test)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results directory (default {RESULTS_DIR.relative_to(REPO_ROOT)}; --quick: none)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated subset of providers to run (default: all)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--suffix", default="", help="appended to the result file names (e.g. _1thread)")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    """Parse, apply ``--threads``, check ``--device cuda`` is usable, resolve ``--out``."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.out is None and not args.quick:
        args.out = RESULTS_DIR
    args.provider_set = set(args.providers.split(",")) if args.providers else None
    return args


def wanted(args: argparse.Namespace, provider: str) -> bool:
    """Whether ``--providers`` selects ``provider``."""
    return args.provider_set is None or provider in args.provider_set


def selected_providers(
    args: argparse.Namespace, cpu: Sequence[str], cuda: Sequence[str]
) -> list[str]:
    """The providers of ``args.device``'s list that ``--providers`` selects, in list order."""
    return [p for p in (cuda if args.device == "cuda" else cpu) if wanted(args, p)]


def need_backend(backend: str, device: str) -> None:
    """Raise :class:`Skip` (with vqkernels' reason) when ``backend`` cannot run on ``device``."""
    import vqkernels

    why = vqkernels.available_backends(device)[backend]
    if why:
        raise Skip(f"vqkernels backend {backend!r} unavailable: {why}")


def shape_label(n: int, d: int, k: int) -> str:
    """The ``case`` column of the op benchmarks: ``N{n}-D{d}-K{k}``."""
    return f"N{n}-D{d}-K{k}"




def progress(row: dict[str, Any]) -> None:
    """One progress line for a finished row (so long runs show where they are)."""
    if row.get("extra_mib") is not None:
        val_s = f"{_cell(row['extra_mib']):>9s} MiB"
    else:
        val_s = f"{_cell(row.get('median_ms')):>9s} ms"
    print(
        f"  {str(row.get('case', '')):22s} {row['provider']:28s} {val_s}  {row['status']} "
        f"{row.get('reason', '')[:100]}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(1 if _calibrate("cuda" if "--cuda" in sys.argv else "cpu") else 0)
