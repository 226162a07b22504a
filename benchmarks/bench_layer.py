"""Benchmark of the drop-in layer: ``vqkernels.nn.VectorQuantizer`` vs vector-quantize-pytorch.

Both layers are configured the same way: EMA codebook (decay 0.99, eps 1e-5), commitment weight
0.25, L2 distance, no k-means, no dead-code restarts, straight-through gradient
(vector-quantize-pytorch: ``VectorQuantize(dim, K, decay=0.99, commitment_weight=0.25,
rotation_trick=False)``), and start from the same codebook.

Providers, measured in the same run:

``vqkernels``            ``VectorQuantizer(..., backend="auto")`` (C++ CPU kernels when built;
                         on ``--device cuda`` the CUDA/Triton kernels)
``vqkernels-reference``  the same layer on ``backend="reference"`` (pure PyTorch ops)
``vqp``                  vector-quantize-pytorch 1.32 ``VectorQuantize``

Modes:

``train``  one training step: forward in training mode (search, straight-through, commitment loss,
           EMA update of the codebook buffers) and ``torch.autograd.backward`` of
           ``(quantized, loss)`` with a fixed upstream gradient -> ``x.grad``.
``eval``   ``layer.eval()`` forward under ``torch.no_grad()``.

The first call of every provider is checked: ``agree`` = fraction of indices equal to
``reference.nearest_code`` on the same input and initial codebook.  Peak memory is measured
separately (fresh child process per provider, see ``benchmarks/harness.py``).

Suites (``--suite``, default all): ``native`` (above) and ``vq`` (the VQ-family drop-ins
``vqkernels.compat.{VectorQuantize, ResidualVQ, GroupedResidualVQ}`` vs vector-quantize-pytorch
with LR's own defaults, see :mod:`benchmarks.bench_layer_vq`; written to ``layer_vq_cpu.*``).

Usage: ``python -m benchmarks.bench_layer [--device cpu|cuda] [--quick] [--out DIR] [--suite S]``
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import torch

from benchmarks import harness
from benchmarks.harness import Skip

OP = "layer"
MODULE = "benchmarks.bench_layer"
DECAY = 0.99
COMMIT = 0.25

SHAPES = [(16, 1024, 64, 4096), (8, 256, 256, 16384)]  # (B, T, D, K)
QUICK_SHAPES = [(4, 256, 64, 512)]
MODES = ("train", "eval")
PROVIDERS = ["vqkernels", "vqkernels-reference", "vqp"]
OURS = {"vqkernels"}


def _inputs(b: int, t: int, d: int, k: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    grad_q = torch.randn(b, t, d, generator=g) / (b * t * d)
    return x.to(device), codebook.to(device), grad_q.to(device)


def _layer(provider: str, d: int, k: int, codebook: torch.Tensor, device: str):
    if provider == "vqp":
        try:
            from vector_quantize_pytorch import VectorQuantize
        except ImportError as exc:  # pragma: no cover - optional peer
            raise Skip(f"vector-quantize-pytorch not installed ({exc})") from exc
        layer = VectorQuantize(d, k, decay=DECAY, commitment_weight=COMMIT, rotation_trick=False)
        with torch.no_grad():
            layer._codebook.embed.copy_(codebook.unsqueeze(0))
            layer._codebook.embed_avg.copy_(codebook.unsqueeze(0))
        return layer.to(device)
    import vqkernels
    from vqkernels.nn import VectorQuantizer

    backend = "auto" if provider == "vqkernels" else "reference"
    if backend == "auto":
        resolved = vqkernels.dispatch.resolve("auto", torch.device(device))
        if resolved == "reference":
            raise Skip(
                "no fused backend available on this device: "
                + "; ".join(
                    f"{b}: {w}" for b, w in vqkernels.available_backends(device).items() if w
                )
            )
    layer = VectorQuantizer(d, k, decay=DECAY, commitment_weight=COMMIT, backend=backend)
    with torch.no_grad():
        layer.codebook.copy_(codebook)
        layer.embed_sum.copy_(codebook)
    return layer.to(device)


def make_provider(provider: str, mode: str, b: int, t: int, d: int, k: int, device: str = "cpu"):
    """Inputs and layer for one provider; returns a callable running one step, returning the
    indices of that step."""
    warnings.filterwarnings("ignore")
    x, codebook, grad_q = _inputs(b, t, d, k, device)
    layer = _layer(provider, d, k, codebook, device)
    if mode == "eval":
        layer.eval()

        def run():
            with torch.no_grad():
                _, idx, _ = layer(x)
            return idx

        return run
    layer.train()
    x.requires_grad_()
    one = torch.ones((), device=device)

    def run():
        x.grad = None
        q, idx, loss = layer(x)
        torch.autograd.backward([q, loss], [grad_q, one])
        return idx

    return run


_gold: dict[tuple, torch.Tensor] = {}


def make_check(b: int, t: int, d: int, k: int, device: str):
    def check(idx) -> dict[str, Any]:
        from vqkernels import reference

        key = (b, t, d, k, device)
        if key not in _gold:
            _gold.clear()
            x, codebook, _ = _inputs(b, t, d, k, device)
            _gold[key] = reference.nearest_code(x.reshape(-1, d), codebook, "l2")[0]
        return {"agree": float((idx.reshape(-1) == _gold[key]).float().mean())}

    return check


def label(mode: str, b: int, t: int, d: int, k: int) -> str:
    return f"{mode} B{b}-T{t}-D{d}-K{k}"


SUITES = ("native", "vq")


def main(argv: list[str] | None = None) -> int:
    parser = harness.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=SUITES,
                        help="run only this suite (repeatable; default: all)")
    args = harness.parse_args(parser, argv)
    suites = args.suite or list(SUITES)
    if "vq" in suites:
        from benchmarks import bench_layer_vq

        t0 = time.time()
        vq_rows, vq_mem, vq_summary = bench_layer_vq.run_suite(args)
        bench_layer_vq.print_and_save(args, vq_rows, vq_mem, vq_summary, time.time() - t0)
    if "native" not in suites:
        return 0
    device = args.device
    providers = [p for p in PROVIDERS if harness.wanted(args, p)]
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    mem_rows: list[dict[str, Any]] = []
    for b, t, d, k in QUICK_SHAPES if args.quick else SHAPES:
        for mode in MODES:
            for p in providers:
                params = dict(provider=p, mode=mode, b=b, t=t, d=d, k=k, device=device)
                extra = {"case": label(mode, b, t, d, k), "mode": mode}
                row = harness.bench_case(
                    OP,
                    p,
                    MODULE,
                    "make_provider",
                    params,
                    args=args,
                    extra=extra,
                    check=make_check(b, t, d, k, device),
                )
                rows.append(row)
                harness.progress(row)
                if not args.no_memory and row["status"] == "ok":
                    mrow = harness.bench_case(
                        OP,
                        p,
                        MODULE,
                        "make_provider",
                        params,
                        args=args,
                        extra=extra,
                        time_it=False,
                        memory=True,
                    )
                    mrow["measure"] = "memory"
                    mem_rows.append(mrow)
                    harness.progress(mrow)
        _gold.clear()

    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = {r["provider"]: r for r in rows if r["case"] == case and r["median_ms"] is not None}
        ms = {
            r["provider"]: r for r in mem_rows if r["case"] == case and r["extra_mib"] is not None
        }
        for p in OURS & rs.keys():
            peer = rs.get("vqp")
            s = {
                "case": case,
                "ours_ms": rs[p]["median_ms"],
                "vqp_ms": peer["median_ms"] if peer else None,
                "speedup_vs_vqp": peer["median_ms"] / rs[p]["median_ms"] if peer else None,
            }
            if p in ms and "vqp" in ms:
                s["ours_mib"] = ms[p]["extra_mib"]
                s["vqp_mib"] = ms["vqp"]["extra_mib"]
                s["memory_fraction_of_vqp"] = ms[p]["extra_mib"] / max(ms["vqp"]["extra_mib"], 1e-9)
            summary.append(s)

    print()
    print(
        harness.format_table(
            rows,
            [
                "case",
                "provider",
                "median_ms",
                "p20_ms",
                "p80_ms",
                "repeats",
                "agree",
                "loadavg",
                "status",
                "reason",
            ],
        )
    )
    if mem_rows:
        print()
        print(harness.format_table(mem_rows, ["case", "provider", "extra_mib", "status", "reason"]))
    print(
        "\nvqkernels layer vs vector-quantize-pytorch (same run; targets on CPU, train: "
        ">= 3x faster, <= 1/4 of the peak memory):"
    )
    print(
        harness.format_table(
            summary,
            [
                "case",
                "ours_ms",
                "vqp_ms",
                "speedup_vs_vqp",
                "ours_mib",
                "vqp_mib",
                "memory_fraction_of_vqp",
            ],
        )
    )

    meta = harness.metadata(
        device,
        elapsed_s=round(time.time() - t_start, 1),
        quick=args.quick,
        decay=DECAY,
        commitment_weight=COMMIT,
    )
    name = "layer_cpu" if device == "cpu" else "layer_gpu"
    written = harness.write_results(name, rows + mem_rows, meta, args.out, summary=summary)
    if args.out is not None:
        where = meta["cpu"] if device == "cpu" else meta.get("gpu")
        written.append(
            harness.plot_rows(
                rows,
                args.out / f"{name}.png",
                title=f"VQ layer step (train: fwd+bwd+EMA; eval: fwd), fp32, {where}, "
                f"{args.threads} threads (commit {meta['commit'][:8]})",
            )
        )
        if mem_rows:
            written.append(
                harness.plot_rows(
                    mem_rows,
                    args.out / f"{name}_memory.png",
                    value_key="extra_mib",
                    lo_key=None,
                    hi_key=None,
                    ylabel="extra peak memory of one call (MiB)",
                    title=f"VQ layer peak memory, fp32, {where} (commit {meta['commit'][:8]})",
                )
            )
    for pth in written:
        print(f"wrote {pth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
