"""Pictures worth showing: whole held-out photos, VQ reconstruction beside JPEG at equal bpp.

``save_panels(rows, path)`` lays out one row per photo: each panel is an image at its native size
with caption lines under it (Pillow's default font), followed by a row of zoomed crops of the same
region in every panel (nearest-neighbour, so pixels stay visible). ``jpeg_at_bpp`` /
``codec_at_quality`` give the Pillow JPEG/WebP baselines.

``reconstruction_figure(model, photos, path)`` is the figure ``models.train`` writes as
``reconstructions.png``: original | VQ reconstruction | JPEG at the same bits per pixel.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from .holdout import whole_image_metrics
from .metrics import psnr

__all__ = [
    "codec_at_quality",
    "jpeg_at_bpp",
    "save_panels",
    "reconstruction_figure",
    "comparison_figure",
    "zoom_box",
]

GAP = 12  # pixels between panels
BG = (255, 255, 255)


def _to_pil(img: torch.Tensor):
    from PIL import Image

    arr = (img.detach().float().clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).convert("RGB")


def _from_pil(im, channels: int) -> torch.Tensor:
    arr = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).float().div_(255.0)
    return t.permute(2, 0, 1) if t.dim() == 3 else t.unsqueeze(0)


def codec_at_quality(img: torch.Tensor, fmt: str, quality: int) -> tuple[torch.Tensor, float]:
    """Encode ``img: [C, H, W]`` in [0, 1] with Pillow (``fmt`` = "JPEG" or "WEBP") at
    ``quality``; returns ``(decoded [C, H, W], bits per pixel of the whole file)``. The image is
    rounded to 8 bits first (as any PNG of it would be)."""
    from PIL import Image

    buf = io.BytesIO()
    kw = {"optimize": True} if fmt == "JPEG" else {"method": 6}
    _to_pil(img).save(buf, format=fmt, quality=int(quality), **kw)
    nbytes = buf.tell()
    buf.seek(0)
    with Image.open(buf) as im:
        dec = _from_pil(im, img.shape[0])
    return dec, 8.0 * nbytes / (img.shape[-1] * img.shape[-2])


def jpeg_at_bpp(
    img: torch.Tensor, bpp: float, fmt: str = "JPEG"
) -> tuple[torch.Tensor, float, int]:
    """The highest quality (1..95) whose file fits in ``bpp`` bits per pixel; quality 1 when even
    that is larger (its real, higher bpp is returned, so the caption stays honest).
    Returns ``(decoded [C, H, W], bpp, quality)``."""
    lo, hi, best = 1, 95, None
    while lo <= hi:  # file size grows with quality (monotone for libjpeg/libwebp in practice)
        q = (lo + hi) // 2
        dec, b = codec_at_quality(img, fmt, q)
        if b <= bpp:
            best, lo = (dec, b, q), q + 1
        else:
            hi = q - 1
    if best is None:
        dec, b = codec_at_quality(img, fmt, 1)
        best = (dec, b, 1)
    return best


def _font(size: int = 15):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable default font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def zoom_box(reference: torch.Tensor, recon: torch.Tensor, size: int = 96) -> tuple[int, int, int]:
    """A ``size x size`` crop ``(top, left, size)`` where the reconstruction's error is largest
    (8x8-average-pooled squared error; the crop is centred on the worst block), clipped to the
    image. Shows where the codec struggles rather than a random patch."""
    h, w = reference.shape[-2:]
    size = min(size, h, w)
    err = (reference.float() - recon.float()).pow(2).mean(0, keepdim=True).unsqueeze(0)
    pooled = torch.nn.functional.avg_pool2d(err, size, stride=max(1, size // 4))[0, 0]
    i = int(pooled.reshape(-1).argmax())
    r, c = divmod(i, pooled.shape[1])
    stride = max(1, size // 4)
    return min(r * stride, h - size), min(c * stride, w - size), size


def save_panels(
    rows: list[list[tuple[torch.Tensor, list[str]]]],
    path: str,
    zoom: list[tuple[int, int, int] | None] | None = None,
    zoom_scale: int = 3,
    title: str | None = None,
) -> None:
    """Write a PNG: for each row a line of panels ``(image [C, H, W] in [0, 1], caption lines)``,
    then (when ``zoom[row]`` is a ``(top, left, size)`` box) the same crop of every panel enlarged
    ``zoom_scale`` times. The box is outlined in the first panel."""
    from PIL import Image, ImageDraw

    font = _font()
    line_h = 19
    blocks = []  # (PIL image, captions, x offset) per panel, per row
    for r, row in enumerate(rows):
        box = zoom[r] if zoom else None
        panels = [(_to_pil(img), cap) for img, cap in row]
        blocks.append((panels, box))
    width = GAP + max(
        sum(max(p.width, _crop_w(box, zoom_scale)) + GAP for p, _ in panels)
        for panels, box in blocks
    )
    heights = []
    for panels, box in blocks:
        caps = max(len(c) for _, c in panels)
        h = max(p.height for p, _ in panels) + caps * line_h + GAP
        if box is not None:
            h += box[2] * zoom_scale + line_h + GAP
        heights.append(h)
    top_pad = (line_h + GAP) if title else GAP
    canvas = Image.new("RGB", (width, top_pad + sum(heights)), BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, GAP // 2), title, fill=(0, 0, 0), font=font)
    y = top_pad
    for (panels, box), h in zip(blocks, heights):
        x = GAP
        tallest = max(p.height for p, _ in panels)
        caps = max(len(c) for _, c in panels)
        for j, (im, cap) in enumerate(panels):
            colw = max(im.width, _crop_w(box, zoom_scale))
            canvas.paste(im, (x, y))
            if box is not None and j == 0:
                t, lft, s = box
                draw.rectangle(
                    [x + lft - 1, y + t - 1, x + lft + s, y + t + s], outline=(255, 0, 0), width=2
                )
            for k, line in enumerate(cap):
                draw.text((x, y + tallest + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
            if box is not None:
                t, lft, s = box
                crop = im.crop((lft, t, lft + s, t + s)).resize(
                    (s * zoom_scale, s * zoom_scale), Image.NEAREST
                )
                zy = y + tallest + caps * line_h + GAP
                draw.text((x, zy), f"zoom x{zoom_scale}", fill=(0, 0, 0), font=font)
                canvas.paste(crop, (x, zy + line_h))
            x += colw + GAP
        y += h
    tmp = path + ".tmp.png"
    canvas.save(tmp, optimize=True)
    os.replace(tmp, path)


def _de_caption(d: dict) -> str:
    return f", dE76 {d['delta_e76']:.1f}" if "delta_e76" in d else ""


def _crop_w(box, scale: int) -> int:
    return 0 if box is None else box[2] * scale


@torch.no_grad()
def reconstruction_figure(model, photos: dict[str, torch.Tensor], path: str, whole=None) -> dict:
    """``reconstructions.png``: per held-out photo, original | VQ | JPEG at the VQ file's bpp
    (fixed-length codes, ``⌈log2 K⌉`` bits per index), with bpp / PSNR / ΔE under each, plus a
    zoomed crop row. ``whole`` = the ``(metrics, reconstructions)`` of
    :func:`models.holdout.whole_image_metrics` (computed when None). Returns the JPEG baseline's
    numbers per photo ``{name: {"bpp", "psnr", "quality", "delta_e76"}}``."""
    from .colour import colour_report

    metrics, recs = whole if whole is not None else whole_image_metrics(model, photos)
    rows, boxes, jpeg = [], [], {}
    for name, img in photos.items():
        m = metrics[name]
        rec = recs[name][0]
        jdec, jbpp, q = jpeg_at_bpp(img, m["bpp_fixed"])
        jp = psnr(jdec.unsqueeze(0), img.unsqueeze(0))
        jc = colour_report(jdec, img)
        jpeg[name] = {"bpp": jbpp, "psnr": jp, "quality": q, "delta_e76": jc.get("delta_e76")}
        rows.append(
            [
                (img, [f"{name} original", f"{img.shape[-1]}x{img.shape[-2]}"]),
                (
                    rec,
                    [
                        f"VQ-VAE (K={model.codebook_size}, /{model.downsample})",
                        f"{m['bpp_fixed']:.3f} bpp, PSNR {m['psnr']:.2f} dB{_de_caption(m)}",
                    ],
                ),
                (
                    jdec,
                    [
                        f"JPEG q={q} (same bpp)",
                        f"{jbpp:.3f} bpp, PSNR {jp:.2f} dB{_de_caption(jc)}",
                    ],
                ),
            ]
        )
        boxes.append(zoom_box(img, rec, size=min(96, max(8, min(img.shape[-2:]) // 2))))
    if rows:
        save_panels(
            rows,
            path,
            zoom=boxes,
            title="held-out photos, whole: original | VQ | JPEG at equal bpp",
        )
    return jpeg


@torch.no_grad()
def comparison_figure(
    models: dict[str, torch.nn.Module], photos: dict[str, torch.Tensor], path: str
) -> dict:
    """The comparison report's figure: per held-out photo, original | one panel per model (e.g.
    ``{"VQ-VAE": m1, "VQGAN": m2}``) | JPEG at the first model's fixed-length bpp, with bpp /
    PSNR / ΔE under each and a zoomed crop row (where the first model errs most).

    Returns ``{label: whole-image metrics}`` for every model and ``"JPEG"``."""
    from .colour import colour_report

    whole = {label: whole_image_metrics(m, photos) for label, m in models.items()}
    first = next(iter(models))
    rows, boxes, out = [], [], {label: w[0] for label, w in whole.items()}
    out["JPEG"] = {}
    for name, img in photos.items():
        row = [(img, [f"{name} original", f"{img.shape[-1]}x{img.shape[-2]}"])]
        for label, (met, recs) in whole.items():
            m = met[name]
            row.append(
                (
                    recs[name][0],
                    [label, f"{m['bpp_fixed']:.3f} bpp, PSNR {m['psnr']:.2f} dB{_de_caption(m)}"],
                )
            )
        jdec, jbpp, q = jpeg_at_bpp(img, whole[first][0][name]["bpp_fixed"])
        jm = {"bpp": jbpp, "psnr": psnr(jdec.unsqueeze(0), img.unsqueeze(0)), "quality": q}
        jm.update(colour_report(jdec, img))
        out["JPEG"][name] = jm
        row.append(
            (
                jdec,
                [
                    f"JPEG q={q} (same bpp)",
                    f"{jbpp:.3f} bpp, PSNR {jm['psnr']:.2f} dB{_de_caption(jm)}",
                ],
            )
        )
        rows.append(row)
        rec0 = whole[first][1][name][0]
        boxes.append(zoom_box(img, rec0, size=min(96, max(8, min(img.shape[-2:]) // 2))))
    if rows:
        title = "held-out photos, whole: original | " + " | ".join(models) + " | JPEG at equal bpp"
        save_panels(rows, path, zoom=boxes, zoom_scale=2, title=title)
    return out
