"""Benchmark of the codebook_softmax family, forward + backward (fp32, cpu backend).

Workloads (one timed call = forward, then backward to ``x.grad`` and ``codebook.grad``):

``entropy``  the MAGVIT-2 / LlamaGen entropy loss ``mean_i H(p_i) − H(mean p) + mean lse`` over
             ``p_i = softmax(−‖x_i − c‖²/τ)``, τ = 0.01 (all three outputs of code_distribution
             carry a gradient, so every backward pass runs).
``soft``     IBQ's soft assignment ``softmax(x·Cᵀ/τ)·C`` (soft_quantize, τ = 1) with a fixed
             upstream gradient.

Providers, measured round-robin in the same run:

``vqkernels-cpu``   ``vqkernels.code_distribution`` / ``soft_quantize`` with ``backend="cpu"``
                    (streamed, never N x K)
``direct``          the direct PyTorch formula (N x K logits, autograd keeps several N x K copies)
``direct-compile``  ``torch.compile`` of the direct formula
``lr-diversity``    (entropy workload) vector-quantize-pytorch 1.32's codebook diversity loss as it
                    is written there (``-cdist``, ``softmax``, its ``entropy``), N x K as well

The direct providers are skipped (with the reason in the row) when their N x K matrices would not
fit in ``DIRECT_BUDGET_GIB`` (10 GiB): this machine has 23 GiB shared by several users.  Peak extra memory
is measured in a child process per provider (see ``harness.measure_memory``).

Usage: ``python -m benchmarks.bench_codebook_softmax [--quick] [--threads 2] [--set fits|large|all]
[--suffix _large] [--out DIR]``
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from benchmarks import harness

OP = "codebook_softmax"
MODULE = "benchmarks.bench_codebook_softmax"
TAU_ENTROPY = 0.01
TAU_SOFT = 1.0
#: N x K fp32 matrices the direct providers may hold at once (~5 live during the backward).
DIRECT_BUDGET_GIB = 10.0
DIRECT_COPIES = 6

# (workload, N, K, D): the grid, N = 8192, K = 16K/64K/256K, D = 8/16/64/256 for the
# entropy loss, and soft_quantize at D = 16 and 64.  The direct providers fit in memory only at
# K = 16K (their rows at 64K/256K record why they are skipped).  On 2 shared cores one call at
# K = 256K, D = 256 takes minutes, so repeats are reduced (not shapes): shapes where only ours
# runs get one warm-up and one timed call, the others at least 2 round-robin rounds.
GRID_D = (8, 16, 64, 256)
FITS_SHAPES = [("entropy", 8192, 16384, d) for d in GRID_D] + [
    ("soft", 8192, 16384, 16),
    ("soft", 8192, 16384, 64),
]
LARGE_SHAPES = [("entropy", 8192, k, d) for k in (65536, 262144) for d in GRID_D]
SHAPE_SETS = {"all": FITS_SHAPES + LARGE_SHAPES, "fits": FITS_SHAPES, "large": LARGE_SHAPES}
QUICK_SHAPES = [("entropy", 1024, 4096, 16), ("soft", 1024, 4096, 16)]
MEMORY_SHAPES = [("entropy", 4096, 262144, 16), ("entropy", 4096, 16384, 16)]
QUICK_MEMORY_SHAPES = [("entropy", 1024, 4096, 16)]

PROVIDERS = {
    "entropy": ["vqkernels-cpu", "direct", "direct-compile", "lr-diversity"],
    "soft": ["vqkernels-cpu", "direct", "direct-compile"],
}
OURS = {"vqkernels-cpu"}


def direct_entropy(x, codebook, tau):
    """The direct formula: N x K logits, log_softmax, both entropies (fp32)."""
    d2 = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ codebook.T) + (codebook * codebook).sum(-1)
    logits = -d2 / tau
    lse = torch.logsumexp(logits, -1)
    log_p = logits - lse.unsqueeze(-1)
    p = log_p.exp()
    sample = -(p * log_p).sum(-1).mean()
    mean_p = p.mean(0)
    batch = -(mean_p * torch.log(mean_p + 1e-5)).sum()
    return sample - batch + lse.mean()


def lr_diversity(x, codebook, tau):
    """vector-quantize-pytorch 1.32's codebook_diversity_loss path (its own cdist and entropy)."""
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist, entropy

    distances = -cdist(x.unsqueeze(0), codebook.unsqueeze(0))  # [1, N, K]
    prob = (distances * (1.0 / tau)).softmax(dim=-1)
    avg_prob = prob.mean(dim=1)
    return -entropy(avg_prob).mean()


