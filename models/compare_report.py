"""The words of ``models.compare``: the observed differences between the two models in plain
sentences generated from the measured numbers (:func:`describe_differences`), and ``report.md``
(:func:`render_report`).
"""

from __future__ import annotations

import math

__all__ = ["describe_differences", "render_report", "QUALITY_KEYS"]

# ------------------------------------------------------------------------------ plain words

# key -> (label, unit, better, how to state the difference, decimals)
#   better: "higher" | "lower" | None (no preferred direction)
#   mode:   "abs" (difference in the unit), "rel" (percent of the VQ-VAE value), "pp"
#           (percentage points, for fractions)
_SPEC: dict[str, tuple[str, str, str | None, str, int]] = {
    "psnr": ("held-out PSNR", " dB", "higher", "abs", 2),
    "ssim": ("held-out SSIM", "", "higher", "abs", 4),
    "perceptual": ("perceptual distance", "", "lower", "rel", 4),
    "grad_error": ("gradient-magnitude error", "", "lower", "rel", 4),
    "codebook_usage": ("held-out codebook usage", "", "higher", "pp", 3),
    "perplexity": ("held-out code perplexity", "", "higher", "rel", 1),
    "train_perplexity": ("training-crop code perplexity", "", "higher", "rel", 1),
    "prior_bits_per_index": ("prior NLL on held-out codes", " bits/index", "lower", "abs", 3),
    "prior_bits_per_image": ("held-out bits per image under the prior", " bits", "lower", "rel", 0),
    "steps_per_second": ("training speed", " steps/s", "higher", "rel", 2),
}
# Below these differences two numbers are called "about the same" (measurement noise of a
# single short CPU run is larger than this; the raw numbers are always printed too).
_SAME = {
    "abs": {"psnr": 0.05, "ssim": 0.002, "grad_ratio": 0.005, "prior_bits_per_index": 0.01},
    "rel": 0.01,
    "pp": 0.005,
}
# Quality of the reconstructions, the axis on which the two models are usually contrasted.
QUALITY_KEYS = ("psnr", "ssim", "perceptual", "grad_error")


def _fmt(v: float, decimals: int, unit: str) -> str:
    return f"{v:,.{decimals}f}{unit}"


def _sentence(key: str, a: float, b: float, name_a: str, name_b: str) -> tuple[str, str | None]:
    """One sentence comparing ``b`` (model B) with ``a`` (model A) for metric ``key``; also
    returns which model is better on it (None for a tie or no preferred direction)."""
    label, unit, better, mode, dec = _SPEC[key]
    both = f"{_fmt(b, dec, unit)} vs {_fmt(a, dec, unit)}"
    if mode == "pp":
        both = f"{100 * b:.1f}% vs {100 * a:.1f}%"
    diff = b - a
    if mode == "abs":
        same = abs(diff) < _SAME["abs"].get(key, 10.0**-dec)
        amount = _fmt(abs(diff), dec, unit)
    elif mode == "pp":
        same = abs(diff) < _SAME["pp"]
        amount = f"{100 * abs(diff):.1f} percentage points"
    else:
        rel = diff / abs(a) if a else (math.inf if diff else 0.0)
        same = abs(rel) < _SAME["rel"]
        amount = f"{100 * abs(rel):.0f}%" if math.isfinite(rel) else "infinitely"
    if key == "steps_per_second" and a > 0 and b > 0 and not same:
        # Speeds read better as a factor: "2.3x slower".
        f = max(a, b) / min(a, b)
        amount = f"{f:.1f}x"
        word = "faster" if diff > 0 else "slower"
        return f"{name_b} trains {amount} {word} than {name_a} ({both}).", (
            name_b if diff > 0 else name_a
        )
    if same:
        return f"{name_b}'s {label} is about the same as {name_a}'s ({both}).", None
    direction = "higher" if diff > 0 else "lower"
    text = f"{name_b}'s {label} is {amount} {direction} than {name_a}'s ({both})"
    winner = None
    if better is not None:
        winner = name_b if (diff > 0) == (better == "higher") else name_a
        text += f"; {better} is better"
    return text + ".", winner


def _ratio_sentence(ra: float, rb: float, name_a: str, name_b: str) -> str:
    """Gradient-energy ratios: which reconstruction is closer to the originals' edge contrast."""
    da, db = abs(ra - 1.0), abs(rb - 1.0)
    closer = None if abs(da - db) < _SAME["abs"]["grad_ratio"] else (name_a if da < db else name_b)

    def rel(r: float) -> str:
        return "blurrier than" if r < 1 else ("more contrasted than" if r > 1 else "as sharp as")

    blur = {name_a: rel(ra), name_b: rel(rb)}
    return (
        f"{name_a}'s reconstructions carry {100 * ra:.0f}% of the originals' gradient energy "
        f"({blur[name_a]} the originals), {name_b}'s {100 * rb:.0f}% ({blur[name_b]} the "
        "originals); " + (f"{closer} is closer to 100%." if closer else "both are equally close.")
    )


