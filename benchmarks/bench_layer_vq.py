"""Layer benchmark, VQ family drop-ins: ``vqkernels.compat.{VectorQuantize, ResidualVQ,
GroupedResidualVQ}`` vs vector-quantize-pytorch 1.32 (LR) with **LR's own defaults** (rotation
trick on for dim > 1, EMA decay 0.8, commitment weight 1) and the configs real projects use.

Both layers start from the same weights (ours loads LR's ``state_dict``), see the same input, and
the torch RNG is seeded the same way before the first call, so k-means inits and dead-code
replacements draw alike; ``agree`` is the fraction of first-call indices equal to LR's.

Providers are timed round-robin in one group per case (``harness.bench_group``), so their
ratio is measured under the same load.  Modes: ``train`` = training-mode forward (search, rotation trick, losses, EMA / k-means / dead
codes) + ``backward`` of ``(quantized, Σ losses)`` with a fixed upstream gradient;
``eval`` = ``eval()`` forward under ``no_grad``.  Peak memory: fresh child process per provider
(see ``benchmarks/harness.py``), one call after a warm-up call.  Every layer first sees one
other batch (k-means init, EMA / dead codes in train mode), so k-means init is never timed.

Run as part of ``python -m benchmarks.bench_layer`` (suite ``vq``) or alone:
``python -m benchmarks.bench_layer_vq [--quick] [--threads N] [--out DIR]``.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import torch

from benchmarks import harness
from benchmarks.harness import Skip

OP = "layer_vq"
MODULE = "benchmarks.bench_layer_vq"
PROVIDERS = ["vqkernels-compat", "vqp"]
MODES = ("train", "eval")

# name -> (class, constructor keywords (LR's defaults otherwise), input shape [B, T, D])
CONFIGS: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "VQ K4096 D512": ("VectorQuantize", dict(dim=512, codebook_size=4096), (8, 512, 512)),
    "RVQ 8x1024 D128 kmeans+dead": (
        "ResidualVQ",
        dict(dim=128, num_quantizers=8, codebook_size=1024, kmeans_init=True, threshold_ema_dead_code=2),
        (8, 512, 128),
    ),
    "VQ cosine K8192 cd32 D256": (
        "VectorQuantize",
        dict(dim=256, codebook_size=8192, use_cosine_sim=True, codebook_dim=32),
        (8, 512, 256),
    ),
    "GRVQ 2x4x1024 D256": (
        "GroupedResidualVQ", dict(dim=256, groups=2, num_quantizers=4, codebook_size=1024), (8, 256, 256)
    ),
}
QUICK_CONFIGS: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "VQ K256 D64": ("VectorQuantize", dict(dim=64, codebook_size=256), (2, 128, 64)),
    "RVQ 4x128 D32 kmeans+dead": (
        "ResidualVQ",
        dict(dim=32, num_quantizers=4, codebook_size=128, kmeans_init=True, threshold_ema_dead_code=2),
        (2, 128, 32),
    ),
}


def _classes(provider: str, cls: str):
    if provider == "vqp":
        try:
            import vector_quantize_pytorch as lr
        except ImportError as exc:  # pragma: no cover - optional peer
            raise Skip(f"vector-quantize-pytorch not installed ({exc})") from exc
        return getattr(lr, cls)
    from vqkernels import compat

    return getattr(compat, cls)


def _build(provider: str, name: str, device: str):
    cls, kw, _ = {**CONFIGS, **QUICK_CONFIGS}[name]
    torch.manual_seed(0)
    try:
        import vector_quantize_pytorch as lr

        ref = getattr(lr, cls)(**kw)  # LR's init is the common starting point
    except ImportError as exc:  # pragma: no cover - optional peer
        raise Skip(f"vector-quantize-pytorch not installed ({exc})") from exc
    if provider == "vqp":
        layer = ref
    else:
        layer = _classes(provider, cls)(**kw)
        layer.load_state_dict(ref.state_dict())
        del ref
    return layer.to(device)


def _inputs(shape, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    grad_q = torch.randn(*shape, generator=g) / x.numel()
    return x.to(device), grad_q.to(device)


def make_provider(provider: str, name: str, mode: str, device: str = "cpu"):
    """One provider on one config; returns a callable running one step (returns the indices)."""
    warnings.filterwarnings("ignore")
    layer = _build(provider, name, device)
    shape = {**CONFIGS, **QUICK_CONFIGS}[name][2]
    x, grad_q = _inputs(shape, device)
    torch.manual_seed(2)  # same RNG state before the first (k-means) call on both sides
    # The first call (k-means init, in any mode as LR) sees another batch than the timed calls,
    # as in training: timing k-means' own batch would time the degenerate case where many
    # vectors equal a code exactly (zero residuals, exact distance ties at every later depth).
    first = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(device)
    if mode == "eval":
        layer.eval()
    with torch.no_grad():
        layer(first)
    if mode == "eval":

        def run():
            with torch.no_grad():
                return layer(x)[1]

        return run
    layer.train()
    x.requires_grad_()
    one = torch.ones((), device=device)

    def run():
        x.grad = None
        out = layer(x)
        torch.autograd.backward([out[0], out[2].sum()], [grad_q, one])
        return out[1]

    return run


# the share of indices equal to LR's ("vqp") on the same case, LR run once per case
_agreement = harness.IndexAgreement(make_provider, reference="vqp")
make_check = _agreement.check


def run_suite(args) -> tuple[list[dict], list[dict], list[dict]]:
    """Timing rows, memory rows and the ours-vs-LR summary for every config and mode."""
    device = args.device
    providers = [p for p in PROVIDERS if harness.wanted(args, p)]
    rows: list[dict[str, Any]] = []
    mem_rows: list[dict[str, Any]] = []
    for name in QUICK_CONFIGS if args.quick else CONFIGS:
        for mode in MODES:
            extra = {"case": f"{mode} {name}", "mode": mode}
            cases = [(p, dict(provider=p, name=name, mode=mode, device=device), extra,
                      make_check(name, mode, device)) for p in providers]
            # round-robin timing: on this shared machine both providers see the same load
            group = harness.bench_group(OP, MODULE, "make_provider", cases, args=args)
            for (p, params, _, _), row in zip(cases, group):
                rows.append(row)
                harness.progress(row)
                if not args.no_memory and row["status"] == "ok":
                    mrow = harness.bench_case(OP, p, MODULE, "make_provider", params, args=args,
                                              extra=extra, time_it=False, memory=True)
                    mrow["measure"] = "memory"
                    mem_rows.append(mrow)
                    harness.progress(mrow)
            _agreement.clear()
    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = {r["provider"]: r for r in rows if r["case"] == case and r["median_ms"] is not None}
        ms = {r["provider"]: r for r in mem_rows if r["case"] == case and r["extra_mib"] is not None}
        if "vqkernels-compat" not in rs or "vqp" not in rs:
            continue
        s = {
            "case": case,
            "ours_ms": rs["vqkernels-compat"]["median_ms"],
            "vqp_ms": rs["vqp"]["median_ms"],
            "speedup_vs_vqp": rs["vqp"]["median_ms"] / rs["vqkernels-compat"]["median_ms"],
            "agree": rs["vqkernels-compat"].get("agree"),
            "loadavg": rs["vqkernels-compat"].get("loadavg"),
        }
        if "vqkernels-compat" in ms and "vqp" in ms:
            s["ours_mib"] = ms["vqkernels-compat"]["extra_mib"]
            s["vqp_mib"] = ms["vqp"]["extra_mib"]
            s["memory_fraction_of_vqp"] = s["ours_mib"] / max(s["vqp_mib"], 1e-9)
        summary.append(s)
    return rows, mem_rows, summary


SUMMARY_COLUMNS = ["case", "ours_ms", "vqp_ms", "speedup_vs_vqp", "ours_mib", "vqp_mib",
                   "memory_fraction_of_vqp", "agree", "loadavg"]


def print_and_save(args, rows, mem_rows, summary, elapsed_s: float) -> None:
    print()
    print(harness.format_table(rows, ["case", "provider", "median_ms", "p20_ms", "p80_ms", "repeats",
                                      "agree", "loadavg", "status", "reason"]))
    print("\nVQ-family drop-ins vs vector-quantize-pytorch, LR's defaults (same run; targets on "
          "CPU: >= 5x faster, <= 1/8 of the peak memory):")
    print(harness.format_table(summary, SUMMARY_COLUMNS))
    meta = harness.metadata(args.device, elapsed_s=round(elapsed_s, 1), quick=args.quick,
                            loadavg_end=list(__import__("os").getloadavg()))
    name = ("layer_vq_cpu" if args.device == "cpu" else "layer_vq_gpu") + args.suffix
    harness.save_op_results(
        name, args, meta, rows, mem_rows, summary,
        label="VQ-family drop-in step vs vector-quantize-pytorch (LR defaults)",
        time_section=("Step time (ms)", ["case", "provider", "median_ms", "p20_ms", "p80_ms",
                                         "repeats", "agree", "loadavg", "status", "reason"]),
        summary_section=("vqkernels.compat vs vector-quantize-pytorch", SUMMARY_COLUMNS),
    )


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(harness.make_parser(__doc__.splitlines()[0]), argv)
    t0 = time.time()
    rows, mem_rows, summary = run_suite(args)
    print_and_save(args, rows, mem_rows, summary, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
