"""Beam-search and soft-loss benchmark: ``vqkernels.compat.ResidualVQ(beam_size=)``,
``VectorQuantize.forward(topk=)`` (suite ``beam``) and ``VectorQuantize`` with
``commitment_use_cross_entropy_loss`` / ``codebook_diversity_loss_weight`` (suite ``losses``: both
on the fused ``code_distribution``, LR builds the ``N x K`` softmax) vs vector-quantize-pytorch 1.32
(LR), same weights, same input.

LR builds a one-hot ``[N, beam, beam, K]`` per depth (its codes are ``one_hot @ codebook``) and keeps
every candidate's residual and graph; ours searches the top-k over row chunks (never ``N x K``) and
builds outputs and graph for the surviving ``beam`` candidates only (see ``compat/.../_beam.py``).
``agree`` = fraction of indices equal to LR's on the first call.  Modes as ``bench_layer_vq``:
``train`` = training forward + backward of ``(quantized, Σ losses)``; ``eval`` = ``no_grad`` forward.

``python -m benchmarks.bench_beam_search [--suite beam|losses] [--quick] [--threads N] [--no-memory]
[--out DIR]`` (results ``beam_search_cpu.*`` / ``vq_losses_cpu.*``)
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import torch

from benchmarks import harness
from benchmarks.harness import Skip

OP = "beam_search"
MODULE = "benchmarks.bench_beam_search"
PROVIDERS = ["vqkernels-compat", "vqp"]
MODES = ("train", "eval")

# name -> (class, constructor keywords (LR's defaults otherwise), forward keywords, input [B, T, D])
CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any], tuple[int, ...]]] = {
    "RVQ 8x1024 D128 beam4": ("ResidualVQ", dict(dim=128, num_quantizers=8, codebook_size=1024, beam_size=4),
                              {}, (4, 256, 128)),
    "VQ K4096 D256 topk8": ("VectorQuantize", dict(dim=256, codebook_size=4096), dict(topk=8), (4, 256, 256)),
}
LOSS_CONFIGS = {
    "VQ K4096 D256 CE commitment": ("VectorQuantize", dict(dim=256, codebook_size=4096,
                                                           commitment_use_cross_entropy_loss=True), {},
                                    (8, 512, 256)),
    "VQ K4096 D256 diversity": ("VectorQuantize", dict(dim=256, codebook_size=4096,
                                                       codebook_diversity_loss_weight=0.1), {}, (8, 512, 256)),
}
QUICK_CONFIGS = {
    "RVQ 4x128 D32 beam3": ("ResidualVQ", dict(dim=32, num_quantizers=4, codebook_size=128, beam_size=3),
                            {}, (2, 64, 32)),
}
QUICK_LOSS_CONFIGS = {
    "VQ K256 D32 CE + diversity": ("VectorQuantize", dict(dim=32, codebook_size=256,
                                                          commitment_use_cross_entropy_loss=True,
                                                          codebook_diversity_loss_weight=0.1), {}, (2, 64, 32)),
}


def make_provider(provider: str, name: str, mode: str, device: str = "cpu"):
    """One provider on one config; a callable running one step (returns the indices)."""
    warnings.filterwarnings("ignore")
    cls, kw, fkw, shape = {**CONFIGS, **LOSS_CONFIGS, **QUICK_CONFIGS, **QUICK_LOSS_CONFIGS}[name]
    try:
        import vector_quantize_pytorch as lr
    except ImportError as exc:  # pragma: no cover - optional peer
        raise Skip(f"vector-quantize-pytorch not installed ({exc})") from exc
    torch.manual_seed(0)
    layer = getattr(lr, cls)(**kw)
    if provider != "vqp":
        from vqkernels import compat

        ours = getattr(compat, cls)(**kw)
        ours.load_state_dict(layer.state_dict())
        layer = ours
    layer = layer.to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(device)
    if mode == "eval":
        layer.eval()

        def run():
            with torch.no_grad():
                return layer(x, **fkw)[1]

        return run
    with torch.no_grad():  # (an eval call: a training call would update the codebooks)
        out_shape = layer.eval()(x, **fkw)[0].shape
    layer.train()
    x.requires_grad_()
    grad_q = (torch.randn(out_shape, generator=g) / x.numel()).to(device)
    one = torch.ones((), device=device)

    def run():
        x.grad = None
        out = layer(x, **fkw)
        torch.autograd.backward([out[0], out[2].sum()], [grad_q, one])
        return out[1]

    return run


# the share of indices equal to LR's ("vqp") on the same case, LR run once per case
_agreement = harness.IndexAgreement(make_provider, reference="vqp")
make_check = _agreement.check


def main(argv: list[str] | None = None) -> int:
    parser = harness.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("beam", "losses"), default="beam")
    args = harness.parse_args(parser, argv)
    t0 = time.time()
    providers = [p for p in PROVIDERS if harness.wanted(args, p)]
    rows, mem_rows, summary = [], [], []
    if args.suite == "beam":
        configs = QUICK_CONFIGS if args.quick else CONFIGS
    else:
        configs = QUICK_LOSS_CONFIGS if args.quick else LOSS_CONFIGS
    for name in configs:
        for mode in MODES if args.suite == "beam" else ("train",):  # (the losses exist in training)
            extra = {"case": f"{mode} {name}", "mode": mode}
            cases = [(p, dict(provider=p, name=name, mode=mode, device=args.device), extra,
                      make_check(name, mode, args.device)) for p in providers]
            group = harness.bench_group(OP, MODULE, "make_provider", cases, args=args)  # round-robin
            for (p, params, _, _), row in zip(cases, group):
                rows.append(row)
                harness.progress(row)
                if not args.no_memory and row["status"] == "ok":
                    mrow = harness.bench_case(OP, p, MODULE, "make_provider", params, args=args,
                                              extra=extra, time_it=False, memory=True)
                    mem_rows.append(mrow)
                    harness.progress(mrow)
            _agreement.clear()
            rs = {r["provider"]: r for r in group if r["median_ms"] is not None}
            ms = {r["provider"]: r for r in mem_rows if r["case"] == extra["case"] and r["extra_mib"] is not None}
            if len(rs) == 2:
                s = {"case": extra["case"], "ours_ms": rs["vqkernels-compat"]["median_ms"],
                     "vqp_ms": rs["vqp"]["median_ms"],
                     "speedup_vs_vqp": rs["vqp"]["median_ms"] / rs["vqkernels-compat"]["median_ms"],
                     "agree": rs["vqkernels-compat"].get("agree"), "loadavg": rs["vqp"].get("loadavg")}
                if len(ms) == 2:
                    s.update(ours_mib=ms["vqkernels-compat"]["extra_mib"], vqp_mib=ms["vqp"]["extra_mib"])
                    s["memory_fraction_of_vqp"] = s["ours_mib"] / max(s["vqp_mib"], 1e-9)
                summary.append(s)
    cols = ["case", "ours_ms", "vqp_ms", "speedup_vs_vqp", "ours_mib", "vqp_mib", "memory_fraction_of_vqp",
            "agree", "loadavg"]
    print(harness.format_table(summary, cols))
    meta = harness.metadata(args.device, elapsed_s=round(time.time() - t0, 1), quick=args.quick)
    harness.save_op_results(
        ("beam_search" if args.suite == "beam" else "vq_losses") + ("_cpu" if args.device == "cpu" else "_gpu")
        + args.suffix, args, meta, rows, mem_rows, summary,
        label=f"{args.suite} suite vs vector-quantize-pytorch",
        time_section=("Step time (ms)", ["case", "provider", "median_ms", "p20_ms", "p80_ms", "repeats",
                                         "agree", "loadavg", "status", "reason"]),
        summary_section=("vqkernels.compat vs vector-quantize-pytorch", cols),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