def describe_differences(a: dict, b: dict, name_a: str = "VQ-VAE", name_b: str = "VQGAN") -> dict:
    """Plain-word statements of how metrics ``b`` differ from ``a`` (dicts keyed as ``_SPEC``).

    Returns ``{"sentences": [str], "winners": {key: name | None}, "summary": str}``; keys missing
    from either dict are skipped. Every word is derived from the two numbers.
    """
    sentences, winners = [], {}
    for key in _SPEC:
        if key in a and key in b and a[key] is not None and b[key] is not None:
            s, w = _sentence(key, float(a[key]), float(b[key]), name_a, name_b)
            sentences.append(s)
            winners[key] = w
        if key == "grad_error" and "grad_ratio" in a and "grad_ratio" in b:
            sentences.append(_ratio_sentence(float(a["grad_ratio"]), float(b["grad_ratio"]),
                                             name_a, name_b))  # fmt: skip
    q = [k for k in QUALITY_KEYS if k in winners]
    wins_a = [k for k in q if winners[k] == name_a]
    wins_b = [k for k in q if winners[k] == name_b]
    ties = [k for k in q if winners[k] is None]

    def names(keys):
        return ", ".join(_SPEC[k][0] for k in keys) or "none"

    summary = (
        f"On the {len(q)} reconstruction-quality measures, {name_a} is better on {len(wins_a)} "
        f"({names(wins_a)}), {name_b} on {len(wins_b)} ({names(wins_b)})"
        + (f", and they are about the same on {len(ties)} ({names(ties)})." if ties else ".")
    )
    return {"sentences": sentences, "winners": winners, "summary": summary}


# ----------------------------------------------------------------------------------- report

