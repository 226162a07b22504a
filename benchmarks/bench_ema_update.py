"""Benchmark of ``ema_update_`` (EMA codebook update, fp32): vqkernels vs reference vs one-hot.

Providers, measured in the same run:

``vqkernels-cpu``     ``vqkernels.ema_update_(..., backend="cpu")`` (one pass, no one-hot)
``vqkernels-triton`` / ``vqkernels-cuda``   on ``--device cuda``
``reference``         ``backend="reference"`` (``index_add_`` with an fp64 sum, then the blend)
``onehot-matmul``     the textbook formulation: ``onehot = F.one_hot(idx, K).float()``,
                      ``counts = onehot.sum(0)``, ``sums = onehot.T @ x``, then the same blend
                      (``vqkernels.reference.ema_blend_``)

One timed call = the whole update (statistics, EMA blend, Laplace smoothing, codebook refresh).
The first call of each provider starts from the same fresh state and its codebook is compared
with the reference's (``max_abs_err``).  Indices are uniform in ``[0, K)``.

The one-hot matrix of F.one_hot is int64 (8·N·K bytes) before ``.float()`` (4·N·K more), so the
K = 16384 comparison uses N = 16384 (3 GiB); at N = 65536, K = 16384 (12 GiB) the one-hot provider
is skipped with the reason recorded.

Usage: ``python -m benchmarks.bench_ema_update [--device cpu|cuda] [--quick] [--out DIR]``
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import harness

OP = "ema_update_"
MODULE = "benchmarks.bench_ema_update"

# (N, D, K)
SHAPES = [(16384, 64, 16384), (65536, 64, 16384), (65536, 64, 1024), (65536, 256, 512)]
QUICK_SHAPES = [(4096, 64, 1024), (1000, 33, 100)]
MEMORY_SHAPES = [(16384, 64, 16384), (65536, 64, 16384)]
QUICK_MEMORY_SHAPES = [(4096, 64, 1024)]

CPU_PROVIDERS = ["vqkernels-cpu", "reference", "onehot-matmul"]
CUDA_PROVIDERS = ["vqkernels-triton", "vqkernels-cuda", "reference", "onehot-matmul"]
OURS = {"vqkernels-cpu", "vqkernels-triton", "vqkernels-cuda"}
# The columns of the summary rows (summarize), on the console and in the .md file.
SUMMARY_COLUMNS = [
    "case",
    "ours",
    "ours_ms",
    "reference_ms",
    "onehot_ms",
    "vs_reference",
    "vs_onehot",
]
MEMORY_LIMIT_BYTES = 6 * 1024**3
DECAY, EPS = 0.99, 1e-5


def estimated_extra_bytes(provider: str, n: int, d: int, k: int) -> int:
    """Rough extra memory (only used to skip what would exhaust the shared machine)."""
    if provider == "onehot-matmul":
        return 12 * n * k  # int64 one-hot + its fp32 copy
    return 8 * (n * d + k * d)  # reference: fp64 copy of x and fp64 sums


def make_state(n: int, d: int, k: int, device: str, seed: int = 0):
    """Fresh EMA state (``codebook [K,D]``, ``cluster_size [K]``, ``embed_sum [K,D]``, all fp32),
    data ``x [N,D] fp32`` and ``indices [N] int64`` uniform in ``[0, K)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    idx = torch.randint(0, k, (n,), generator=g)
    codebook = torch.randn(k, d, generator=g)
    cluster_size = torch.ones(k)
    embed_sum = codebook.clone()
    return [t.to(device) for t in (codebook, cluster_size, embed_sum, x, idx)]


def onehot_ema_update_(codebook, cluster_size, embed_sum, x, idx, decay, eps):
    """The one-hot matmul formulation (what vqkernels replaces), same blend as the reference."""
    from vqkernels import reference

    onehot = F.one_hot(idx, codebook.shape[0]).float()  # [N, K]
    counts = onehot.sum(0)
    sums = onehot.t() @ x.float()
    del onehot
    reference.ema_blend_(codebook, cluster_size, embed_sum, counts, sums, decay, eps)


def make_provider(provider: str, n: int, d: int, k: int, device: str = "cpu", seed: int = 0):
    """Fresh state + a zero-argument callable running one update; it returns the codebook."""
    import vqkernels

    codebook, cluster_size, embed_sum, x, idx = make_state(n, d, k, device, seed)
    state = (codebook, cluster_size, embed_sum, x, idx, DECAY, EPS)
    if provider == "onehot-matmul":
        fn = onehot_ema_update_
    else:
        backend = {
            "vqkernels-cpu": "cpu",
            "vqkernels-triton": "triton",
            "vqkernels-cuda": "cuda",
            "reference": "reference",
        }[provider]
        if backend != "reference":
            harness.need_backend(backend, device)

        def fn(*a):
            vqkernels.ema_update_(*a, backend=backend, check_inputs=False)

    def run() -> torch.Tensor:
        fn(*state)
        return codebook

    return run


