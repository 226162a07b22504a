"""Benchmark of the scalar/lookup-free drop-ins (``vqkernels.compat.LFQ``, ``FSQ``) vs
vector-quantize-pytorch 1.32 with LR's own defaults, one training step, side by side in one run.

Configs (issue 10):

``lfq``  ``LFQ(codebook_size=65536, dim=16)`` (entropy loss on: ``entropy_loss_weight=0.1``,
         ``diversity_gamma=1``, ``inv_temperature=100``), input ``[B, T, 16]``.
``fsq``  ``FSQ(levels=[8, 5, 5, 5], dim=256)`` (projections 256 -> 4 -> 256), input ``[B, T, 256]``.
``simvq``  ``SimVQ(dim=256, codebook_size=8192)`` (rotation trick on, LR's default), input
         ``[B, T, 256]``: upstream runs ``torch.cdist`` (N x K) + argmin, ours one fused
         ``vqkernels.quantize`` on the implicit codebook.

Providers, measured in the same run, same weights (upstream's state_dict loaded strictly):

``vqkernels``    the drop-in (LFQ: entropy in O(N·2^(d/2)) memory; FSQ: one-pass bound step)
``vqp``          vector-quantize-pytorch 1.32 (LFQ builds the N x 2^16 softmax)
``vqp+compile``  ``torch.compile`` of upstream's FSQ module (the "fuse the elementwise step with
                 the compiler" option; FSQ only -- compiling LFQ would still build N x 2^d)

One step: forward in training mode, ``backward`` of ``(out·g).sum() + aux_loss`` (LFQ) or
``(out·g).sum()`` (FSQ) with a fixed ``g`` -> ``x.grad`` and the projection gradients.  The first
call is checked: indices equal to upstream's (``agree``), LFQ aux loss relative error
(``aux_rel_err``; SimVQ: the commitment loss).  Timing round-robin (``harness.bench_group``); peak memory in a fresh child
process per provider (``harness.measure_memory``).

Usage: ``python -m benchmarks.bench_layer_scalar [--quick] [--threads N] [--families lfq,fsq,simvq]
[--suffix S] [--out DIR]``
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import torch

from benchmarks import harness
from benchmarks.harness import Skip

OP = "layer_scalar"
MODULE = "benchmarks.bench_layer_scalar"

# (family, B, T): LFQ at 1024 tokens already makes upstream hold several N x 65536 fp32 tensors
CASES = [("lfq", 4, 256), ("fsq", 8, 1024), ("simvq", 4, 1024)]
QUICK_CASES = [("lfq", 1, 64), ("fsq", 2, 128), ("simvq", 1, 64)]
PROVIDERS = {"lfq": ["vqkernels", "vqp"], "fsq": ["vqkernels", "vqp", "vqp+compile"], "simvq": ["vqkernels", "vqp"]}


def _config(family: str) -> dict[str, Any]:
    if family == "lfq":
        return dict(codebook_size=65536, dim=16)
    if family == "simvq":
        return dict(dim=256, codebook_size=8192)
    return dict(levels=[8, 5, 5, 5], dim=256)


def _inputs(family: str, b: int, t: int, seed: int = 0):
    d = _config(family)["dim"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    grad = torch.randn(b, t, d, generator=g) / (b * t * d)
    return x, grad


def _layers(family: str):
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as exc:  # pragma: no cover - optional peer
        raise Skip(f"vector-quantize-pytorch not installed ({exc})") from exc
    from vqkernels import compat

    cls_up, cls_ours = {"lfq": (vqp.LFQ, compat.LFQ), "fsq": (vqp.FSQ, compat.FSQ),
                        "simvq": (vqp.SimVQ, compat.SimVQ)}[family]
    torch.manual_seed(0)
    up = cls_up(**_config(family))
    ours = cls_ours(**_config(family))
    ours.load_state_dict(up.state_dict(), strict=True)
    return up, ours


def make_provider(provider: str, family: str, b: int, t: int, device: str = "cpu"):
    """One training step of ``provider``; returns ``(indices, aux_loss)`` of that step."""
    warnings.filterwarnings("ignore")
    if device != "cpu":
        raise Skip("this benchmark is CPU-only for now")
    x, grad = _inputs(family, b, t)
    up, ours = _layers(family)
    layer = ours if provider == "vqkernels" else up
    layer.train()
    if provider == "vqp+compile":
        if family != "fsq":
            raise Skip("compiling upstream's LFQ still builds the N x 2^d softmax")
        layer = torch.compile(layer)
    x.requires_grad_()

    def run():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        out = layer(x)
        if family in ("lfq", "simvq"):
            q, idx, aux = out
            ((q * grad).sum() + aux).backward()
            return idx, aux.detach()
        q, idx = out
        (q * grad).sum().backward()
        return idx, None

    return run


_gold: dict[tuple, Any] = {}


def make_check(family: str, b: int, t: int):
    def check(out) -> dict[str, Any]:
        key = (family, b, t)
        if key not in _gold:
            _gold.clear()
            x, _ = _inputs(family, b, t)
            up, _ = _layers(family)
            up.train()
            with torch.no_grad():
                res = up(x)
            _gold[key] = (res[1], res[2] if family in ("lfq", "simvq") else None)
        idx_ref, aux_ref = _gold[key]
        idx, aux = out
        row = {"agree": float((idx == idx_ref).float().mean())}
        if aux_ref is not None:
            row["aux_rel_err"] = float((aux - aux_ref).abs() / aux_ref.abs().clamp(min=1e-12))
        return row

    return check


def label(family: str, b: int, t: int) -> str:
    cfg = _config(family)
    if family == "fsq":
        what = f"FSQ {cfg['levels']} D={cfg['dim']}"
    else:
        what = f"{family.upper().replace('SIMVQ', 'SimVQ')} K={cfg['codebook_size']} D={cfg['dim']}"
    return f"train {what} B{b}-T{t}"


def main(argv: list[str] | None = None) -> int:
    parser = harness.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--families", default=None, help="comma-separated subset of lfq,fsq,simvq")
    args = harness.parse_args(parser, argv)
    families = set(args.families.split(",")) if args.families else None
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    mem_rows: list[dict[str, Any]] = []
    for family, b, t in QUICK_CASES if args.quick else CASES:
        if families is not None and family not in families:
            continue
        providers = [p for p in PROVIDERS[family] if harness.wanted(args, p)]
        extra = {"case": label(family, b, t), "family": family}
        cases = [(p, dict(provider=p, family=family, b=b, t=t, device=args.device), extra,
                  make_check(family, b, t)) for p in providers]
        for row in harness.bench_group(OP, MODULE, "make_provider", cases, args=args):
            rows.append(row)
            harness.progress(row)
        if not args.no_memory:
            for p in providers:
                params = dict(provider=p, family=family, b=b, t=t, device=args.device)
                mrow = harness.bench_case(OP, p, MODULE, "make_provider", params, args=args, extra=extra,
                                          time_it=False, memory=True)
                mrow["measure"] = "memory"
                mem_rows.append(mrow)
                harness.progress(mrow)
        _gold.clear()

    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = {r["provider"]: r for r in rows if r["case"] == case and r["median_ms"] is not None}
        ms = {r["provider"]: r for r in mem_rows if r["case"] == case and r["extra_mib"] is not None}
        ours, peer = rs.get("vqkernels"), rs.get("vqp")
        if ours is None or peer is None:
            continue
        s = {"case": case, "ours_ms": ours["median_ms"], "vqp_ms": peer["median_ms"],
             "speedup_vs_vqp": peer["median_ms"] / ours["median_ms"]}
        if "vqp+compile" in rs:
            s["vqp_compile_ms"] = rs["vqp+compile"]["median_ms"]
        if "vqkernels" in ms and "vqp" in ms:
            s["ours_mib"] = ms["vqkernels"]["extra_mib"]
            s["vqp_mib"] = ms["vqp"]["extra_mib"]
            s["memory_fraction_of_vqp"] = ms["vqkernels"]["extra_mib"] / max(ms["vqp"]["extra_mib"], 1e-9)
        summary.append(s)

    time_cols = ["case", "provider", "median_ms", "p20_ms", "p80_ms", "repeats", "agree", "aux_rel_err",
                 "loadavg", "status", "reason"]
    summary_cols = ["case", "ours_ms", "vqp_ms", "vqp_compile_ms", "speedup_vs_vqp", "ours_mib", "vqp_mib",
                    "memory_fraction_of_vqp"]
    print()
    print(harness.format_table(rows, time_cols))
    if mem_rows:
        print()
        print(harness.format_table(mem_rows, ["case", "provider", "extra_mib", "status", "reason"]))
    print("\nvqkernels.compat vs vector-quantize-pytorch (same run; targets: LFQ >= 5x faster and "
          "<= 1/8 of the peak memory, FSQ not slower):")
    print(harness.format_table(summary, summary_cols))
    meta = harness.metadata(args.device, elapsed_s=round(time.time() - t_start, 1), quick=args.quick)
    harness.save_op_results(
        f"layer_scalar_{args.device}{args.suffix}", args, meta, rows, mem_rows, summary,
        label="LFQ / FSQ train step (fwd + bwd), fp32, LR defaults",
        time_section=("Train step (ms; median, 20/80 %), fp32", time_cols),
        summary_section=("vqkernels.compat vs vector-quantize-pytorch", summary_cols),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