_ROWS = [
    # key, label, format, note
    ("psnr", "PSNR (dB) ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("perceptual", "perceptual distance ↓", "{:.4f}"),
    ("grad_error", "gradient-magnitude error ↓", "{:.4f}"),
    ("grad_ratio", "gradient-energy ratio (1 = original)", "{:.3f}"),
    ("codebook_usage", "codebook usage, held-out ↑", "{:.1%}"),
    ("perplexity", "code perplexity, held-out", "{:.1f}"),
    ("train_perplexity", "code perplexity, training crops", "{:.1f}"),
    ("bits_per_image", "bits per image, ⌈log2 K⌉·h·w", "{:,.0f}"),
    ("prior_bits_per_index", "prior NLL, held-out (bits/index) ↓", "{:.3f}"),
    ("prior_unigram_bits_per_index", "unigram baseline (bits/index)", "{:.3f}"),
    ("prior_bits_per_image", "bits per image under the prior ↓", "{:,.0f}"),
    ("steps", "training steps", "{:,}"),
    ("steps_per_second", "training steps/s ↑", "{:.2f}"),
    ("parameters", "autoencoder parameters", "{:,}"),
]


def _gan_note(g: dict) -> str:
    """What the VQGAN run actually optimized, from its config and step count."""
    losses = f"VQGAN's training perceptual loss: `{g.get('train_perceptual')}`."
    start, steps = g.get("disc_start"), g.get("steps")
    if start is None or steps is None:
        return losses
    if steps <= start:
        return (
            f"{losses} Its discriminator starts at step {start:,} and the run reached {steps:,} "
            "steps, so the adversarial loss never switched on: this VQGAN was trained with its "
            "reconstruction, perceptual and VQ losses only."
        )
    return (
        f"{losses} Its discriminator starts at step {start:,}; the run reached {steps:,} steps, "
        f"so the adversarial loss was on for the last {steps - start:,} "
        f"({100 * (steps - start) / steps:.0f}%) of them."
    )


def _cell(fmt: str, v) -> str:
    if v is None:
        return "–"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def render_report(report: dict) -> str:
    s, env, res, words = report["setup"], report["env"], report["models"], report["differences"]
    a, b = res["vqvae"], res["vqgan"]
    h, w = s["latent_grid"]
    budget = (
        f"{s['minutes_per_model']:g} minutes of wall-clock training each"
        if s["minutes_per_model"] is not None
        else "given checkpoints"
    )
    lines = [
        "# VQ-VAE vs VQGAN",
        "",
        f"Generated by `{s['command']}` on {env['date_utc']} UTC (commit {env['commit']}, "
        f"torch {env['torch']}, {env['cpu_count']} CPU cores, torch threads: {env['threads']}). "
        "Every number below is measured in that run; the sentences are generated from the "
        f"numbers. 1-minute load average at the start / end of this command: "
        f"{env['load_average'][0]} / {env['load_average'][1]} (other jobs share these cores, so "
        "steps/s are indicative).",
        "",
        f"**Setup.** Dataset `{s['dataset']}`, {s['image_size']}×{s['image_size']} crops; both "
        f"models have K = {s['codebook_size']} codes and latent grids of {h}×{w}; {budget} "
        f"(`{s['config']}` configs, backend `{s['backend']}` → "
        f"`{a.get('train_backend')}` / `{b.get('train_backend')}`, seed {s['seed']}). "
        "Each model then "
        f"gets a `{s['prior_config']}` code-index prior trained for {s['prior_minutes']:g} "
        "minutes. Held-out tiles (never trained on): "
        + ", ".join(f"{k} ({n})" for k, n in s["eval_tiles"].items())
        + f". Perceptual distance in the table: `{s['perceptual']}` (not a training loss of "
        "either model unless named below). " + _gan_note(b),
        "",
        "| measure (held-out unless noted) | VQ-VAE | VQGAN |",
        "|---|---:|---:|",
    ]
    for key, label, fmt in _ROWS:
        if key in a or key in b:
            lines.append(f"| {label} | {_cell(fmt, a.get(key))} | {_cell(fmt, b.get(key))} |")
    if a.get("train_load_average") and b.get("train_load_average"):
        la, lb = a["train_load_average"], b["train_load_average"]
        lines.append(
            f"| load average while training (start → end) | {la[0]} → {la[1]} | {lb[0]} → {lb[1]} |"
        )
    for name in a.get("psnr_per_image", {}):
        lines.append(
            f"| PSNR on `{name}` tiles (dB) | {a['psnr_per_image'][name]:.2f} | "
            f"{b['psnr_per_image'].get(name, float('nan')):.2f} |"
        )
    lines += [
        "",
        "## Observed differences",
        "",
        *[f"- {t}" for t in words["sentences"]],
        "",
        words["summary"],
        "",
        "These are single runs (one seed, a few CPU minutes each); differences of the size of "
        "run-to-run noise should not be read as properties of the architectures.",
        "",
        "## Reconstructions",
        "",
        "Digits: rows of held-out originals, VQ-VAE, VQGAN (same tiles). Photos: each held-out "
        "photo whole: original | VQ-VAE | VQGAN | JPEG at the VQ-VAE's bits per pixel, with a "
        "zoomed crop row.",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "## Samples from each model's prior",
        "",
        f"Temperature {s['temperature']:g}, top-k {s['top_k'] if s['top_k'] else 'off'}.",
        "",
        "| VQ-VAE | VQGAN |",
        "|---|---|",
        "| ![VQ-VAE samples](samples_vqvae.png) | ![VQGAN samples](samples_vqgan.png) |",
        "",
        "## Definitions",
        "",
        "- PSNR = mean over tiles of 10·log10(1/MSE); SSIM with an 11×11 Gaussian window.",
        "- Perceptual distance: `models.perceptual` (`stlpips` = shift-tolerant LPIPS-VGG, "
        "`lpips` = LPIPS-VGG, `ssim` = 1 − SSIM + gradient L1); lower is closer.",
        "- Gradient magnitude ‖∇y‖ of the luma by forward differences; error = mean "
        "|‖∇recon‖ − ‖∇orig‖|; ratio = mean ‖∇recon‖ / mean ‖∇orig‖ (below 1: blurrier than "
        "the original, above 1: more edge contrast than the original, e.g. hallucinated texture).",
        "- Codebook usage = fraction of the K codes used at least once; perplexity = exp(entropy) "
        "of the code histogram (the effective number of codes).",
        "- Bits per image: ⌈log2 K⌉ bits per index × h·w; under the prior: its held-out "
        "negative log-likelihood × h·w (what an entropy coder driven by the prior would need). "
        "The two priors model different code vocabularies: a lower NLL means more predictable "
        "code grids, which is not by itself better reconstructions (codes that carry less "
        "detail are also easier to predict).",
        "- Training steps/s from each run's own metrics (steps / seconds, same machine, same "
        "budget).",
        *(
            [
                "- The ST-LPIPS weight file ships in the `stlpips-pytorch` wheel: `pip install "
                "--no-deps --target DIR stlpips-pytorch==0.0.2`, then pass "
                "`--perceptual-weights DIR/stlpips_pytorch/weights/vST0.0/"
                "vgg_shift_tolerant.pth` (read with weights_only=True; nothing is downloaded "
                "at run time)."
            ]
            if s["perceptual"] == "stlpips"
            else []
        ),
        "",
    ]
    return "\n".join(lines)
