"""Colour fidelity metrics: CIE L*a*b*, CIE76 / CIEDE2000 colour differences, per-channel bias.

PSNR hides colour shifts in dark images (an error of 14/255 in one channel costs little when every
value is small), while a viewer sees another colour. These metrics measure what the viewer sees:

``delta_e76(a, b)``     per-pixel Euclidean distance in CIE L*a*b* (D65 white): ΔE ≈ 2.3 is a
                        just-noticeable difference, ΔE > 10 reads as a different colour.
``delta_e2000(a, b)``   per-pixel CIEDE2000 (Sharma, Wu & Dalal 2005), perceptually more uniform.
``channel_bias(a, b)``  mean of ``a − b`` per channel, in units of 1/255: (+11, −14, +3) means the
                        reconstruction is redder, much less green and slightly bluer on average.
``colour_report(rec, orig)`` all of them for one image, as plain floats (for metrics.json).

Images are ``[3, H, W]`` or ``[B, 3, H, W]`` float tensors with sRGB values in [0, 1]; grey
(1-channel) images have no colour, so their report holds only the bias.

Numerics: every conversion runs in float64 (the cube roots and the CIEDE2000 angle terms lose
digits in float32 near neutral colours), values are clamped to [0, 1] first, exactly as they would
be when the image is written to a PNG.
"""

from __future__ import annotations

import torch

__all__ = [
    "srgb_to_linear",
    "rgb_to_xyz",
    "rgb_to_lab",
    "delta_e76",
    "delta_e2000",
    "delta_e2000_lab",
    "channel_bias",
    "colour_report",
    "lab_loss",
]

# sRGB (IEC 61966-2-1) primaries -> CIE XYZ, D65 white.
_RGB_TO_XYZ = torch.tensor(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    dtype=torch.float64,
)
# D65 reference white (the XYZ of RGB = (1, 1, 1) under the matrix above).
_WHITE_D65 = torch.tensor([0.95047, 1.00000, 1.08883], dtype=torch.float64)


def _check_rgb(name: str, img: torch.Tensor) -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
    if not img.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with values in [0, 1], got {img.dtype}")
    if img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"{name} must be [3, H, W] or [B, 3, H, W] sRGB, got {tuple(img.shape)}")
    return img.detach().to("cpu", torch.float64).clamp(0.0, 1.0)


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """Undo the sRGB transfer curve (same shape, float64)."""
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def rgb_to_xyz(img: torch.Tensor) -> torch.Tensor:
    """sRGB ``[..., 3, H, W]`` in [0, 1] -> CIE XYZ (D65) ``[..., 3, H, W]`` float64."""
    lin = srgb_to_linear(_check_rgb("img", img))
    return torch.einsum("ij,...jhw->...ihw", _RGB_TO_XYZ, lin)


def rgb_to_lab(img: torch.Tensor) -> torch.Tensor:
    """sRGB ``[..., 3, H, W]`` in [0, 1] -> CIE L*a*b* (D65) ``[..., 3, H, W]`` float64
    (L in [0, 100]; white (1, 1, 1) -> (100, 0, 0))."""
    xyz = rgb_to_xyz(img) / _WHITE_D65.view(3, 1, 1)
    eps, kappa = 216.0 / 24389.0, 24389.0 / 27.0
    # The linear segment below eps avoids the infinite slope of the cube root at 0.
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1.0 / 3.0), (kappa * xyz + 16.0) / 116.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _check_rgb("a", a), _check_rgb("b", b)
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return rgb_to_lab(a), rgb_to_lab(b)