def ours_entropy(x, codebook, tau):
    import vqkernels

    lse, ent, mp = vqkernels.code_distribution(
        x, codebook, tau, "l2", backend="cpu", check_inputs=False
    )
    return ent.mean() + (mp * torch.log(mp + 1e-5)).sum() + lse.mean()


def direct_soft(x, codebook, tau):
    return torch.softmax(x @ codebook.T / tau, -1) @ codebook


def ours_soft(x, codebook, tau):
    import vqkernels

    return vqkernels.soft_quantize(x, codebook, tau, "dot", backend="cpu", check_inputs=False)


def make_provider(provider: str, workload: str, n: int, k: int, d: int, device: str = "cpu"):
    """Inputs (fp32, requiring grad) and a callable running forward + backward once; it returns
    ``(value, x.grad, codebook.grad)``."""
    if provider.startswith("direct") or provider == "lr-diversity":
        need = DIRECT_COPIES * n * k * 4 / 2**30
        if need > DIRECT_BUDGET_GIB:
            raise harness.Skip(
                f"the direct formula needs ~{need:.0f} GiB ({DIRECT_COPIES} N x K fp32 matrices) "
                f"> {DIRECT_BUDGET_GIB:.0f} GiB budget on this shared 23 GiB machine"
            )
    if provider == "vqkernels-cpu":
        harness.need_backend("cpu", device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=g) * 0.5).to(device).requires_grad_()
    codebook = (torch.randn(k, d, generator=g) * 0.5).to(device).requires_grad_()
    if workload == "entropy":
        fn = {
            "vqkernels-cpu": ours_entropy,
            "direct": direct_entropy,
            "direct-compile": torch.compile(direct_entropy),
            "lr-diversity": lr_diversity,
        }[provider]
        tau = TAU_ENTROPY
        upstream = None
    else:
        fn = {
            "vqkernels-cpu": ours_soft,
            "direct": direct_soft,
            "direct-compile": torch.compile(direct_soft),
        }[provider]
        tau = TAU_SOFT
        upstream = torch.randn(n, d, generator=g).to(device)

    def run():
        x.grad = None
        codebook.grad = None
        out = fn(x, codebook, tau)
        if upstream is None:
            out.backward()
        else:
            out.backward(upstream)
        return out.detach(), x.grad, codebook.grad

    return run


_gold: dict[tuple, tuple] = {}


def make_check(workload: str, n: int, k: int, d: int, device: str):
    """Compare with the direct formula in float64 where it fits (error of the value and grads)."""

    def check(out) -> dict[str, Any]:
        if 3 * n * k * 8 / 2**30 > 1.0:  # the fp64 check itself would dominate the run
            return {}
        key = (workload, n, k, d)
        if key not in _gold:
            _gold.clear()
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(n, d, generator=g) * 0.5).double().requires_grad_()
            cb = (torch.randn(k, d, generator=g) * 0.5).double().requires_grad_()
            if workload == "entropy":
                v = direct_entropy(x, cb, TAU_ENTROPY)
                v.backward()
            else:
                up = torch.randn(n, d, generator=g).double()
                v = direct_soft(x, cb, TAU_SOFT)
                v.backward(up)
            _gold[key] = (v.detach(), x.grad, cb.grad)
        v, gx, gc = out
        rv, rgx, rgc = _gold[key]
        if workload == "lr-diversity":
            return {}
        return {
            "value_max_err": float((v.double() - rv).abs().max()),
            "grad_x_rel_err": float((gx.double() - rgx).abs().max() / rgx.abs().max()),
            "grad_cb_rel_err": float((gc.double() - rgc).abs().max() / rgc.abs().max()),
        }

    return check


