"""Benchmark of ``quantize`` forward + backward (fp32, L2, learnable codebook).

Providers, measured in the same run:

``vqkernels-cpu``     ``vqkernels.quantize(..., backend="cpu")`` (fused search + gather + error,
                      fused closed-form backward)
``vqkernels-triton`` / ``vqkernels-cuda``   on ``--device cuda``
``reference``         ``backend="reference"`` (vqkernels.reference.quantize, autograd)
``plain-torch``       what a user writes by hand: ``torch.cdist`` + ``argmin``, ``F.embedding``,
                      ``beta·mse(x, sg(q)) + mse(sg(x), q)`` and ``x + (q − x).detach()``

One timed call = forward, then ``torch.autograd.backward`` of ``(quantized, loss)`` with a fixed
upstream gradient for ``quantized`` and 1 for the loss, producing ``x.grad`` and
``codebook.grad``.  The first call of each provider is checked against the reference: index
agreement, relative loss error and the largest gradient errors.

Usage: ``python -m benchmarks.bench_quantize [--device cpu|cuda] [--quick] [--out DIR]``

``--features`` runs the issue-10 comparisons instead (results ``quantize_features.*``), forward +
backward, same run, round-robin:

* rotation trick: ``rotation-<backend>`` (``estimator="rotation"``, fused O(D) backward) vs
  ``ste-<backend>`` (straight-through) vs ``lr-rotate_to`` (vqkernels' search + LR 1.32's own
  ``rotate_to`` in PyTorch, what vector-quantize-pytorch runs);
* multi-head: ``heads-<backend>`` (one call on a ``[H, K, D]`` codebook) vs ``loop-<backend>``
  (a Python loop of H single-codebook calls);
* Gumbel sampling (``nearest_code`` only, no backward): ``sample-<backend>`` (fused, τ = 1) vs
  ``sample-reference`` (the N×K reference) vs ``nearest-<backend>`` (the deterministic search:
  the price of sampling).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import harness

OP = "quantize"
MODULE = "benchmarks.bench_quantize"
BETA = 0.25

SHAPES = [(32768, 64, 512), (4096, 256, 1024), (65536, 16, 256), (16384, 64, 4096)]
QUICK_SHAPES = [(4096, 64, 512), (1000, 33, 100)]
MEMORY_SHAPES = [(16384, 64, 4096)]
QUICK_MEMORY_SHAPES = [(4096, 64, 512)]

CPU_PROVIDERS = ["vqkernels-cpu", "reference", "plain-torch"]
CUDA_PROVIDERS = ["vqkernels-triton", "vqkernels-cuda", "reference", "plain-torch"]
OURS = {"vqkernels-cpu", "vqkernels-triton", "vqkernels-cuda"}
# The columns of the summary rows, on the console and in the .md file.
SUMMARY_COLUMNS = [
    "case",
    "ours",
    "ours_ms",
    "reference_ms",
    "plain_torch_ms",
    "vs_reference",
    "vs_plain_torch",
]


def plain_quantize(x: torch.Tensor, codebook: torch.Tensor, beta: float):
    """Hand-written straight-through VQ (the user's alternative): same loss as vqkernels."""
    with torch.no_grad():
        idx = torch.cdist(x, codebook).argmin(dim=1)
    q = F.embedding(idx, codebook)
    loss = beta * F.mse_loss(x, q.detach()) + F.mse_loss(q, x.detach())
    return x + (q - x).detach(), idx, loss


def make_provider(provider: str, n: int, d: int, k: int, device: str = "cpu", seed: int = 0):
    """Inputs (``x [n,d]`` and ``codebook [k,d]``, fp32, both requiring grad) and a callable
    running forward + backward once; it returns ``(indices, loss, x.grad, codebook.grad)``."""
    import vqkernels

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    codebook = torch.randn(k, d, generator=g).to(device).requires_grad_()
    grad_q = (torch.randn(n, d, generator=g) / (n * d)).to(device)
    one = torch.ones((), device=device)
    if provider == "plain-torch":

        def fwd():
            return plain_quantize(x, codebook, BETA)
    else:
        backend = {
            "vqkernels-cpu": "cpu",
            "vqkernels-triton": "triton",
            "vqkernels-cuda": "cuda",
            "reference": "reference",
        }[provider]
        if backend != "reference":
            harness.need_backend(backend, device)

        def fwd():
            return vqkernels.quantize(x, codebook, BETA, backend=backend, check_inputs=False)

    def run():
        x.grad = None
        codebook.grad = None
        q, idx, loss = fwd()
        torch.autograd.backward([q, loss], [grad_q, one])
        return idx, loss.detach(), x.grad, codebook.grad

    return run


_gold: dict[tuple, tuple] = {}


def make_check(n: int, d: int, k: int, device: str):
    def check(out) -> dict[str, Any]:
        key = (n, d, k, device)
        if key not in _gold:
            _gold.clear()
            _gold[key] = tuple(
                t.detach().clone() for t in make_provider("reference", n, d, k, device)()
            )
        idx, loss, gx, gc = out
        ridx, rloss, rgx, rgc = _gold[key]
        return {
            "agree": float((idx == ridx).float().mean()),
            "loss_rel_err": float((loss - rloss).abs() / rloss.abs().clamp_min(1e-30)),
            "grad_x_max_err": float((gx - rgx).abs().max()),
            "grad_cb_max_err": float((gc - rgc).abs().max()),
        }

    return check


FEATURE_SHAPES = [(8192, 64, 1024), (4096, 256, 1024)]  # (N, D, K); modest: shared 2-core machine
QUICK_FEATURE_SHAPES = [(4096, 64, 512)]
HEAD_SHAPES = [(8192, 8, 32, 512)]  # (N, H, D, K per head)
SAMPLE_SHAPES = [(4096, 64, 1024)]  # (N, D, K)
QUICK_HEAD_SHAPES = [(2048, 8, 32, 256)]


def make_feature_provider(
    provider: str, n: int, d: int, k: int, heads: int = 1, device: str = "cpu", seed: int = 0
):
    """Forward + backward of one issue-10 variant (see ``--features``); returns
    ``(indices, loss, x.grad)`` of its call."""
    import vqkernels

    kind, _, backend = provider.partition("-")
    if kind in ("sample", "nearest"):
        if backend != "reference":
            harness.need_backend(backend, device)
        g = torch.Generator().manual_seed(seed)
        xs = torch.randn(n, d, generator=g).to(device)
        cbs = torch.randn(k, d, generator=g).to(device)
        temp = 1.0 if kind == "sample" else 0.0

        def run_search():
            return vqkernels.nearest_code(
                xs, cbs, sample_temperature=temp, seed=7, backend=backend, check_inputs=False
            )

        return run_search
    if kind == "lr":
        backend = "cpu" if device == "cpu" else "triton"
    harness.need_backend(backend, device)
    g = torch.Generator().manual_seed(seed)
    shape = (n, heads, d) if heads > 1 else (n, d)
    x = torch.randn(*shape, generator=g).to(device).requires_grad_()
    cb_shape = (heads, k, d) if heads > 1 else (k, d)
    codebook = torch.randn(*cb_shape, generator=g).to(device)
    grad_q = (torch.randn(*shape, generator=g) / x.numel()).to(device)
    one = torch.ones((), device=device)
    if kind == "lr":
        from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

        def fwd():
            idx = vqkernels.nearest_code(x.detach(), codebook, backend=backend, check_inputs=False)
            q = codebook[idx]
            loss = BETA * F.mse_loss(x, q)
            return rotate_to(x, q), idx, loss
    elif kind == "loop":

        def fwd():
            outs = [
                vqkernels.quantize(x[:, h], codebook[h], BETA, backend=backend, check_inputs=False)
                for h in range(heads)
            ]
            q = torch.stack([o[0] for o in outs], dim=1)
            idx = torch.stack([o[1] for o in outs], dim=1)
            return q, idx, sum(o[2] for o in outs) / heads
    else:
        estimator = "rotation" if kind == "rotation" else "ste"

        def fwd():
            return vqkernels.quantize(
                x, codebook, BETA, estimator=estimator, backend=backend, check_inputs=False
            )

    def run():
        x.grad = None
        q, idx, loss = fwd()
        torch.autograd.backward([q, loss], [grad_q, one])
        return idx, loss.detach(), x.grad

    return run


def main_features(args) -> int:
    """The --features comparisons (rotation trick, multi-head), one results file."""
    device = args.device
    ours = "cpu" if device == "cpu" else "triton"
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    groups = []
    for n, d, k in QUICK_FEATURE_SHAPES if args.quick else FEATURE_SHAPES:
        provs = [f"rotation-{ours}", f"ste-{ours}", "lr-rotate_to"]
        groups.append(("rotation", harness.shape_label(n, d, k), provs, dict(n=n, d=d, k=k)))
    for n, h, d, k in QUICK_HEAD_SHAPES if args.quick else HEAD_SHAPES:
        provs = [f"heads-{ours}", f"loop-{ours}"]
        label = f"N{n}-H{h}-D{d}-K{k}"
        groups.append(("heads", label, provs, dict(n=n, d=d, k=k, heads=h)))
    for n, d, k in QUICK_FEATURE_SHAPES if args.quick else SAMPLE_SHAPES:
        provs = [f"sample-{ours}", "sample-reference", f"nearest-{ours}"]
        groups.append(("sampling", harness.shape_label(n, d, k), provs, dict(n=n, d=d, k=k)))
    for feature, label, provs, params in groups:
        cases = [
            (
                p,
                dict(provider=p, device=device, **params),
                {"case": label, "feature": feature},
                None,
            )
            for p in provs
            if harness.wanted(args, p)
        ]
        for row in harness.bench_group(OP, MODULE, "make_feature_provider", cases, args=args):
            rows.append(row)
            harness.progress(row)
    summary = []
    for feature, label, provs, _ in groups:
        rs = {
            r["provider"]: r
            for r in rows
            if r["case"] == label and r["feature"] == feature and r["median_ms"] is not None
        }
        base = rs.get(provs[0])
        for p in provs[1:]:
            if base and p in rs:
                summary.append(
                    {
                        "case": label,
                        "feature": feature,
                        "ours": provs[0],
                        "vs": p,
                        "ours_ms": base["median_ms"],
                        "other_ms": rs[p]["median_ms"],
                        "speedup": rs[p]["median_ms"] / base["median_ms"],
                    }
                )
    cols = ["case", "feature", "ours", "vs", "ours_ms", "other_ms", "speedup"]
    print()
    print(
        harness.format_table(
            rows,
            ["case", "provider", "median_ms", "p20_ms", "p80_ms", "loadavg", "status", "reason"],
        )
    )
    print()
    print(harness.format_table(summary, cols))
    meta = harness.metadata(
        device, elapsed_s=round(time.time() - t_start, 1), quick=args.quick, beta=BETA
    )
    name = ("quantize_features" if device == "cpu" else "gpu_quantize_features") + args.suffix
    harness.save_op_results(
        name,
        args,
        meta,
        rows,
        [],
        summary,
        label="quantize fwd+bwd: rotation trick and multi-head",
        time_section=(
            "Forward + backward (ms; median, 20/80 %), fp32",
            ["case", "provider", "median_ms", "p20_ms", "p80_ms", "loadavg"],
        ),
        summary_section=("Speedup of the fused variant (same run)", cols),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = harness.make_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--features", action="store_true", help="rotation-trick and multi-head comparisons"
    )
    args = harness.parse_args(parser, argv)
    if args.features:
        return main_features(args)
    device = args.device
    providers = harness.selected_providers(args, CPU_PROVIDERS, CUDA_PROVIDERS)
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    for n, d, k in QUICK_SHAPES if args.quick else SHAPES:
        cases = [
            (
                p,
                dict(provider=p, n=n, d=d, k=k, device=device),
                {"case": harness.shape_label(n, d, k)},
                make_check(n, d, k, device),
            )
            for p in providers
        ]
        # Round-robin timing: every provider of a shape sees the same machine load.
        for row in harness.bench_group(OP, MODULE, "make_provider", cases, args=args):
            rows.append(row)
            harness.progress(row)
        _gold.clear()

    mem_rows: list[dict[str, Any]] = []
    if not args.no_memory:
        print("peak extra memory, forward + backward (child process per provider) ...", flush=True)
        for n, d, k in QUICK_MEMORY_SHAPES if args.quick else MEMORY_SHAPES:
            for p in providers:
                row = harness.memory_case(
                    OP, p, MODULE, dict(provider=p, n=n, d=d, k=k, device=device), args=args
                )
                row["measure"] = "memory"
                mem_rows.append(row)
                harness.progress(row)

    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = {r["provider"]: r for r in rows if r["case"] == case and r["median_ms"] is not None}
        for p, r in rs.items():
            if p in OURS:
                ref, pt = rs.get("reference"), rs.get("plain-torch")
                summary.append(
                    {
                        "case": case,
                        "ours": p,
                        "ours_ms": r["median_ms"],
                        "reference_ms": ref["median_ms"] if ref else None,
                        "plain_torch_ms": pt["median_ms"] if pt else None,
                        "vs_reference": ref["median_ms"] / r["median_ms"] if ref else None,
                        "vs_plain_torch": pt["median_ms"] / r["median_ms"] if pt else None,
                    }
                )
    harness.print_op_tables(
        rows,
        [
            *harness.TIMING_COLUMNS,
            "agree",
            "loss_rel_err",
            "grad_x_max_err",
            "grad_cb_max_err",
            "loadavg",
            "status",
        ],
        "vqkernels speedup, forward + backward (same run):",
        summary,
        SUMMARY_COLUMNS,
        mem_rows,
    )

    meta = harness.metadata(
        device,
        elapsed_s=round(time.time() - t_start, 1),
        quick=args.quick,
        beta=BETA,
        codebook_requires_grad=True,
    )
    name = "quantize" if device == "cpu" else "gpu_quantize"
    name += args.suffix
    harness.save_op_results(
        name,
        args,
        meta,
        rows,
        mem_rows,
        summary,
        label="quantize fwd+bwd fp32 L2, learnable codebook",
        time_section=(
            "Forward + backward (ms; median, 20/80 %), fp32, learnable codebook",
            [
                "case",
                "provider",
                "median_ms",
                "p20_ms",
                "p80_ms",
                "agree",
                "grad_x_max_err",
                "grad_cb_max_err",
            ],
        ),
        summary_section=("vqkernels speedup", SUMMARY_COLUMNS),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
