"""One optimizer step of the VQ-VAE / VQGAN objective for ``models.train``, with everything a
scaled-up run needs: DDP wrappers, gradient accumulation, autocast and fp16 loss scaling.

With one micro-batch, fp32, no wrappers and no scaler, :func:`vqgan_step` performs exactly the
operations of :func:`models.vqgan.vqgan_train_step` (same order, same RNG draws).

Gradient accumulation over ``N`` micro-batches (the rank's batch split in ``N`` equal slices):
each micro-loss is divided by ``N`` so the summed gradients equal the gradient of the batch mean;
DDP's gradient all-reduce runs only on the last micro-step (``no_sync`` on the others); the
quantizers' EMA update runs once per optimizer step on all micro-batches
(:class:`models.training.DeferredCodebookUpdates`).

VQGAN under DDP: the generator pass feeds ``recon`` through the *unwrapped* discriminator (its
gradients there only carry the GAN term back to the generator; they are local, never all-reduced,
and dropped by ``opt_d.zero_grad``), and the discriminator update runs through its own DDP wrapper.
"""

from __future__ import annotations

import contextlib

import torch

from .training import DeferredCodebookUpdates, autocast
from .vqvae import reconstruction_loss

__all__ = ["StepConfig", "vqvae_step", "vqgan_step", "unwrap", "init_codebooks_eagerly"]


class StepConfig:
    """What the step functions need besides the batch.

    Attributes:
        micro_batches: gradient-accumulation micro-steps per optimizer step (N >= 1).
        precision: ``fp32`` | ``bf16`` | ``fp16`` (autocast dtype).
        device: where the forward runs (autocast's device type).
        scaler: a ``GradScaler`` (fp16) or None.
    """

    def __init__(self, micro_batches: int, precision: str, device: torch.device, scaler=None):
        self.micro_batches = int(micro_batches)
        self.precision = precision
        self.device = device
        self.scaler = scaler


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def _no_sync(module, last: bool):
    module = getattr(module, "_orig_mod", module)  # a compiled DDP wrapper: its DDP
    if not last and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _step(opt, params, scaler) -> float:
    """Unscale (fp16), measure the gradient norm, step.  Returns the norm (a Python float; NaN/Inf
    when the gradients are not finite — with a scaler the step is then skipped, as usual)."""
    if scaler is not None:
        scaler.unscale_(opt)
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if scaler is not None:
        scaler.step(opt)  # the caller runs scaler.update() once, after every optimizer stepped
    else:
        opt.step()
    return norm


def _micro(images: torch.Tensor, n: int) -> list[torch.Tensor]:
    if images.shape[0] % n:
        raise ValueError(
            f"the per-rank batch {images.shape[0]} must be divisible by --grad-accum {n}"
        )
    return list(images.chunk(n)) if n > 1 else [images]


def _deferred(model, n: int):
    return DeferredCodebookUpdates(unwrap(model)) if n > 1 else None


def vqvae_step(
    gen,
    opt,
    images,
    cfg: StepConfig,
    perc=None,
    perc_weight: float = 1.0,
    lab_weight: float = 0.0,
) -> dict:
    """One VQ-VAE optimizer step on this rank's ``images [B, C, H, W]``.

    ``lab_weight``: the config's weight of the mean squared ΔE (CIE Lab) term in
    :func:`models.vqvae.reconstruction_loss` (0: RGB MSE only).

    Returns floats ``loss``, ``rec_loss``, ``grad_norm`` (this rank's micro-batch means averaged
    over the micro-steps) and ``recon`` (detached, the rank's batch) for logging."""
    n = cfg.micro_batches
    micros = _micro(images, n)
    deferred = _deferred(gen, n)
    opt.zero_grad(set_to_none=True)
    loss_sum, rec_sum, recons = 0.0, 0.0, []
    with deferred if deferred is not None else contextlib.nullcontext():
        for i, x in enumerate(micros):
            with _no_sync(gen, i == n - 1):
                with autocast(cfg.precision, cfg.device):
                    recon, _, vq_loss = gen(x)
                    rec = reconstruction_loss(recon, x, lab_weight)
                    loss = rec + vq_loss
                    if perc is not None:
                        loss = loss + perc_weight * perc(recon, x)
                _backward(loss / n if n > 1 else loss, cfg.scaler)
            loss_sum += float(loss.detach())
            rec_sum += float(rec.detach())
            recons.append(recon.detach())
        if deferred is not None:
            deferred.flush()
    norm = _step(opt, list(unwrap(gen).parameters()), cfg.scaler)
    if cfg.scaler is not None:
        cfg.scaler.update()
    return {
        "loss": loss_sum / n,
        "rec_loss": rec_sum / n,
        "grad_norm": norm,
        "recon": torch.cat(recons) if n > 1 else recons[0],
    }