def delta_e76(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CIE76 colour difference per pixel: ``[..., H, W]`` float64, ``‖Lab(a) − Lab(b)‖₂``."""
    la, lb = _pair(a, b)
    return (la - lb).pow(2).sum(-3).sqrt()


def delta_e2000(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference per pixel (kL = kC = kH = 1): ``[..., H, W]`` float64.

    Follows Sharma, Wu & Dalal (2005), including their conventions for the mean hue when one
    chroma is zero and for hue differences across 0/360 degrees."""
    return delta_e2000_lab(*_pair(a, b))


def delta_e2000_lab(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 between two L*a*b* tensors ``[..., 3, H, W]`` (float64) -> ``[..., H, W]``."""
    la, lb = la.double(), lb.double()
    l1, a1, b1 = la.unbind(-3)
    l2, a2, b2 = lb.unbind(-3)
    c1, c2 = torch.hypot(a1, b1), torch.hypot(a2, b2)
    c_bar7 = ((c1 + c2) / 2.0) ** 7
    g = 0.5 * (1.0 - torch.sqrt(c_bar7 / (c_bar7 + 25.0**7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.rad2deg(torch.atan2(b1, a1p)) % 360.0
    h2p = torch.rad2deg(torch.atan2(b2, a2p)) % 360.0
    zero = (c1p * c2p) == 0
    dlp, dcp = l2 - l1, c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > 180.0, dh - 360.0, torch.where(dh < -180.0, dh + 360.0, dh))
    dh = torch.where(zero, torch.zeros_like(dh), dh)
    d_hp = 2.0 * torch.sqrt(c1p * c2p) * torch.sin(torch.deg2rad(dh) / 2.0)
    lbp, cbp = (l1 + l2) / 2.0, (c1p + c2p) / 2.0
    hsum = h1p + h2p
    hbp = torch.where(
        (h1p - h2p).abs() <= 180.0,
        hsum / 2.0,
        torch.where(hsum < 360.0, (hsum + 360.0) / 2.0, (hsum - 360.0) / 2.0),
    )
    hbp = torch.where(zero, hsum, hbp)
    t = (
        1.0
        - 0.17 * torch.cos(torch.deg2rad(hbp - 30.0))
        + 0.24 * torch.cos(torch.deg2rad(2.0 * hbp))
        + 0.32 * torch.cos(torch.deg2rad(3.0 * hbp + 6.0))
        - 0.20 * torch.cos(torch.deg2rad(4.0 * hbp - 63.0))
    )
    d_theta = 30.0 * torch.exp(-(((hbp - 275.0) / 25.0) ** 2))
    cbp7 = cbp**7
    r_c = 2.0 * torch.sqrt(cbp7 / (cbp7 + 25.0**7))
    s_l = 1.0 + 0.015 * (lbp - 50.0) ** 2 / torch.sqrt(20.0 + (lbp - 50.0) ** 2)
    s_c = 1.0 + 0.045 * cbp
    s_h = 1.0 + 0.015 * cbp * t
    r_t = -torch.sin(torch.deg2rad(2.0 * d_theta)) * r_c
    return torch.sqrt(
        (dlp / s_l) ** 2 + (dcp / s_c) ** 2 + (d_hp / s_h) ** 2 + r_t * (dcp / s_c) * (d_hp / s_h)
    )


def channel_bias(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Mean of ``a − b`` per channel over all pixels (and images), in units of 1/255.

    Args:
        a, b: ``[C, H, W]`` or ``[B, C, H, W]`` float in [0, 1] (clamped), equal shapes.
    Returns:
        C floats; positive means ``a`` is brighter than ``b`` in that channel on average.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (3, 4):
            raise TypeError(f"{name} must be a float tensor [C, H, W] or [B, C, H, W]")
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    d = a.detach().double().clamp(0, 1) - b.detach().double().clamp(0, 1)
    d = d.movedim(-3, 0).reshape(d.shape[-3], -1)
    return [round(float(v) * 255.0, 4) for v in d.mean(1)]


def colour_report(rec: torch.Tensor, orig: torch.Tensor) -> dict:
    """Colour fidelity of ``rec`` against ``orig`` (``[C, H, W]`` or ``[B, C, H, W]`` in [0, 1]):
    ``{"delta_e76", "delta_e2000", "delta_e76_p95", "bias_rgb"}`` (means over pixels; bias in
    1/255 per channel). Grey images (C = 1) get only ``bias_rgb`` (one value)."""
    out = {"bias_rgb": channel_bias(rec, orig)}
    if rec.shape[-3] == 3:
        de = delta_e76(rec, orig)
        out["delta_e76"] = float(de.mean())
        out["delta_e76_p95"] = float(
            torch.quantile(de.reshape(-1)[:: max(1, de.numel() // 1_000_000)], 0.95)
        )
        out["delta_e2000"] = float(delta_e2000(rec, orig).mean())
    return out


def lab_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Differentiable mean squared CIE76 ΔE between ``rec`` and ``target`` (``[B, 3, H, W]``,
    sRGB in [0, 1]), in the input dtype (a training loss term, not a metric).

    Numerics: ``rec`` is clamped to [0, 1] (no gradient outside, where the RGB MSE term still
    pulls it back); the cube root's slope is bounded by the CIE linear segment below
    ``(6/29)^3``, and ``(x + 0.055)^2.4`` is smooth on [0, 1], so gradients stay finite."""
    m = _RGB_TO_XYZ.to(rec.device, rec.dtype) / _WHITE_D65.to(rec.device, rec.dtype).view(3, 1)

    def lab(img):
        img = img.clamp(0.0, 1.0)
        lin = torch.where(img <= 0.04045, img / 12.92, ((img + 0.055) / 1.055) ** 2.4)
        xyz = torch.einsum("ij,bjhw->bihw", m, lin)
        eps, kappa = 216.0 / 24389.0, 24389.0 / 27.0
        f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1.0 / 3.0), (kappa * xyz + 16.0) / 116.0)
        fx, fy, fz = f.unbind(1)
        return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)

    return (lab(rec) - lab(target.detach())).pow(2).sum(1).mean()
