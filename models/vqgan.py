"""VQGAN (Esser et al. 2021) built on :class:`vqkernels.nn.VectorQuantizer`.

Autoencoder: ResNet blocks with GroupNorm and swish, attention at the lowest resolution, 1x1
``quant_conv``/``post_quant_conv`` around the quantizer (optionally a low-dimensional,
l2-normalized lookup via ``codebook_dim``/``l2_normalize``).  Training adds a PatchGAN
discriminator (BatchNorm or ActNorm), a hinge (or vanilla) GAN loss whose weight is adapted as
``λ = ‖∇_w L_rec‖ / (‖∇_w L_GAN‖ + 1e-4)`` on the decoder's last conv ``w`` (clamped to
``[0, lambda_max]``), switched on at ``disc_start``; two Adam optimizers with betas (0.5, 0.9).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import AttnBlock, Downsample, NLayerDiscriminator, ResnetBlock, Upsample, group_norm
from .vqvae import _QuantizerHost, make_quantizer, sized_config

__all__ = ["VQGAN", "VQGANLoss", "vqgan_config", "vqgan_train_step", "make_vqgan_optimizers"]

_BASE = {
    "model": "vqgan",
    "in_channels": 3,
    "ch": 64,
    "ch_mult": [1, 2, 2],  # len-1 downsamplings: factor 4
    "num_res_blocks": 1,
    "dropout": 0.0,
    "z_channels": 64,
    "embedding_dim": 64,
    "codebook_dim": None,  # e.g. 8 with l2_normalize=True for the low-dim normalized lookup
    "l2_normalize": False,
    "codebook_size": 512,
    "beta": 0.25,
    "decay": 0.99,
    "eps": 1e-5,
    "threshold_ema_dead_code": 1.0,
    "kmeans_init": True,
    "kmeans_iters": 10,
    "downsample": 4,
    # training losses
    "rec_loss": "l1",
    "perceptual_weight": 1.0,
    "disc_start": 2000,
    "disc_weight": 0.8,
    "disc_layers": 2,
    "disc_ndf": 32,
    "disc_norm": "batch",
    "gan_loss": "hinge",
    "lambda_max": 1e4,
    "lr": 2e-4,
    "disc_lr": 2e-4,
}
_TINY = {
    "ch": 8,
    "ch_mult": [1, 2],
    "z_channels": 8,
    "embedding_dim": 8,
    "codebook_size": 32,
    "kmeans_iters": 2,
    "downsample": 2,
    "disc_layers": 1,
    "disc_ndf": 8,
    "disc_start": 5,
}


def vqgan_config(size: str = "base", **overrides) -> dict:
    """A VQGAN config dict (``"tiny"`` or ``"base"``) with overrides; unknown keys are an error.
    ``downsample`` is derived from ``ch_mult`` (``2**(len(ch_mult) − 1)``)."""
    cfg = sized_config("VQGAN", _BASE, _TINY, size, overrides)
    cfg["ch_mult"] = [int(m) for m in cfg["ch_mult"]]
    cfg["downsample"] = 2 ** (len(cfg["ch_mult"]) - 1)
    if cfg["gan_loss"] not in ("hinge", "vanilla"):
        raise ValueError(f"gan_loss must be 'hinge' or 'vanilla', got {cfg['gan_loss']!r}")
    if cfg["rec_loss"] not in ("l1", "l2"):
        raise ValueError(f"rec_loss must be 'l1' or 'l2', got {cfg['rec_loss']!r}")
    return cfg


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        ch, mult = cfg["ch"], cfg["ch_mult"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch * mult[0], 3, padding=1)
        blocks: list[nn.Module] = []
        prev = ch * mult[0]
        for i, m in enumerate(mult):
            for _ in range(cfg["num_res_blocks"]):
                blocks.append(ResnetBlock(prev, ch * m, cfg["dropout"]))
                prev = ch * m
            if i < len(mult) - 1:
                blocks.append(Downsample(prev))
        blocks += [
            ResnetBlock(prev, prev, cfg["dropout"]),
            AttnBlock(prev),
            ResnetBlock(prev, prev, cfg["dropout"]),
        ]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, cfg["z_channels"], 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class _Decoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        ch, mult = cfg["ch"], cfg["ch_mult"]
        prev = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg["z_channels"], prev, 3, padding=1)
        blocks: list[nn.Module] = [
            ResnetBlock(prev, prev, cfg["dropout"]),
            AttnBlock(prev),
            ResnetBlock(prev, prev, cfg["dropout"]),
        ]
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(cfg["num_res_blocks"] + 1):
                blocks.append(ResnetBlock(prev, ch * m, cfg["dropout"]))
                prev = ch * m
            if i > 0:
                blocks.append(Upsample(prev))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, cfg["in_channels"], 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class VQGAN(_QuantizerHost):
    """VQGAN autoencoder (the part ``models.load`` returns; the discriminator lives in
    :class:`VQGANLoss`).  Images ``[B, C, H, W]`` in [0, 1]; the network works in [-1, 1]."""

    def __init__(self, config: dict | None = None, backend: str = "auto"):
        super().__init__()
        base = {k: v for k, v in (config or {}).items() if k not in ("model", "downsample")}
        cfg = vqgan_config("base", **base)
        self.config = copy.deepcopy(cfg)
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        e = cfg["embedding_dim"]
        self.quant_conv = nn.Conv2d(cfg["z_channels"], e, 1)
        self.post_quant_conv = nn.Conv2d(e, cfg["z_channels"], 1)
        self.quantizer = make_quantizer(
            e, cfg, backend, codebook_dim=cfg["codebook_dim"], l2_normalize=cfg["l2_normalize"]
        )
        self._backend = backend

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images * 2.0 - 1.0))

    def decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        return (self.decoder(self.post_quant_conv(q)) + 1.0) * 0.5

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's final conv weight: where the adaptive GAN weight λ is measured."""
        return self.decoder.conv_out.weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class VQGANLoss(nn.Module):
    """Discriminator + perceptual loss + the VQGAN objective.

    Args:
        config: the VQGAN config (loss keys: rec_loss, perceptual_weight, disc_*, gan_loss,
            lambda_max).
        perceptual: a module ``(recon, target) -> [] float32`` (see :mod:`models.perceptual`).
    """

    def __init__(self, config: dict, perceptual: nn.Module):
        super().__init__()
        self.config = config
        self.discriminator = NLayerDiscriminator(
            config["in_channels"], config["disc_ndf"], config["disc_layers"], config["disc_norm"]
        )
        self.perceptual = perceptual

    def disc_factor(self, step: int) -> float:
        """0 before ``disc_start`` (the discriminator is off), 1 from it on."""
        return 1.0 if step >= self.config["disc_start"] else 0.0

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor):
        """``λ = ‖∇_last nll‖ / (‖∇_last g_loss‖ + 1e-4)``, clamped to ``[0, lambda_max]`` and
        detached ([] float32).  The 1e-4 keeps λ finite when the GAN gradient vanishes; the clamp
        bounds it when it is tiny but nonzero."""
        g_rec = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        lam = g_rec.float().norm() / (g_gan.float().norm() + 1e-4)
        return torch.clamp(lam, 0.0, float(self.config["lambda_max"])).detach()

    def reconstruction(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.config["rec_loss"] == "l1":
            return (recon.float() - images.float()).abs().mean()
        return F.mse_loss(recon.float(), images.float())

    def generator_logits_loss(self, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.config["gan_loss"] == "hinge":
            return -logits_fake.mean()
        return F.softplus(-logits_fake).mean()

    def discriminator_loss(self, logits_real, logits_fake) -> torch.Tensor:
        fn = hinge_d_loss if self.config["gan_loss"] == "hinge" else vanilla_d_loss
        return fn(logits_real, logits_fake)


def make_vqgan_optimizers(model: VQGAN, loss: VQGANLoss):
    """Two Adam optimizers with betas (0.5, 0.9): the autoencoder (incl. a learnable codebook
    and projections) and the discriminator."""
    cfg = model.config
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=cfg["disc_lr"], betas=(0.5, 0.9))
    return opt_g, opt_d


def vqgan_train_step(
    model: VQGAN, loss: VQGANLoss, opt_g, opt_d, images: torch.Tensor, step: int
) -> dict:
    """One VQGAN training step (generator update, then discriminator update when it is on).

    Args:
        images: ``[B, C, H, W]`` float in [0, 1].
        step: global step (compared with ``disc_start``).
    Returns:
        floats: loss, rec_loss, perceptual, vq_loss, g_loss, d_loss, disc_factor, lambda
        (plus ``recon``/``indices`` tensors for logging).
    """
    recon, indices, vq_loss = model(images)
    rec = loss.reconstruction(recon, images)
    p = (
        loss.perceptual(recon, images)
        if loss.config["perceptual_weight"] > 0
        else rec.new_zeros(())
    )
    nll = rec + loss.config["perceptual_weight"] * p
    factor = loss.disc_factor(step)
    if factor > 0:
        g_loss = loss.generator_logits_loss(loss.discriminator(recon))
        lam = loss.adaptive_weight(nll, g_loss, model.last_layer_weight())
    else:
        # Discriminator off: no GAN term and no wasted discriminator forward.
        g_loss = nll.new_zeros(())
        lam = nll.new_zeros(())
    total = nll + vq_loss + factor * loss.config["disc_weight"] * lam * g_loss
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()

    if factor > 0:
        logits_real = loss.discriminator(images.detach())
        logits_fake = loss.discriminator(recon.detach())
        d_loss = factor * loss.discriminator_loss(logits_real, logits_fake)
        opt_d.zero_grad(set_to_none=True)  # also drops grads the generator pass left on D
        d_loss.backward()
        opt_d.step()
    else:
        d_loss = nll.new_zeros(())
    return {
        "loss": float(total.detach()),
        "rec_loss": float(rec.detach()),
        "perceptual": float(p.detach()),
        "vq_loss": float(vq_loss.detach()),
        "g_loss": float(g_loss.detach()),
        "d_loss": float(d_loss.detach()),
        "disc_factor": factor,
        "lambda": float(lam),
        "recon": recon.detach(),
        "indices": indices,
    }
