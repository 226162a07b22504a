"""What ``models.compare`` measures on held-out reconstructions: PSNR, SSIM, perceptual
distance, sharpness (gradient-magnitude error and energy ratio of the luma), codebook usage,
perplexity and bits per image (:func:`evaluate_reconstructions`).
"""

from __future__ import annotations

import torch

__all__ = ["gradient_magnitude", "sharpness", "evaluate_reconstructions"]


def _luma(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> [B, H, W] luma (ITU-R BT.601 weights for RGB, identity for grey)."""
    if images.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=images.device)
        return torch.einsum("bchw,c->bhw", images.float(), w)
    return images.float().mean(1)


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """``images: [B, C, H, W]`` float in [0, 1] -> ``[B, H-1, W-1]`` float32 ``‖∇ luma‖``.

    Forward differences taken at the same pixel for both directions (no smoothing filter: blur is
    exactly what we want to detect, so we must not add any).
    """
    y = _luma(images)
    gx = y[:, :-1, 1:] - y[:, :-1, :-1]
    gy = y[:, 1:, :-1] - y[:, :-1, :-1]
    return torch.sqrt(gx * gx + gy * gy)


def sharpness(recon: torch.Tensor, original: torch.Tensor) -> dict:
    """Gradient-magnitude error and energy ratio of ``recon`` against ``original`` (both
    ``[B, C, H, W]`` in [0, 1]): ``{"grad_error": float, "grad_ratio": float}``."""
    gr, go = gradient_magnitude(recon), gradient_magnitude(original)
    return {
        "grad_error": float((gr - go).abs().mean()),
        "grad_ratio": float(gr.mean() / go.mean().clamp_min(1e-12)),
    }


@torch.no_grad()
def evaluate_reconstructions(
    model, images: torch.Tensor, perceptual: torch.nn.Module | None = None, batch_size: int = 64
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Encode + decode held-out ``images: [N, C, H, W]`` in [0, 1] with a VQ model.

    Returns ``(metrics, recon [N, C, H, W] float32 in [0, 1], indices [N, h, w] int64)``; metrics
    hold psnr, ssim, perceptual (batch-size-weighted mean), grad_error, grad_ratio,
    codebook_usage, perplexity, bits_per_image.
    """
    from .metrics import bits_per_image, codebook_usage, perplexity, psnr, ssim

    recon, idx = [], []
    for i in range(0, images.shape[0], batch_size):
        ind = model.encode(images[i : i + batch_size])
        recon.append(model.decode_indices(ind).float().clamp(0, 1))
        idx.append(ind)
    recon_t, idx_t = torch.cat(recon), torch.cat(idx)
    k = model.codebook_size
    m = {
        "psnr": psnr(recon_t, images),
        "ssim": ssim(recon_t, images),
        **sharpness(recon_t, images),
        "codebook_usage": codebook_usage(idx_t, k),
        "perplexity": perplexity(idx_t, k),
        "bits_per_image": bits_per_image(idx_t, k),
    }
    if perceptual is not None:
        total = 0.0
        for i in range(0, images.shape[0], batch_size):
            a, b = recon_t[i : i + batch_size], images[i : i + batch_size]
            total += float(perceptual(a, b)) * a.shape[0]
        m["perceptual"] = total / images.shape[0]
    return m, recon_t, idx_t
