"""Held-out photos evaluated WHOLE: reconstruction, PSNR/SSIM, colour fidelity, bits per pixel.

The tiled evaluation in ``models.train_eval.evaluate`` (32x32 tiles) is what the training loop tracks;
a user looks at whole photos. The models are fully convolutional, so a photo is replicate-padded
to a multiple of the downsampling factor, encoded, decoded and cropped back to its size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .colour import colour_report
from .metrics import psnr, ssim

__all__ = ["pad_to_multiple", "reconstruct_whole", "whole_image_metrics"]


def pad_to_multiple(img: torch.Tensor, f: int) -> torch.Tensor:
    """Replicate-pad ``[C, H, W]`` on the bottom/right so H and W are multiples of ``f`` (the
    edges repeat, so the encoder sees no artificial border)."""
    h, w = img.shape[-2:]
    ph, pw = (-h) % f, (-w) % f
    if ph == 0 and pw == 0:
        return img
    return F.pad(img.unsqueeze(0), (0, pw, 0, ph), mode="replicate").squeeze(0)


@torch.no_grad()
def reconstruct_whole(model, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``img: [C, H, W]`` in [0, 1] -> ``(reconstruction [C, H, W] clamped to [0, 1],
    indices [h, w] int64)`` with the model in eval mode."""
    if img.dim() != 3:
        raise ValueError(f"img must be [C, H, W], got {tuple(img.shape)}")
    was = model.training
    model.eval()
    try:
        h, w = img.shape[-2:]
        idx = model.encode(pad_to_multiple(img, model.downsample).unsqueeze(0))[0]
        rec = model.decode_indices(idx.unsqueeze(0))[0, :, :h, :w].clamp(0, 1)
    finally:
        model.train(was)
    return rec, idx


@torch.no_grad()
def whole_image_metrics(model, photos: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Metrics of every held-out photo ``{name: [C, H, W]}`` evaluated whole.

    Returns ``(metrics, reconstructions)``: ``metrics[name]`` holds psnr, ssim, bpp_fixed
    (``⌈log2 K⌉`` bits per code over the photo's pixels), delta_e76, delta_e2000, delta_e76_p95 and
    bias_rgb (mean reconstruction − original per channel, in 1/255) plus ``"mean"`` over photos of
    the scalar ones; ``reconstructions[name] = (rec [C, H, W], indices [h, w])``."""
    bits = max(1, math.ceil(math.log2(model.codebook_size)))
    out, recs = {}, {}
    for name, img in photos.items():
        rec, idx = reconstruct_whole(model, img)
        h, w = img.shape[-2:]
        m = {
            "psnr": psnr(rec.unsqueeze(0), img.unsqueeze(0)),
            "ssim": ssim(rec.unsqueeze(0), img.unsqueeze(0)),
            "bpp_fixed": bits * idx.numel() / (h * w),
            "width": int(w),
            "height": int(h),
        }
        m.update(colour_report(rec, img))
        out[name] = m
        recs[name] = (rec, idx)
    if out:
        keys = [k for k, v in next(iter(out.values())).items() if isinstance(v, float)]
        out["mean"] = {k: sum(v[k] for v in out.values()) / len(out) for k in keys}
    return out, recs
