"""VQ-VAE vs VQGAN, measured side by side on the same data, latent grid, codebook and budget.

    python -m models.compare --out DIR [--minutes M] [--tiny]
    python -m models.compare --out DIR --vqvae C1 --vqgan C2      # compare trained checkpoints

Without checkpoints, trains a VQ-VAE and a VQGAN (``models.train.train``) for the same wall-clock
budget with the same dataset, crop size, codebook size and seed; then trains one code-index prior
(:mod:`models.prior`) per model for the same budget; then evaluates both on the held-out tiles and
writes into DIR:

* ``report.md``: the table and the observed differences in plain words, generated from the
  measured numbers (nothing in the text is fixed in advance except the definitions);
* ``reconstructions.png``: each held-out photo whole, original | VQ-VAE | VQGAN | JPEG at equal
  bits per pixel, with a zoomed crop row (digits: originals / VQ-VAE / VQGAN rows of tiles);
* ``samples_vqvae.png``, ``samples_vqgan.png``: decoded samples of each model's prior;
* ``metrics.json``: every number in the report.

Training runs go to ``DIR/runs/`` (ignored by git; ``--resume`` reuses finished stages).

Measures (held-out tiles, images in [0, 1]): PSNR, SSIM, perceptual distance (the models'
offline perceptual metric: ST-LPIPS / LPIPS when their weight files are present, else
``1 − SSIM + gradient L1``), sharpness as the gradient-magnitude error
``mean |‖∇y‖ − ‖∇x‖|`` and the gradient-energy ratio ``mean ‖∇y‖ / mean ‖∇x‖`` (1 = as much edge
contrast as the original, < 1 = blurrier), codebook usage and perplexity, bits per image at
``⌈log2 K⌉`` bits per index and under the learned prior, training steps per second.

Layout: :mod:`models.compare_measures` (the measures), :mod:`models.compare_report` (the
plain-word differences and ``report.md``); this module runs the pipeline and the CLI and
re-exports the other two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import prior as P
from .checkpoint import atomic_write_json
from .cli import exit_status

# The measures (models/compare_measures.py) and the words (models/compare_report.py),
# re-exported: ``models.compare`` stays the one name to use.
from .compare_measures import evaluate_reconstructions, gradient_magnitude, sharpness
from .compare_report import (  # noqa: F401
    QUALITY_KEYS,
    _gan_note,
    _ratio_sentence,
    _sentence,
    describe_differences,
    render_report,
)

__all__ = [
    "gradient_magnitude",
    "sharpness",
    "evaluate_reconstructions",
    "describe_differences",
    "run_comparison",
    "main",
]

NAMES = {"vqvae": "VQ-VAE", "vqgan": "VQGAN"}

# Budgets when --minutes / --prior-minutes are not given.
DEFAULT_MINUTES = {"tiny": 0.25, "base": 4.0}
DEFAULT_PRIOR_MINUTES = {"tiny": 0.1, "base": 1.5}


# --------------------------------------------------------------------------------- pipeline


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _train_model(kind: str, out: Path, args: argparse.Namespace, size: str) -> dict:
    """Train one VQ model with the models' training entry point (same settings for both)."""
    from .train import train

    argv = [
        "--model", kind,
        "--dataset", args.dataset,
        "--config", size,
        "--steps", str(args.steps),
        "--minutes", str(args.minutes),
        "--out", str(out),
        "--seed", str(args.seed),
        "--backend", args.backend,
        "--codebook-size", str(args.codebook_size),
    ]  # fmt: skip
    if args.image_size:
        argv += ["--image-size", str(args.image_size)]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    argv += _extra_train_args(kind, args, size)
    print(f"[compare] training {NAMES[kind]}: {' '.join(argv)}", file=sys.stderr)
    return train(argv)


def _extra_train_args(kind: str, args: argparse.Namespace, size: str) -> list[str]:
    """Model-specific flags that keep the two runs comparable (see ``models.train --help``).

    The wall-clock budget must measure training only, so periodic evaluation is off
    (``--eval-every 0``: its cost differs between the models and would eat into the budget).
    """
    extra = ["--eval-every", "0"]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if kind == "vqgan":  # VQ-VAE keeps its own objective (MSE + VQ loss, no perceptual term)
        extra += ["--perceptual", args.train_perceptual]
    if not sys.stderr.isatty():
        extra.append("--quiet")
    if kind == "vqgan" and args.disc_start is not None:
        extra += ["--disc-start", str(args.disc_start)]
    if args.downsample is not None:
        n = int(round(math.log2(args.downsample)))
        if args.downsample < 1 or 2**n != args.downsample:
            raise ValueError(f"--downsample must be a power of two, got {args.downsample}")
        if kind == "vqvae":
            extra += ["--set", f"downsample={args.downsample}"]
        else:
            # VQGAN's factor is 2**(len(ch_mult) - 1): trim or extend the config's multipliers.
            from .vqgan import vqgan_config

            mult = list(vqgan_config(size)["ch_mult"])
            mult = (mult + [mult[-1]] * n)[: n + 1]
            extra += ["--set", "ch_mult=" + json.dumps(mult)]
    return extra


