"""Perceptual losses that never download anything.

``build_perceptual(kind)`` returns a module ``loss(recon, target) -> [] float32`` for images
``[B, C, H, W]`` in [0, 1] (grey images are repeated to RGB for the network losses):

``"none"``     zero.
``"ssim"``     weight-free: ``(1 − SSIM) + L1 of the horizontal/vertical image gradients``.  SSIM
               rewards local structure/contrast, the gradient term sharp edges; no pretrained
               weights, so it is always available (the ``auto`` fallback).
``"lpips"``    LPIPS-VGG (Zhang et al. 2018) with our own VGG16 feature stack.  Needs two local
               files: the ImageNet VGG16 backbone in torchvision's state-dict layout
               (``features.N.weight``; env ``VQKERNELS_VGG16_PATH``) and LPIPS' linear heads
               (``lin0..4.model.1.weight``; env ``VQKERNELS_LPIPS_HEADS_PATH``, or found inside an
               installed ``lpips`` package as ``lpips/weights/v0.1/vgg.pth``).
``"stlpips"``  shift-tolerant LPIPS-VGG (Ghildyal & Liu 2022): an anti-aliased VGG16 (max-pool
               stride 1 + 3x3 binomial blur-pool stride 2, reflect padding 2) whose full weights ship
               in the ``stlpips-pytorch`` wheel as ``stlpips_pytorch/weights/vST0.0/
               vgg_shift_tolerant.pth``.  We load that file with our own network code (the package
               is located but never imported).  Install it with ``pip install --no-deps
               stlpips-pytorch==0.0.2`` or point ``VQKERNELS_STLPIPS_PATH`` at the .pth file.
``"auto"``     ``stlpips`` if its file is found, else ``lpips`` if both of its files are found,
               else ``ssim``.  The choice is recorded by the caller (config, logs, checkpoint).

Weight files are read with ``torch.load(weights_only=True)``.  A missing file is a clear
FileNotFoundError naming the environment variable — never a download.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import ssim_map

__all__ = [
    "build_perceptual",
    "resolve_perceptual",
    "PERCEPTUAL_KINDS",
    "VGG16Features",
    "LPIPSLoss",
    "SSIMGradientLoss",
]

PERCEPTUAL_KINDS = ("auto", "lpips", "stlpips", "ssim", "none")

# VGG16 configuration "D": conv widths, "M" = downsampling.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS input scaling (ImageNet statistics expressed for inputs in [-1, 1]).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _package_file(package: str, *parts: str) -> str | None:
    """Path of a data file inside an installed package, found WITHOUT importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *parts)
        if os.path.isfile(path):
            return path
    return None


def stlpips_weights_path() -> str | None:
    env = os.environ.get("VQKERNELS_STLPIPS_PATH")
    if env:
        return env
    return _package_file("stlpips_pytorch", "weights", "vST0.0", "vgg_shift_tolerant.pth")


def lpips_paths() -> tuple[str | None, str | None]:
    vgg = os.environ.get("VQKERNELS_VGG16_PATH") or None
    heads = os.environ.get("VQKERNELS_LPIPS_HEADS_PATH") or _package_file(
        "lpips", "weights", "v0.1", "vgg.pth"
    )
    return vgg, heads


def resolve_perceptual(kind: str) -> str:
    """Turn ``"auto"`` into the best available concrete kind (others are returned unchanged)."""
    if kind not in PERCEPTUAL_KINDS:
        raise ValueError(f"perceptual must be one of {PERCEPTUAL_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    p = stlpips_weights_path()
    if p and os.path.isfile(p):
        return "stlpips"
    vgg, heads = lpips_paths()
    if vgg and heads and os.path.isfile(vgg) and os.path.isfile(heads):
        return "lpips"
    return "ssim"


def _load_weights(path: str | None, what: str, env: str) -> dict:
    if not path:
        raise FileNotFoundError(
            f"{what} weights not found: set {env} to a local file (nothing is ever downloaded)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights file {path!r} (from {env}) does not exist")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{what} weights file {path!r} does not hold a state dict")
    return sd


class _BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling: depthwise 3x3 binomial filter ``[1,2,1]⊗[1,2,1]/16``
    after reflect padding of 2 on every side (the 'pad more' variant of ST-LPIPS)."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = torch.outer(a, a)
        self.register_buffer("filt", (filt / filt.sum()).expand(channels, 1, 3, 3).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1]
        )