def vqgan_step(gen, disc, gan, opt_g, opt_d, images, step: int, cfg: StepConfig) -> dict:
    """One VQGAN step (generator update, then discriminator update when it is on).

    Args:
        gen: the VQGAN (or its DDP / compiled wrapper); ``disc``: the discriminator's wrapper
            (or ``gan.discriminator`` itself); ``gan``: the :class:`models.vqgan.VQGANLoss`.
        step: global optimizer step (compared with ``disc_start``).
    Returns:
        floats ``loss``, ``rec_loss``, ``d_loss``, ``grad_norm`` (generator) and ``recon``.
    """
    n = cfg.micro_batches
    micros = _micro(images, n)
    raw = unwrap(gen)
    factor = gan.disc_factor(step)
    w = gan.config["disc_weight"]
    deferred = _deferred(gen, n)
    opt_g.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "rec_loss": 0.0}
    recons = []
    with deferred if deferred is not None else contextlib.nullcontext():
        for i, x in enumerate(micros):
            with _no_sync(gen, i == n - 1):
                with autocast(cfg.precision, cfg.device):
                    recon, _, vq_loss = gen(x)
                    rec = gan.reconstruction(recon, x)
                    p = (
                        gan.perceptual(recon, x)
                        if gan.config["perceptual_weight"] > 0
                        else rec.new_zeros(())
                    )
                    nll = rec + gan.config["perceptual_weight"] * p
                    if factor > 0:
                        g_loss = gan.generator_logits_loss(gan.discriminator(recon))
                        lam = gan.adaptive_weight(nll, g_loss, raw.last_layer_weight())
                    else:
                        g_loss = nll.new_zeros(())
                        lam = nll.new_zeros(())
                    total = nll + vq_loss + factor * w * lam * g_loss
                _backward(total / n if n > 1 else total, cfg.scaler)
            sums["loss"] += float(total.detach())
            sums["rec_loss"] += float(rec.detach())
            recons.append(recon.detach())
        if deferred is not None:
            deferred.flush()
    norm = _step(opt_g, list(raw.parameters()), cfg.scaler)

    d_sum = 0.0
    if factor > 0:
        opt_d.zero_grad(set_to_none=True)  # also drops grads the generator pass left on D
        for i, (x, r) in enumerate(zip(micros, recons)):
            with _no_sync(disc, i == n - 1):
                with autocast(cfg.precision, cfg.device):
                    logits_real = disc(x.detach())
                    logits_fake = disc(r)
                    d_loss = factor * gan.discriminator_loss(logits_real, logits_fake)
                _backward(d_loss / n if n > 1 else d_loss, cfg.scaler)
            d_sum += float(d_loss.detach())
        _step(opt_d, list(gan.discriminator.parameters()), cfg.scaler)
    if cfg.scaler is not None:
        cfg.scaler.update()
    return {
        "loss": sums["loss"] / n,
        "rec_loss": sums["rec_loss"] / n,
        "d_loss": d_sum / n,
        "grad_norm": norm,
        "recon": torch.cat(recons) if n > 1 else recons[0],
    }


@torch.no_grad()
def init_codebooks_eagerly(model, images: torch.Tensor, cfg: StepConfig) -> None:
    """Run a pending k-means init of the model's quantizer on the rank's whole batch now (eagerly),
    as the first training forward would: same latents, same random draws."""
    from vqkernels.nn import VectorQuantizer

    raw = unwrap(model)
    q = getattr(raw, "quantizer", None)
    if not isinstance(q, VectorQuantizer) or q._initted_py:
        return
    with autocast(cfg.precision, cfg.device):
        z = raw.encode_latents(images)
    q.init_codebook_(z)
