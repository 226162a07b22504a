"""VQ-VAE (van den Oord et al. 2017) built on :class:`vqkernels.nn.VectorQuantizer`.

Encoder: ``log2(downsample)`` stride-2 4x4 convs, a 3x3 conv, residual blocks, a 1x1 projection to
the code dimension D.  Quantizer: EMA codebook (K codes, decay 0.99), commitment weight beta,
dead-code restarts and optional k-means init.  Decoder: the mirror image with transposed convs.

Images are ``[B, C, H, W]`` float in [0, 1] with H and W divisible by ``downsample``; the network
sees ``images − 0.5`` and predicts ``recon − 0.5`` (centred data trains faster).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ResBlock

__all__ = ["VQVAE", "vqvae_config", "make_quantizer"]

# Defaults of the "base" config, tuned for 3 minutes on 2 CPU cores (see benchmarks/eval_models.py).
_BASE = {
    "model": "vqvae",
    "in_channels": 3,
    "hidden": 128,
    "res_hidden": 64,
    "res_blocks": 2,
    "downsample": 4,
    "embedding_dim": 64,
    "codebook_size": 512,
    "beta": 0.25,
    "decay": 0.99,
    "eps": 1e-5,
    "threshold_ema_dead_code": 1.0,
    "kmeans_init": True,
    "kmeans_iters": 10,
    "lr": 1e-3,
    # Weight of the mean squared ΔE (CIE Lab) term in the reconstruction loss (0 = RGB MSE only;
    # applies to RGB data). 5e-5: at 700 photo steps the flower's whole-photo ΔE76 8.7 -> 7.0 at
    # equal PSNR within 0.5 dB (benchmarks in the README).
    "lab_weight": 5e-5,
}
_TINY = {
    "hidden": 16,
    "res_hidden": 8,
    "res_blocks": 1,
    "embedding_dim": 8,
    "codebook_size": 32,
    "kmeans_iters": 2,
}


def vqvae_config(size: str = "base", **overrides) -> dict:
    """A VQ-VAE config dict (``"tiny"`` for tests/CI, ``"base"`` for real runs) with overrides.

    Unknown keys are an error so typos do not silently fall back to defaults."""
    return sized_config("VQ-VAE", _BASE, _TINY, size, overrides)


def sized_config(what: str, base: dict, tiny: dict, size: str, overrides: dict) -> dict:
    """A fresh config: ``base``, updated with ``tiny`` when ``size == "tiny"``, then with
    ``overrides``; an unknown size or key (not in ``base``) is a ValueError naming ``what``."""
    if size not in ("tiny", "base"):
        raise ValueError(f"config must be 'tiny' or 'base', got {size!r}")
    cfg = dict(base)
    if size == "tiny":
        cfg.update(tiny)
    for k, v in overrides.items():
        if k not in cfg:
            raise ValueError(f"unknown {what} config key {k!r} (known: {sorted(cfg)})")
        cfg[k] = v
    return cfg


def make_quantizer(dim: int, cfg: dict, backend: str, **extra) -> nn.Module:
    """The agreed ``vqkernels.nn.VectorQuantizer`` for a channel-first feature map
    (``channel_dim=1``), configured from a model config dict."""
    from vqkernels import nn as vqnn  # looked up at call time so tests may swap the layer

    return vqnn.VectorQuantizer(
        dim,
        cfg["codebook_size"],
        decay=cfg["decay"],
        eps=cfg["eps"],
        commitment_weight=cfg["beta"],
        kmeans_init=cfg["kmeans_init"],
        kmeans_iters=cfg["kmeans_iters"],
        threshold_ema_dead_code=cfg["threshold_ema_dead_code"],
        channel_dim=1,
        backend=backend,
        **extra,
    )


def _num_down(downsample: int) -> int:
    n = int(round(math.log2(downsample))) if downsample >= 1 else -1
    if n < 0 or 2**n != downsample:
        raise ValueError(f"downsample must be a power of two >= 1, got {downsample!r}")
    return n


class _QuantizerHost(nn.Module):
    """Shared encode/decode_indices/backend plumbing for the models."""

    quantizer: nn.Module
    config: dict

    @property
    def codebook_size(self) -> int:
        return int(self.config["codebook_size"])

    @property
    def downsample(self) -> int:
        return int(self.config["downsample"])

    @property
    def backend(self) -> str:
        return self._backend

    def set_backend(self, backend: str) -> None:
        """Kernel backend for the quantizer (``auto``/``cpu``/``reference``/...); not part of the
        config because it does not change the numbers the model computes."""
        self._backend = backend
        if hasattr(self.quantizer, "backend"):
            self.quantizer.backend = backend

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        c = self.config["in_channels"]
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"images must be [B, {c}, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [0, 1], got {images.dtype}")
        f = self.downsample
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(
                f"images' H and W must be divisible by {f} (the downsampling factor), "
                f"got {tuple(images.shape[-2:])}"
            )

    def _quantize_eval(self, z: torch.Tensor):
        """Quantize without touching EMA state, whatever the module's mode."""
        was = self.quantizer.training
        self.quantizer.eval()
        try:
            return self.quantizer(z)
        finally:
            self.quantizer.train(was)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, H, W]`` float in [0, 1] -> ``indices [B, H/f, W/f] int64``."""
        self._check_images(images)
        _, indices, _ = self._quantize_eval(self.encode_latents(images))
        return indices

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [B, h, w] int64`` in [0, K) -> ``images [B, C, h·f, w·f]`` float in [0, 1]."""
        if (
            not isinstance(indices, torch.Tensor)
            or indices.dtype != torch.int64
            or indices.dim() != 3
        ):
            raise ValueError("indices must be an int64 tensor [B, h, w]")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size})")
        q = self.quantizer.get_codes_from_indices(indices)  # [B, h, w, dim] channel-last
        return self.decode_latents(q.permute(0, 3, 1, 2).contiguous()).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor):
        """``images [B, C, H, W]`` in [0, 1] -> ``(recon [B, C, H, W]`` float (not clamped, for the
        loss), ``indices [B, h, w] int64``, ``vq_loss [] float32)``.  In training mode the
        quantizer's EMA codebook is updated."""
        self._check_images(images)
        z = self.encode_latents(images)
        q, indices, vq_loss = self.quantizer(z)
        return self.decode_latents(q), indices, vq_loss


