"""Rate–distortion of the VQ-VAE codec against JPEG and WebP on the held-out photos, honestly.

    python -m benchmarks.compression_rd                   # ~15 min on 2 busy cores
    python -m benchmarks.compression_rd --quick           # smoke test, ~1 min
    python -m benchmarks.compression_rd --resume          # reuse trained models in --runs-dir

For each VQ-VAE setting (codebook size K, downsampling f) it trains a model with the default
photos recipe (``models.train``, wall-clock budget ``--minutes``), then a code-index prior on its
training crops (``models.prior``, ``--prior-minutes``), and encodes each held-out photo WHOLE
(flower.jpg, chelsea) with ``models.compress``:

* ``VQ fixed``: ⌈log2 K⌉ bits per index (file format version 1);
* ``VQ + prior``: indices range-coded with the prior (version 2); the file is decoded again and
  must give the same indices.

JPEG (libjpeg via Pillow, optimised Huffman tables, 4:2:0) and WebP (libwebp, method 6) run at a
sweep of qualities. Every bpp is the whole file's size (headers included) over the photo's
pixels. Distortion: PSNR (dB), SSIM and mean CIE76 ΔE on the whole photo.

Writes ``benchmarks/results/compression_rd.{json,csv,md,png}``; the Markdown states in plain
words, from the measured numbers, where the VQ codec wins or loses (JPEG/WebP interpolated
linearly in bpp to the VQ point; outside their measured range nothing is claimed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

# (label, codebook size, downsampling factor): 3 points along the rate axis.
VQ_SETTINGS = (("K512-f4", 512, 4), ("K64-f4", 64, 4), ("K512-f8", 512, 8))
QUALITIES = (1, 3, 5, 10, 20, 30, 50, 70, 90, 95)
METRICS = ("psnr", "ssim", "delta_e76")


def _distortion(dec: torch.Tensor, img: torch.Tensor) -> dict:
    from models.colour import delta_e76
    from models.metrics import psnr, ssim

    a, b = dec.unsqueeze(0), img.unsqueeze(0)
    return {"psnr": psnr(a, b), "ssim": ssim(a, b), "delta_e76": float(delta_e76(dec, img).mean())}


def _train_vq(label, k, f, args, runs: Path) -> Path:
    from models.train import train

    out = runs / label
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.is_file() and (out / "metrics.json").is_file():
        return ckpt
    argv = ["--model", "vqvae", "--dataset", "photos", "--out", str(out), "--quiet",
            "--minutes", str(args.minutes), "--eval-every", "0", "--codebook-size", str(k),
            "--set", f"downsample={f}", "--threads", str(args.threads),
            "--config", "tiny" if args.quick else "base"]  # fmt: skip
    if args.quick:
        argv += ["--steps", "30"]
    elif args.vq_steps:
        argv += ["--steps", str(args.vq_steps)]  # whichever of steps/minutes comes first
    print(f"[rd] training {label} for {args.minutes:g} min", file=sys.stderr)
    train(argv)
    return ckpt


def _train_prior(label, model, args, runs: Path):
    from models import prior as P
    from models.data import load_dataset

    out = runs / f"{label}-prior"
    if args.resume and (out / "prior.pt").is_file() and (out / "metrics.json").is_file():
        return P.load_prior(out / "prior.pt")
    # Real colours only: the prior should model the codes of real photos, not recoloured ones.
    sampler = load_dataset("photos", "train", image_size=32, colour_aug=0.0)
    train_idx = P.encode_training_pool(model, sampler, args.train_crops, 128, seed=0)
    print(f"[rd] training the prior of {label} for {args.prior_minutes:g} min", file=sys.stderr)
    P.run_training(
        out, train_idx, None, model.codebook_size, tuple(train_idx.shape[1:]),
        steps=args.prior_steps, config="tiny" if args.quick else "small",
        minutes=args.prior_minutes, progress=False,
    )  # fmt: skip
    return P.load_prior(out / "prior.pt")


def _vq_rows(label, k, f, model, prior, photos: dict) -> list[dict]:
    from models.compress import decode_bytes, encode_images

    rows = []
    for name, img in photos.items():
        pixels = img.shape[-1] * img.shape[-2]
        fixed, rep = encode_images(model, [img], [name])
        t = time.perf_counter()
        coded, rep_p = encode_images(model, [img], [name], prior=prior)
        enc_s = time.perf_counter() - t
        t = time.perf_counter()
        (_, dec), = decode_bytes(model, coded, prior)  # fmt: skip
        dec_s = time.perf_counter() - t
        # The prior-coded file must restore exactly the fixed-length file's image.
        ((_, dec_fixed),) = decode_bytes(model, fixed)
        if not torch.equal(dec, dec_fixed):
            raise AssertionError(f"{label} {name}: the prior-coded file decodes differently")
        dist = _distortion(dec, img)
        common = {"photo": name, "setting": label, "codebook_size": k, "downsample": f, **dist}
        rows.append({"codec": "VQ fixed", "bpp": 8 * len(fixed) / pixels,
                     "bpp_payload": rep[0]["bpp"], **common})  # fmt: skip
        rows.append({"codec": "VQ + prior", "bpp": 8 * len(coded) / pixels,
                     "bpp_payload": rep_p[0]["bpp"], "encode_s": round(enc_s, 2),
                     "decode_s": round(dec_s, 2), **common})  # fmt: skip
    return rows


def _codec_rows(photos: dict, qualities) -> list[dict]:
    from models.figures import codec_at_quality

    rows = []
    for name, img in photos.items():
        for fmt, label in (("JPEG", "JPEG"), ("WEBP", "WebP")):
            for q in qualities:
                dec, bpp = codec_at_quality(img, fmt, q)
                rows.append({"codec": label, "photo": name, "setting": f"q={q}", "quality": q,
                             "bpp": bpp, **_distortion(dec, img)})  # fmt: skip
    return rows


def _interp(curve: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of ``[(bpp, value)]`` at ``x``; None outside the measured range."""
    pts = sorted(curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def compare_at_equal_bpp(rows: list[dict]) -> list[dict]:
    """For each VQ point: JPEG's and WebP's PSNR/SSIM/ΔE interpolated at the same bpp."""
    out = []
    for r in rows:
        if not r["codec"].startswith("VQ"):
            continue
        entry = {k: r[k] for k in ("photo", "codec", "setting", "bpp", *METRICS)}
        for other in ("JPEG", "WebP"):
            pts = [x for x in rows if x["codec"] == other and x["photo"] == r["photo"]]
            for m in METRICS:
                entry[f"{other}_{m}"] = _interp([(x["bpp"], x[m]) for x in pts], r["bpp"])
            entry[f"{other}_min_bpp"] = min(x["bpp"] for x in pts)
        out.append(entry)
    return out


def _words(cmp_rows: list[dict]) -> list[str]:
    """Plain-language verdicts generated from the numbers."""
    lines = []
    for c in cmp_rows:
        parts = []
        for other in ("JPEG", "WebP"):
            if c[f"{other}_psnr"] is None:
                if c["bpp"] < c[f"{other}_min_bpp"]:
                    parts.append(
                        f"{other} cannot go this low (its smallest file is "
                        f"{c[f'{other}_min_bpp']:.3f} bpp at quality 1)"
                    )
                else:
                    parts.append(f"{other}: outside the measured quality sweep")
                continue
            dp = c["psnr"] - c[f"{other}_psnr"]
            ds = c["ssim"] - c[f"{other}_ssim"]
            de = c["delta_e76"] - c[f"{other}_delta_e76"]
            verdict = "wins" if dp > 0 else "loses"
            parts.append(
                f"vs {other} {verdict} by {abs(dp):.1f} dB PSNR, SSIM {ds:+.3f}, ΔE {de:+.1f} "
                f"({'less' if de < 0 else 'more'} colour error)"
            )
        lines.append(
            f"{c['photo']}, {c['codec']} {c['setting']} at {c['bpp']:.3f} bpp "
            f"(PSNR {c['psnr']:.2f} dB, SSIM {c['ssim']:.3f}, ΔE {c['delta_e76']:.1f}): "
            + "; ".join(parts)
            + "."
        )
    return lines


def _summary(cmp_rows: list[dict]) -> str:
    n = len(cmp_rows)
    beat = {
        o: sum(1 for c in cmp_rows if (c[f"{o}_psnr"] or 1e9) < c["psnr"]) for o in ("JPEG", "WebP")
    }
    below = {o: sum(1 for c in cmp_rows if c["bpp"] < c[f"{o}_min_bpp"]) for o in ("JPEG", "WebP")}
    gain = [
        1 - c["bpp"] / f["bpp"]
        for c in cmp_rows
        if c["codec"] == "VQ + prior"
        for f in cmp_rows
        if f["codec"] == "VQ fixed" and f["photo"] == c["photo"] and f["setting"] == c["setting"]
    ]
    text = (
        f"Of {n} VQ points, {beat['JPEG']} have a higher PSNR than JPEG and {beat['WebP']} than "
        f"WebP at the same bpp; {below['JPEG']} lie below the smallest JPEG file and "
        f"{below['WebP']} below the smallest WebP file (quality 1). "
    )
    if gain:
        text += (
            f"Coding the indices with the prior instead of fixed-length bits saves "
            f"{100 * min(gain):.0f}–{100 * max(gain):.0f}% of the file at identical pixels."
        )
    return text


def _markdown(res: dict) -> str:
    meta, setup = res["meta"], res["setup"]
    lines = [
        "# Compression: VQ-VAE (fixed-length and prior-coded) vs JPEG and WebP",
        "",
        f"{meta['date_utc']}, commit {str(meta['commit'])[:10]}, {meta['cpu_count']} CPUs "
        f"(shared; load {setup['load_average'][0]} → {setup['load_average'][1]}), torch "
        f"{meta['torch']}. Command: `{setup['command']}`",
        "",
        f"VQ-VAE budgets: {setup['minutes']:g} min"
        + (f" or {setup['vq_step_cap']} steps" if setup.get("vq_step_cap") else "")
        + " training per setting ("
        + ", ".join(f"{k}: {v} steps" for k, v in setup["vq_steps"].items())
        + f"), prior {setup['prior_minutes']:g} min each (config {setup['prior_config']}, "
        + ", ".join(f"{k}: {v} steps" for k, v in setup["prior_steps"].items())
        + "). Whole held-out photos; bpp counts whole files (headers included).",
        "",
        "![rate-distortion](compression_rd.png)",
        "",
        "## Where the VQ codec wins or loses",
        "",
        _summary(res["equal_bpp"]),
        "",
        *[f"- {w}" for w in _words(res["equal_bpp"])],
        "",
        "## All points",
        "",
        "| photo | codec | setting | bpp | PSNR (dB) | SSIM | ΔE76 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['photo']} | {r['codec']} | {r['setting']} | {r['bpp']:.3f} | "
            f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['delta_e76']:.2f} |"
        )
    lines += [
        "",
        "VQ points are single short CPU runs (one seed); more training moves them up. JPEG/WebP "
        "values at a VQ point are linear interpolations between the two nearest measured "
        "qualities.",
    ]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    photos = list(dict.fromkeys(r["photo"] for r in rows))
    labels = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "delta_e76": "mean ΔE76 ↓"}
    fig, axes = plt.subplots(len(photos), 3, figsize=(14, 4 * len(photos)), squeeze=False)
    style = {"JPEG": ("C0", "o-"), "WebP": ("C1", "s-"), "VQ fixed": ("C2", "D"),
             "VQ + prior": ("C3", "*")}  # fmt: skip
    for i, ph in enumerate(photos):
        for j, m in enumerate(METRICS):
            ax = axes[i][j]
            for codec, (col, mk) in style.items():
                pts = sorted((r["bpp"], r[m], r["setting"]) for r in rows
                             if r["photo"] == ph and r["codec"] == codec)  # fmt: skip
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, mk, color=col, label=codec, ms=9 if "VQ" in codec else 5)
                if codec.startswith("VQ"):
                    for x, y, s in pts:
                        ax.annotate(
                            s, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                        )
            ax.set_xscale("log")
            ax.set_xlabel("bits per pixel (whole file)")
            ax.set_ylabel(labels[m])
            ax.set_title(f"{ph}: {labels[m]}")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=None, help="VQ-VAE training per setting (2.5)")
    p.add_argument(
        "--vq-steps", type=int, default=None, help="also cap VQ-VAE training at this many steps"
    )
    p.add_argument("--prior-minutes", type=float, default=None, help="prior training (1)")
    p.add_argument("--prior-steps", type=int, default=3000, help="prior step cap")
    p.add_argument("--train-crops", type=int, default=4096, help="prior training crops")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: shared machine)")
    p.add_argument("--quick", action="store_true", help="tiny models, cropped photos (smoke)")
    p.add_argument("--resume", action="store_true", help="reuse trained models in --runs-dir")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "compression_rd"))
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="compression_rd")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the .md/.png from the existing .json (no training or coding)",
    )
    args = p.parse_args(argv)
    out = Path(args.results_dir)
    if args.render_only:
        res = json.loads((out / f"{args.name}.json").read_text())
        res["equal_bpp"] = compare_at_equal_bpp(res["rows"])
        (out / f"{args.name}.md").write_text(_markdown(res))
        _plot(res["rows"], out / f"{args.name}.png")
        return 0
    if args.minutes is None:
        args.minutes = 0.1 if args.quick else 2.5
    if args.prior_minutes is None:
        args.prior_minutes = 0.05 if args.quick else 1.0
    if args.quick:
        args.prior_steps, args.train_crops = min(args.prior_steps, 20), min(args.train_crops, 256)
    torch.set_num_threads(args.threads)

    import models
    from models.data import eval_photos

    t0 = time.perf_counter()
    load0 = round(os.getloadavg()[0], 2)
    photos = eval_photos("photos")
    if args.quick:  # a corner of each photo keeps the smoke test fast
        photos = {k: v[:, :96, :128].contiguous() for k, v in photos.items()}
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    settings = VQ_SETTINGS[:2] if args.quick else VQ_SETTINGS
    rows, vq_steps, prior_steps = [], {}, {}
    for label, k, f in settings:
        ckpt = _train_vq(label, k, f, args, runs)
        vq_steps[label] = json.loads((ckpt.parent / "metrics.json").read_text())["steps"]
        model = models.load(str(ckpt)).eval()
        prior = _train_prior(label, model, args, runs)
        prior_steps[label] = json.loads((runs / f"{label}-prior" / "metrics.json").read_text())[
            "steps"
        ]
        rows += _vq_rows(label, k, f, model, prior, photos)
    rows += _codec_rows(photos, QUALITIES)
    cmp_rows = compare_at_equal_bpp(rows)
    setup = {
        "minutes": args.minutes,
        "prior_minutes": args.prior_minutes,
        "prior_config": "tiny" if args.quick else "small",
        "vq_steps": vq_steps,
        "vq_step_cap": args.vq_steps,
        "prior_steps": prior_steps,
        "settings": [list(s) for s in settings],
        "qualities": list(QUALITIES),
        "photos": {k: list(v.shape) for k, v in photos.items()},
        "load_average": [load0, round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python -m benchmarks.compression_rd " + " ".join(argv or sys.argv[1:]),
    }
    meta = harness.metadata("cpu")
    harness.write_results(args.name, rows, meta, out, setup=setup, equal_bpp=cmp_rows)
    res = {"meta": meta, "setup": setup, "rows": rows, "equal_bpp": cmp_rows}
    (out / f"{args.name}.md").write_text(_markdown(res))
    _plot(rows, out / f"{args.name}.png")
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