class VGG16Features(nn.Module):
    """VGG16 conv stack returning relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

    ``anti_aliased=False``: torchvision's layout (``features.{i}`` with max-pool 2/2), so a
    torchvision ``vgg16`` state dict loads directly.  ``anti_aliased=True``: every max-pool is
    max-pool(2, stride 1) followed by a :class:`_BlurPool` (the ST-LPIPS layout; indices shift by
    one per pooling stage, matching the weight file)."""

    def __init__(self, anti_aliased: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        taps: list[int] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                taps.append(len(layers) - 1)  # the ReLU just before the pooling
                if anti_aliased:
                    layers += [nn.MaxPool2d(2, stride=1), _BlurPool(c)]
                else:
                    layers.append(nn.MaxPool2d(2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs


class LPIPSLoss(nn.Module):
    """LPIPS distance with frozen weights: unit-normalize each tapped feature map over channels,
    squared difference, per-channel linear weights (1x1 conv, no bias), spatial mean, summed over
    the 5 taps; averaged over the batch.  Inputs ``[B, C, H, W]`` in [0, 1]."""

    _CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, features: VGG16Features, heads: list[torch.Tensor], min_size: int):
        super().__init__()
        self.net = features
        for i, w in enumerate(heads):
            self.register_buffer(f"lin{i}", w.float().reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.min_size = min_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen network: always in eval mode
        return super().train(False)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # The 4 poolings need a minimum size (reflect padding in the anti-aliased net); upsample
        # tiny images (e.g. 8x8 digits) instead of failing.
        if min(x.shape[-2:]) < self.min_size:
            x = F.interpolate(
                x,
                size=(max(self.min_size, x.shape[-2]), max(self.min_size, x.shape[-1])),
                mode="bilinear",
                align_corners=False,
            )
        return ((2.0 * x - 1.0) - self.shift) / self.scale

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        f0 = self.net(self._prep(recon.float()))
        f1 = self.net(self._prep(target.float()))
        total = recon.new_zeros((), dtype=torch.float32)
        for i, (a, b) in enumerate(zip(f0, f1)):
            # eps 1e-10 in the norm as LPIPS does (keeps all-zero feature columns finite).
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = ((a - b) ** 2 * getattr(self, f"lin{i}")).sum(1)
            total = total + d.mean()
        return total


class SSIMGradientLoss(nn.Module):
    """Weight-free structural loss: ``(1 − mean SSIM) + mean |∇recon − ∇target|`` (finite
    differences along H and W).  Inputs ``[B, C, H, W]`` in [0, 1]; returns ``[] float32``."""

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a, b = recon.float(), target.float()
        s = ssim_map(a, b).mean()
        gx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
        gy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
        return (1.0 - s) + 0.5 * (gx.abs().mean() + gy.abs().mean())


class _Zero(nn.Module):
    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return recon.new_zeros((), dtype=torch.float32)


def _build_stlpips() -> LPIPSLoss:
    sd = _load_weights(
        stlpips_weights_path(),
        "ST-LPIPS (stlpips-pytorch wheel)",
        "VQKERNELS_STLPIPS_PATH (or `pip install --no-deps stlpips-pytorch==0.0.2`)",
    )
    feats = VGG16Features(anti_aliased=True)
    # The file names layers net.slice{1..5}.{i}.*, i being the index in the full feature stack.
    mapped = {}
    for k, v in sd.items():
        if k.startswith("net.slice"):
            _, _, idx, name = k.split(".", 3)
            mapped[f"features.{idx}.{name}"] = v
    missing, unexpected = feats.load_state_dict(mapped, strict=False)
    # The blur filters are recomputed identically; the weights/biases must all be present.
    if [m for m in missing if not m.endswith(".filt")] or unexpected:
        raise ValueError(
            f"ST-LPIPS weight file has an unexpected layout (missing {missing}, "
            f"unexpected {unexpected})"
        )
    heads = [sd[f"lin{i}.model.1.weight"] for i in range(5)]
    return LPIPSLoss(feats, heads, min_size=32)


def _build_lpips() -> LPIPSLoss:
    vgg_path, heads_path = lpips_paths()
    vgg = _load_weights(vgg_path, "VGG16 backbone", "VQKERNELS_VGG16_PATH")
    heads_sd = _load_weights(
        heads_path,
        "LPIPS linear heads",
        "VQKERNELS_LPIPS_HEADS_PATH (or install the `lpips` package)",
    )
    feats = VGG16Features(anti_aliased=False)
    sub = {k: v for k, v in vgg.items() if k.startswith("features.")}
    feats.load_state_dict(sub, strict=True)
    heads = [heads_sd[f"lin{i}.model.1.weight"] for i in range(5)]
    return LPIPSLoss(feats, heads, min_size=16)


def build_perceptual(kind: str) -> tuple[nn.Module, str]:
    """Build a perceptual loss module; returns ``(module, resolved_kind)``."""
    kind = resolve_perceptual(kind)
    if kind == "none":
        return _Zero(), kind
    if kind == "ssim":
        return SSIMGradientLoss(), kind
    if kind == "lpips":
        return _build_lpips(), kind
    return _build_stlpips(), kind