def main(argv: list[str] | None = None) -> int:
    parser = harness.make_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--set",
        choices=tuple(SHAPE_SETS),
        default="all",
        help="shapes: 'fits' (K = 16384, where the direct formula fits, + soft), 'large' "
        "(K = 65536/262144, ours only), or 'all'",
    )
    args = harness.parse_args(parser, argv)
    device = args.device
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    for workload, n, k, d in QUICK_SHAPES if args.quick else SHAPE_SETS[args.set]:
        cases = []
        for p in PROVIDERS[workload]:
            if not harness.wanted(args, p):
                continue
            check = None if p == "lr-diversity" else make_check(workload, n, k, d, device)
            params = dict(provider=p, workload=workload, n=n, k=k, d=d, device=device)
            extra = {"case": f"{workload} N{n} K{k} D{d}"}
            cases.append((p, params, extra, check))
        # Shapes with a single runnable provider (the direct formula skipped) need no rounds.
        solo = n * k > 2**28
        if args.quick:
            kw = {}
        elif solo:
            kw = dict(min_rounds=1, max_rounds=1, target_s=0.0)
        else:
            kw = dict(min_rounds=2, max_rounds=6)
        for row in harness.bench_group(OP, MODULE, "make_provider", cases, args=args, **kw):
            rows.append(row)
            harness.progress(row)
        _gold.clear()

    mem_rows: list[dict[str, Any]] = []
    if not args.no_memory and args.set != "large":
        print("peak extra memory, forward + backward (child process per provider) ...", flush=True)
        for workload, n, k, d in QUICK_MEMORY_SHAPES if args.quick else MEMORY_SHAPES:
            for p in PROVIDERS[workload]:
                if p == "direct-compile" or not harness.wanted(args, p):
                    continue
                row = harness.bench_case(
                    OP, p, MODULE, "make_provider",
                    dict(provider=p, workload=workload, n=n, k=k, d=d, device=device),
                    args=args, time_it=False, memory=True,
                    extra={"case": f"{workload} N{n} K{k} D{d}"},
                )  # fmt: skip
                row["measure"] = "memory"
                mem_rows.append(row)
                harness.progress(row)

    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = {r["provider"]: r for r in rows if r["case"] == case and r["median_ms"] is not None}
        ours = rs.get("vqkernels-cpu")
        if not ours:
            continue
        entry = {"case": case, "ours_ms": ours["median_ms"]}
        for p in ("direct", "direct-compile", "lr-diversity"):
            r = rs.get(p)
            entry[f"{p}_ms"] = r["median_ms"] if r else None
            entry[f"vs_{p}"] = r["median_ms"] / ours["median_ms"] if r else None
        summary.append(entry)
    time_cols = [
        "case", "provider", "median_ms", "p20_ms", "p80_ms", "repeats", "value_max_err",
        "grad_x_rel_err", "grad_cb_rel_err", "loadavg", "status", "reason",
    ]  # fmt: skip
    summary_cols = [
        "case", "ours_ms", "direct_ms", "vs_direct", "direct-compile_ms", "vs_direct-compile",
        "lr-diversity_ms", "vs_lr-diversity",
    ]  # fmt: skip
    print()
    print(harness.format_table(rows, time_cols))
    print("\nvqkernels speedup, forward + backward (same run):")
    print(harness.format_table(summary, summary_cols))
    if mem_rows:
        print()
        print(harness.format_table(mem_rows, ["case", "provider", "extra_mib", "status", "reason"]))
    meta = harness.metadata(
        device, elapsed_s=round(time.time() - t_start, 1), quick=args.quick,
        tau_entropy=TAU_ENTROPY, tau_soft=TAU_SOFT,
    )  # fmt: skip
    harness.save_op_results(
        "codebook_softmax" + args.suffix, args, meta, rows, mem_rows, summary,
        label="codebook_softmax fwd+bwd fp32 (entropy loss: l2, tau 0.01; soft: dot, tau 1)",
        time_section=("Forward + backward (ms; median, 20/80 %), fp32", time_cols),
        summary_section=("vqkernels speedup (direct / ours, same run)", summary_cols),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