def _train_prior(kind: str, ckpt: Path, out: Path, args: argparse.Namespace, size: str) -> dict:
    argv = [
        "train",
        "--checkpoint", str(ckpt),
        "--steps", str(args.prior_steps),
        "--minutes", str(args.prior_minutes),
        "--out", str(out),
        "--config", "tiny" if size == "tiny" else args.prior_config,
        "--seed", str(args.seed),
        "--dataset", args.dataset,
        "--train-crops", str(args.train_crops),
    ]  # fmt: skip
    if args.image_size:
        argv += ["--image-size", str(args.image_size)]
    if not sys.stderr.isatty():
        argv.append("--no-progress")
    print(f"[compare] training the prior of {NAMES[kind]}", file=sys.stderr)
    return P.main(argv)


def _steps_per_second(run_metrics: dict) -> float | None:
    if run_metrics.get("steps_per_second"):
        return float(run_metrics["steps_per_second"])
    steps, seconds = run_metrics.get("steps"), run_metrics.get("seconds")
    if steps and seconds:
        return float(steps) / float(seconds)
    return None


def _pick_tiles(groups: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Indices (into the concatenated groups) of ``n`` tiles spread evenly over each held-out
    source image: deterministic, and every source image is shown."""
    per = [max(1, n // len(groups))] * len(groups)
    per[-1] = max(1, n - sum(per[:-1]))
    out, offset = [], 0
    for t, m in zip(groups.values(), per):
        idx = torch.linspace(0, t.shape[0] - 1, min(m, t.shape[0])).round().long()
        out.append(idx + offset)
        offset += t.shape[0]
    return torch.cat(out)


def _redact_paths(args: list[str]) -> list[str]:
    """The command line as recorded in reports: absolute paths outside the working directory
    (local weight files, temp dirs) become ``<name>`` so no machine path is committed."""
    cwd = os.path.abspath(os.getcwd())
    out = []
    for a in args:
        if os.path.isabs(a) and not os.path.abspath(a).startswith(cwd + os.sep):
            out.append(f"<{os.path.basename(a.rstrip(os.sep)) or 'path'}>")
        else:
            out.append(a)
    return out


def run_comparison(argv: list[str] | None = None) -> dict:
    """Programmatic entry point (same flags as the CLI); returns the metrics dict."""
    args = build_parser().parse_args(argv)
    size = "tiny" if args.tiny else args.config
    if args.dataset is None:
        args.dataset = "digits" if args.tiny else "photos"
    if args.minutes is None:
        args.minutes = DEFAULT_MINUTES[size]
    if args.prior_minutes is None:
        args.prior_minutes = DEFAULT_PRIOR_MINUTES[size]
    if args.codebook_size is None:
        args.codebook_size = 32 if size == "tiny" else 512
    if (args.vqvae is None) != (args.vqgan is None):
        raise SystemExit("give both --vqvae and --vqgan checkpoints, or neither")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    from . import load as load_model
    from .data import eval_groups
    from .metrics import perplexity, psnr
    from .perceptual import build_perceptual

    t_start = time.perf_counter()
    load_start = _loadavg()
    ckpts, run_metrics = {}, {}
    for kind in ("vqvae", "vqgan"):
        given = getattr(args, kind)
        if given:
            ckpts[kind] = Path(given)
            mj = Path(given).parent / "metrics.json"
            run_metrics[kind] = _read_json(mj) if mj.is_file() else {}
            continue
        d = runs / kind
        if args.resume and (d / "metrics.json").is_file() and (d / "checkpoint.pt").is_file():
            run_metrics[kind] = _read_json(d / "metrics.json")
        else:
            before = _loadavg()
            run_metrics[kind] = _train_model(kind, d, args, size)
            # Kept next to the run so that a --resume'd report still shows the load each model
            # was trained under (steps/s on a shared machine depend on it).
            atomic_write_json({"load_average": [before, _loadavg()]}, d / "compare_load.json")
        if (d / "compare_load.json").is_file():
            run_metrics[kind]["load_average"] = _read_json(d / "compare_load.json")["load_average"]
        ckpts[kind] = d / "checkpoint.pt"

    # Only now (after training) point the evaluation metric at its weight file.
    if args.perceptual_weights:
        os.environ["VQKERNELS_STLPIPS_PATH"] = args.perceptual_weights
    loaded = {k: load_model(c).eval() for k, c in ckpts.items()}
    for m in loaded.values():
        if hasattr(m, "set_backend"):
            m.set_backend(args.backend)
    ka, kb = loaded["vqvae"].codebook_size, loaded["vqgan"].codebook_size
    if ka != kb:
        raise ValueError(f"the models have different codebook sizes ({ka} vs {kb}): not comparable")

    groups = eval_groups(args.dataset, args.image_size)
    images = torch.cat(list(groups.values()))
    grids = {k: tuple(m.encode(images[:1]).shape[1:]) for k, m in loaded.items()}
    if grids["vqvae"] != grids["vqgan"]:
        raise ValueError(
            f"the models have different latent grids on {tuple(images.shape[-2:])} images "
            f"(VQ-VAE {grids['vqvae']}, VQGAN {grids['vqgan']}): use the same downsampling factor"
        )

    perceptual, pkind = build_perceptual(args.perceptual)
    perceptual.eval()

    results: dict[str, dict] = {}
    recons = {}
    for kind, model in loaded.items():
        t = time.perf_counter()
        m, recon, idx = evaluate_reconstructions(model, images, perceptual)
        m["psnr_per_image"] = {}
        start = 0
        for name, g in groups.items():
            n = g.shape[0]
            m["psnr_per_image"][name] = psnr(recon[start : start + n], images[start : start + n])
            start += n
        m["steps"] = run_metrics[kind].get("steps")
        m["train_seconds"] = run_metrics[kind].get("seconds")
        m["steps_per_second"] = _steps_per_second(run_metrics[kind])
        m["parameters"] = sum(p.numel() for p in model.parameters())
        if "disc_start" in model.config:
            m["disc_start"] = int(model.config["disc_start"])
        m["train_perceptual"] = run_metrics[kind].get("perceptual")
        m["train_backend"] = run_metrics[kind].get("backend")
        m["train_load_average"] = run_metrics[kind].get("load_average")
        m["eval_seconds"] = round(time.perf_counter() - t, 2)
        results[kind] = m
        recons[kind] = recon

    # Priors (one per model, same budget) and their samples.
    sample_gen_seed = args.seed
    for kind in ("vqvae", "vqgan"):
        d = runs / f"prior_{kind}"
        if args.resume and (d / "metrics.json").is_file() and (d / "prior.pt").is_file():
            pm = _read_json(d / "metrics.json")
        else:
            pm = _train_prior(kind, ckpts[kind], d, args, size)
        r = results[kind]
        r["prior_bits_per_index"] = pm.get("eval_bits_per_index")
        r["prior_bits_per_image"] = pm.get("eval_bits_per_image")
        r["prior_unigram_bits_per_index"] = pm.get("eval_unigram_bits_per_index")
        r["prior_steps"] = pm.get("steps")
        pool = torch.load(d / "indices.pt", map_location="cpu", weights_only=True)
        r["train_perplexity"] = perplexity(pool["train"].long(), loaded[kind].codebook_size)
        prior = P.load_prior(d / "prior.pt")
        samples, _ = P.generate_images(
            prior, loaded[kind], args.samples, args.temperature, args.top_k, sample_gen_seed
        )
        P.save_grid(samples, out / f"samples_{kind}.png", nrow=8, scale=_scale(samples))

    jpeg_whole = None
    if args.dataset == "digits":  # 8x8 digits: originals / VQ-VAE / VQGAN on the same tiles
        sel = _pick_tiles(groups, args.show)
        rows = torch.cat([images[sel], recons["vqvae"][sel], recons["vqgan"][sel]])
        P.save_grid(rows, out / "reconstructions.png", nrow=len(sel), scale=_scale(rows))
    else:  # whole held-out photos: original | VQ-VAE | VQGAN | JPEG at equal bpp
        from .data import eval_photos
        from .figures import comparison_figure

        named = {NAMES[k]: loaded[k] for k in ("vqvae", "vqgan")}
        whole = comparison_figure(
            named, eval_photos(args.dataset), str(out / "reconstructions.png")
        )
        for kind in ("vqvae", "vqgan"):
            results[kind]["whole_image"] = whole[NAMES[kind]]
        jpeg_whole = whole["JPEG"]

    words = describe_differences(results["vqvae"], results["vqgan"])
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        # 1-minute load averages at start and end: the machine is shared, and steps/s depend on it.
        "load_average": [load_start, _loadavg()],
        "commit": _git_commit(),
    }
    setup = {
        "dataset": args.dataset,
        "image_size": int(images.shape[-1]),
        "eval_tiles": {k: int(v.shape[0]) for k, v in groups.items()},
        "codebook_size": ka,
        "latent_grid": list(grids["vqvae"]),
        "config": size,
        "minutes_per_model": args.minutes if not args.vqvae else None,
        "prior_minutes": args.prior_minutes,
        "prior_config": "tiny" if size == "tiny" else args.prior_config,
        "perceptual": pkind,
        "backend": args.backend,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "checkpoints": {k: str(v) for k, v in ckpts.items()},
        "command": "python -m models.compare "
        + " ".join(_redact_paths(argv if argv is not None else sys.argv[1:])),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    report = {"setup": setup, "env": env, "models": results, "differences": words}
    if jpeg_whole is not None:
        report["jpeg_same_bpp"] = jpeg_whole
    atomic_write_json(report, out / "metrics.json")
    (out / "report.md").write_text(render_report(report))
    print(f"[compare] wrote {out / 'report.md'}", file=sys.stderr)
    return report


def _scale(images: torch.Tensor) -> int:
    # Small tiles are magnified (nearest neighbour) so that 8x8 digits stay visible; capped so a
    # row of 32x32 tiles stays a few hundred KB as PNG.
    return max(1, min(4, 96 // int(images.shape[-1])))


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


# -------------------------------------------------------------------------------------- CLI


def _top_k(s: str) -> int | None:
    return P._top_k(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.compare", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="report folder (report.md, PNGs, metrics.json)")
    p.add_argument(
        "--minutes",
        type=P._positive_float,
        default=None,
        help="training budget per model (default 4; 0.25 with --tiny)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=1_000_000,
        help="step cap per model (the minutes budget usually stops first)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny configs on digits: a smoke test")
    p.add_argument("--config", default="base", choices=["tiny", "base"])
    p.add_argument(
        "--dataset",
        default=None,
        help="digits | photos | PATH (default photos; digits with --tiny)",
    )
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--codebook-size", type=int, default=None, help="default 512 (32 with --tiny)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--downsample",
        type=int,
        default=None,
        help="latent grid factor for both models (default: the configs' own)",
    )
    p.add_argument(
        "--disc-start",
        type=int,
        default=None,
        help="VQGAN step at which the discriminator starts (default: the config's)",
    )
    p.add_argument("--vqvae", default=None, help="use this VQ-VAE checkpoint instead of training")
    p.add_argument("--vqgan", default=None, help="use this VQGAN checkpoint instead of training")
    p.add_argument("--prior-minutes", type=P._positive_float, default=None)
    p.add_argument("--prior-steps", type=int, default=100_000)
    p.add_argument("--prior-config", default="small", choices=sorted(P.PRIOR_CONFIGS))
    p.add_argument("--train-crops", type=int, default=8192)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--temperature", type=P._positive_float, default=1.0)
    p.add_argument("--top-k", type=_top_k, default=None)
    p.add_argument("--show", type=int, default=8, help="tiles in the reconstruction grid")
    p.add_argument(
        "--perceptual",
        default="auto",
        choices=["auto", "stlpips", "lpips", "ssim"],
        help="the perceptual DISTANCE of the report (evaluation only)",
    )
    p.add_argument(
        "--train-perceptual",
        default="auto",
        help="VQGAN's perceptual LOSS (passed to models.train; resolved before "
        "--perceptual-weights is applied, so the report's distance is not a training objective "
        "unless such a weight file was already configured)",
    )
    p.add_argument(
        "--perceptual-weights",
        default=None,
        help="path of vgg_shift_tolerant.pth (sets VQKERNELS_STLPIPS_PATH)",
    )
    p.add_argument("--backend", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for every stage (on a busy shared machine 1 can beat 2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="reuse finished runs under DIR/runs")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run_comparison(argv)


def _cli() -> int:
    """Command-line entry: user errors print one line (no traceback) and exit with status 2."""
    return exit_status(main)


if __name__ == "__main__":
    sys.exit(_cli())
