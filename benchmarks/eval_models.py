"""Evaluate the reference VQ-VAE against the issue-5 targets and record the numbers.

    python -m benchmarks.eval_models                 # full: photos 3 min + digits 90 s, per backend
    python -m benchmarks.eval_models --quick         # smoke: a few seconds per run

For each dataset and each backend (the fused ``cpu`` backend when built, and ``reference``) it
trains ``python -m models.train --model vqvae --config base`` for the wall-clock budget (no
periodic evaluation, so the budget is all training), then reads the run's held-out metrics.

Targets (checked on the fused run, or the reference run when the fused backend is unavailable):
  photos, 3 min: held-out PSNR >= 24 dB on flower.jpg tiles and >= 28.5 dB on chelsea tiles,
                 training-set perplexity >= 350 of 512 codes, no collapse (usage >= 50%);
  digits, 90 s:  held-out PSNR >= 23.5 dB, held-out codebook usage >= 90%.
Steps/second of both backends are reported side by side.  The machine's load average is
recorded before and after each run: on a shared machine the step counts (and so the metrics)
are lower than on a quiet one.

Writes ``benchmarks/results/models_eval.json`` and ``models_eval.md`` (``--results-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TARGETS = {
    "photos": {
        "minutes": 3.0,
        "psnr_flower": 24.0,
        "psnr_chelsea": 28.5,
        "train_perplexity": 350.0,
        "min_usage": 0.5,
    },
    "digits": {"minutes": 1.5, "psnr": 23.5, "codebook_usage": 0.90},
}


def _commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


def _check(dataset: str, m: dict) -> dict:
    t = TARGETS[dataset]
    if dataset == "photos":
        checks = {
            "psnr_flower": m["per_image"]["flower"]["psnr"] >= t["psnr_flower"],
            "psnr_chelsea": m["per_image"]["chelsea"]["psnr"] >= t["psnr_chelsea"],
            "train_perplexity": m["train_perplexity"] >= t["train_perplexity"],
            "no_collapse": m["train_codebook_usage"] >= t["min_usage"],
        }
    else:
        checks = {
            "psnr": m["psnr"] >= t["psnr"],
            "codebook_usage": m["codebook_usage"] >= t["codebook_usage"],
        }
    checks["all"] = all(checks.values())
    return checks


def run_one(dataset: str, backend: str, minutes: float, out: str, extra: list[str]) -> dict:
    from models.train import train

    argv = [
        "--model",
        "vqvae",
        "--dataset",
        dataset,
        "--config",
        "base",
        "--minutes",
        str(minutes),
        "--out",
        out,
        "--backend",
        backend,
        "--eval-every",
        "0",
        "--quiet",
        *extra,
    ]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    m = train(argv)
    wall = time.perf_counter() - t0
    row = {
        "dataset": dataset,
        "backend": m["backend"],
        "minutes": minutes,
        "steps": m["steps"],
        "steps_per_second": m["steps_per_second"],
        "train_seconds": m["seconds"],
        "wall_seconds_incl_eval": wall,
        "psnr": m["psnr"],
        "ssim": m["ssim"],
        "per_image": m["per_image"],
        "codebook_usage": m["codebook_usage"],
        "perplexity": m["perplexity"],
        "train_perplexity": m["train_perplexity"],
        "train_codebook_usage": m["train_codebook_usage"],
        "bits_per_image": m["bits_per_image"],
        # Whole held-out photos (not tiles): colour fidelity as a viewer sees it.
        "whole_image": m.get("whole_image", {}),
        "batch_size": m["batch_size"],
        "image_size": m["image_size"],
        "threads": m["threads"],
        "load_avg_before": load0,
        "load_avg_after": os.getloadavg()[0],
        "argv": argv,
    }
    row["targets_met"] = _check(dataset, m)
    return row


def _markdown(res: dict) -> str:
    lines = [
        f"# VQ-VAE evaluation ({res['meta']['date']}, commit {res['meta']['commit']})",
        "",
        f"machine: {res['meta']['machine']}, {res['meta']['cpus']} CPUs, torch "
        f"{res['meta']['torch']}",
        "",
        "| dataset | backend | budget | steps | steps/s | held-out PSNR | per image | usage | "
        "train ppl | whole-photo ΔE76 (bias R,G,B /255) | load avg | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        per = ", ".join(f"{k} {v['psnr']:.2f}" for k, v in r["per_image"].items())
        colour = ", ".join(
            f"{k} {v['delta_e76']:.1f} ({', '.join(f'{b:+.0f}' for b in v['bias_rgb'])})"
            for k, v in r.get("whole_image", {}).items()
            if k != "mean" and "delta_e76" in v
        )
        lines.append(
            f"| {r['dataset']} | {r['backend']} | {r['minutes']:.1f} min | {r['steps']} | "
            f"{r['steps_per_second']:.2f} | {r['psnr']:.2f} dB | {per} | "
            f"{r['codebook_usage']:.2f} | {r['train_perplexity']:.0f} | {colour or '-'} | "
            f"{r['load_avg_before']:.1f}->{r['load_avg_after']:.1f} | "
            f"{'yes' if r['targets_met']['all'] else 'no: ' + ', '.join(k for k, v in r['targets_met'].items() if not v and k != 'all')} |"
        )
    lines += [
        "",
        "Targets: photos (3 min) flower >= 24 dB, chelsea >= 28.5 dB, train perplexity "
        ">= 350/512, no collapse; digits (90 s) PSNR >= 23.5 dB, usage >= 90%.",
        "A load average above the CPU count means other jobs shared the cores: fewer steps "
        "than on a quiet machine.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--datasets", nargs="+", default=["photos", "digits"], choices=["photos", "digits"]
    )
    p.add_argument(
        "--backends", nargs="+", default=None, help="default: cpu (if built) and reference"
    )
    p.add_argument("--quick", action="store_true", help="10-second budgets (smoke test)")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="models_eval", help="result file stem")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: temp)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: torch's; use 1 on a busy shared machine, where "
        "OpenMP threads fighting for the cores make 2-thread steps far slower)",
    )
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        help="extra models.train argument (repeatable), e.g. --train-arg=--lr=5e-4",
    )
    args = p.parse_args(argv)

    import vqkernels

    backends = args.backends
    if backends is None:
        backends = (["cpu"] if not vqkernels.available_backends()["cpu"] else []) + ["reference"]
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="vqk-eval-")
    res = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "commit": _commit(),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
            "cpu_backend_unavailable": vqkernels.available_backends()["cpu"],
        },
        "targets": TARGETS,
        "runs": [],
    }
    for ds in args.datasets:
        minutes = 10 / 60 if args.quick else TARGETS[ds]["minutes"]
        for be in backends:
            out = os.path.join(runs_dir, f"{ds}-{be}")
            print(f"[eval_models] {ds} / {be}: {minutes:.2f} min -> {out}", file=sys.stderr)
            extra = list(args.train_arg) + (
                ["--threads", str(args.threads)] if args.threads else []
            )
            row = run_one(ds, be, minutes, out, extra)
            res["runs"].append(row)
            print(
                f"  steps={row['steps']} ({row['steps_per_second']:.2f}/s) psnr={row['psnr']:.2f} "
                f"per_image={ {k: round(v['psnr'], 2) for k, v in row['per_image'].items()} } "
                f"usage={row['codebook_usage']:.2f} train_ppl={row['train_perplexity']:.0f} "
                f"targets={row['targets_met']}",
                file=sys.stderr,
            )
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, args.name + ".json"), "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    with open(os.path.join(args.results_dir, args.name + ".md"), "w") as f:
        f.write(_markdown(res))
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
