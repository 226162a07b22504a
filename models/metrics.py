"""Image and codebook metrics for the reference models.

Images are float tensors ``[B, C, H, W]`` in [0, 1]; indices are int64 tensors of any shape with
values in ``[0, K)``.  All results are Python floats (averages over the batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "perplexity", "codebook_usage", "bits_per_image", "code_histogram"]


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("a and b must be torch.Tensors")
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"a and b must both be [B, C, H, W] with equal shapes, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of ``10·log10(1 / MSE_i)`` (peak 1.0).

    Args:
        a, b: ``[B, C, H, W]`` float in [0, 1] (clamped to [0, 1] before comparing).
    Returns:
        PSNR in dB; per-image MSE is floored at 1e-10 (100 dB) so identical images stay finite.
    """
    _check_pair(a, b)
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).pow(2).flatten(1).mean(1)
    return float((-10.0 * torch.log10(mse.clamp_min(1e-10))).mean())


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    w = torch.outer(g, g)
    return w.expand(channels, 1, size, size).contiguous()


def ssim_map(
    a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-pixel SSIM ``[B, C, H', W']`` (valid Gaussian filtering, Wang et al. 2004 constants for a
    dynamic range of 1).  The window shrinks to the largest odd size that fits small images (e.g.
    7 for 8x8 digits) and sigma scales with it.  Differentiable (used by the perceptual loss)."""
    c = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    if size % 2 == 0:
        size -= 1
    sig = sigma * size / window
    w = _gaussian_window(size, sig, c, a.device).to(a.dtype)
    c1, c2 = 0.01**2, 0.03**2
    mu_a = F.conv2d(a, w, groups=c)
    mu_b = F.conv2d(b, w, groups=c)
    # Second moments as E[xy] - E[x]E[y]; fine in fp32 for [0, 1] data.
    s_aa = F.conv2d(a * a, w, groups=c) - mu_a**2
    s_bb = F.conv2d(b * b, w, groups=c) - mu_b**2
    s_ab = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2)
    return num / den


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over images, channels and pixels (``[B, C, H, W]`` float in [0, 1])."""
    _check_pair(a, b)
    with torch.no_grad():
        return float(ssim_map(a.float().clamp(0, 1), b.float().clamp(0, 1)).mean())


def code_histogram(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``[K] float64`` counts of each code in ``indices`` (int64, any shape, values in [0, K))."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError("indices must be an int64 tensor")
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_codes):
        raise ValueError(f"indices must lie in [0, {num_codes})")
    return torch.bincount(flat, minlength=num_codes).double()


def perplexity(indices: torch.Tensor, num_codes: int) -> float:
    """``exp(H(p))`` of the code histogram: the effective number of codes used (1..K)."""
    h = code_histogram(indices, num_codes)
    total = h.sum()
    if total == 0:
        return 0.0
    p = h[h > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def codebook_usage(indices: torch.Tensor, num_codes: int) -> float:
    """Fraction of the K codes that occur at least once in ``indices`` (in [0, 1])."""
    return float((code_histogram(indices, num_codes) > 0).double().mean())


def bits_per_image(indices: torch.Tensor, num_codes: int) -> int:
    """Bits to store one image's codes at a fixed ``⌈log2 K⌉`` bits each: ``⌈log2 K⌉·h·w``.

    Args:
        indices: ``[B, h, w]`` (or ``[h, w]``) int64.
    """
    if indices.dim() < 2:
        raise ValueError(f"indices must be [B, h, w] or [h, w], got shape {tuple(indices.shape)}")
    bits = max(1, math.ceil(math.log2(num_codes))) if num_codes > 1 else 1
    return bits * int(indices.shape[-1]) * int(indices.shape[-2])