_gold: dict[tuple, torch.Tensor] = {}


def make_check(n: int, d: int, k: int, device: str):
    def check(codebook: torch.Tensor) -> dict[str, Any]:
        key = (n, d, k, device)
        if key not in _gold:
            _gold.clear()
            _gold[key] = make_provider("reference", n, d, k, device)().clone()
        return {"max_abs_err": float((codebook - _gold[key]).abs().max())}

    return check


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(harness.make_parser(__doc__.splitlines()[0]), argv)
    device = args.device
    providers = harness.selected_providers(args, CPU_PROVIDERS, CUDA_PROVIDERS)
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    for n, d, k in QUICK_SHAPES if args.quick else SHAPES:
        cases, skipped = [], []
        for p in providers:
            params = dict(provider=p, n=n, d=d, k=k, device=device)
            est = estimated_extra_bytes(p, n, d, k)
            if est > MEMORY_LIMIT_BYTES:
                skipped.append(_skipped_row(p, params, est))
            else:
                cases.append(
                    (p, params, {"case": harness.shape_label(n, d, k)}, make_check(n, d, k, device))
                )
        # Round-robin timing: every provider of a shape sees the same machine load.
        for row in harness.bench_group(OP, MODULE, "make_provider", cases, args=args) + skipped:
            rows.append(row)
            harness.progress(row)
        _gold.clear()

    mem_rows: list[dict[str, Any]] = []
    if not args.no_memory:
        print("peak extra memory (child process per provider) ...", flush=True)
        for n, d, k in QUICK_MEMORY_SHAPES if args.quick else MEMORY_SHAPES:
            for p in providers:
                params = dict(provider=p, n=n, d=d, k=k, device=device)
                est = estimated_extra_bytes(p, n, d, k)
                if est > MEMORY_LIMIT_BYTES:
                    row = _skipped_row(p, params, est)
                else:
                    row = harness.memory_case(OP, p, MODULE, params, args=args)
                row["measure"] = "memory"
                mem_rows.append(row)
                harness.progress(row)

    summary = summarize(rows)
    harness.print_op_tables(
        rows,
        [*harness.TIMING_COLUMNS, "max_abs_err", "loadavg", "status"],
        "vqkernels speedup over the reference and the one-hot formulation (same run):",
        summary,
        SUMMARY_COLUMNS,
        mem_rows,
    )

    meta = harness.metadata(
        device, elapsed_s=round(time.time() - t_start, 1), quick=args.quick, decay=DECAY, eps=EPS
    )
    name = "ema_update" if device == "cpu" else "gpu_ema_update"
    name += args.suffix
    harness.save_op_results(
        name,
        args,
        meta,
        rows,
        mem_rows,
        summary,
        label=f"ema_update_ fp32 (decay {DECAY})",
        time_section=(
            "Time per update (ms; median, 20/80 %), fp32",
            ["case", "provider", "median_ms", "p20_ms", "p80_ms", "max_abs_err", "reason"],
        ),
        summary_section=(
            "vqkernels speedup",
            SUMMARY_COLUMNS,
        ),
    )
    return 0


def _skipped_row(provider: str, params: dict[str, Any], est: int) -> dict[str, Any]:
    n, d, k = params["n"], params["d"], params["k"]
    return {
        "op": OP,
        "provider": provider,
        **params,
        "case": harness.shape_label(n, d, k),
        "status": "skipped",
        "median_ms": None,
        "extra_mib": None,
        "reason": f"would need ~{est / 1024**3:.0f} GiB > {MEMORY_LIMIT_BYTES / 1024**3:.0f} GiB "
        f"limit (int64 one-hot N x K + fp32 copy)",
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = {r["provider"]: r for r in rows if r["case"] == case and r["median_ms"] is not None}
        ref = rs.get("reference")
        oh = rs.get("onehot-matmul")
        for p, r in rs.items():
            if p not in OURS:
                continue
            out.append(
                {
                    "case": case,
                    "ours": p,
                    "ours_ms": r["median_ms"],
                    "reference_ms": ref["median_ms"] if ref else None,
                    "onehot_ms": oh["median_ms"] if oh else None,
                    "vs_reference": ref["median_ms"] / r["median_ms"] if ref else None,
                    "vs_onehot": oh["median_ms"] / r["median_ms"] if oh else None,
                }
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