class VQVAE(_QuantizerHost):
    """VQ-VAE with an EMA :class:`vqkernels.nn.VectorQuantizer`.

    Args:
        config: dict from :func:`vqvae_config` (stored as ``model.config`` and in checkpoints).
        backend: kernel backend for the quantizer (not stored in the config).
    """

    def __init__(self, config: dict | None = None, backend: str = "auto"):
        super().__init__()
        cfg = (
            vqvae_config("base")
            if config is None
            else vqvae_config("base", **{k: v for k, v in config.items() if k != "model"})
        )
        self.config = copy.deepcopy(cfg)
        c, h, rh, d = cfg["in_channels"], cfg["hidden"], cfg["res_hidden"], cfg["embedding_dim"]
        n = _num_down(cfg["downsample"])
        # Channel widths along the downsampling path: the last stride-2 conv outputs h.
        widths = [max(h // 2 ** (n - 1 - i), 1) for i in range(n)]
        enc: list[nn.Module] = []
        prev = c
        for w in widths:
            enc += [nn.Conv2d(prev, w, 4, stride=2, padding=1), nn.ReLU(True)]
            prev = w
        enc.append(nn.Conv2d(prev, h, 3, padding=1))
        enc += [ResBlock(h, rh) for _ in range(cfg["res_blocks"])]
        enc += [nn.ReLU(True), nn.Conv2d(h, d, 1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(d, h, 3, padding=1)]
        dec += [ResBlock(h, rh) for _ in range(cfg["res_blocks"])]
        dec.append(nn.ReLU(True))
        prev = h
        outs = list(reversed(widths[:-1])) + [c]
        for i, w in enumerate(outs):
            dec.append(nn.ConvTranspose2d(prev, w, 4, stride=2, padding=1))
            if i < len(outs) - 1:
                dec.append(nn.ReLU(True))
            prev = w
        if n == 0:
            dec.append(nn.Conv2d(h, c, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self.quantizer = make_quantizer(d, cfg, backend)
        self._backend = backend

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents ``[B, D, h, w]`` float."""
        return self.encoder(images - 0.5)

    def decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w]`` -> reconstruction ``[B, C, H, W]`` (not clamped)."""
        return self.decoder(q) + 0.5

    def last_layer_weight(self) -> torch.Tensor:
        return [m for m in self.decoder if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][
            -1
        ].weight


def reconstruction_loss(
    recon: torch.Tensor, images: torch.Tensor, lab_weight: float = 0.0
) -> torch.Tensor:
    """Mean squared error (fp32) — the VQ-VAE objective's data term — plus, when ``lab_weight``
    > 0, ``lab_weight`` × the mean squared CIE76 ΔE (:func:`models.colour.lab_loss`; 3-channel
    images only). RGB MSE under-weights hue errors in dark regions, where a few /255 of green
    already read as another colour; the Lab term puts them on a perceptual scale (ΔE² ≈ 1 for an
    error of ~1/255, so weights around 1e-5 make the two terms comparable)."""
    loss = F.mse_loss(recon.float(), images.float())
    if lab_weight > 0 and images.shape[1] == 3:
        from .colour import lab_loss

        # fp32 even under --precision bf16/fp16: autocast would run the RGB->XYZ einsum in half
        # precision, and L*a*b* values up to 100 keep only ~3 significant digits there.
        with torch.autocast(recon.device.type, enabled=False):
            loss = loss + lab_weight * lab_loss(recon.float(), images.float())
    return loss
