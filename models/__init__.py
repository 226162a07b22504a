"""Reference VQ-VAE / VQGAN models built on vqkernels (kept out of the installed wheel).

    import models
    model = models.load("runs/quickstart/checkpoint.pt")    # eval mode, safe loading
    indices = model.encode(images)          # [B, C, H, W] in [0, 1] -> [B, h, w] int64
    images = model.decode_indices(indices)  # -> [B, C, H, W] in [0, 1]

Training: ``python -m models.train --help``; compression: ``python -m models.compress --help``.
"""

from __future__ import annotations

from .checkpoint import CheckpointError, load_checkpoint
from .vqgan import VQGAN, vqgan_config
from .vqvae import VQVAE, vqvae_config

__all__ = [
    "load",
    "build_model",
    "VQVAE",
    "VQGAN",
    "vqvae_config",
    "vqgan_config",
    "CheckpointError",
]

_MODELS = {"vqvae": VQVAE, "vqgan": VQGAN}


def build_model(model_type: str, config: dict, backend: str = "auto"):
    """A fresh model of ``model_type`` (``"vqvae"`` | ``"vqgan"``) from a config dict."""
    if model_type not in _MODELS:
        raise ValueError(f"model must be one of {sorted(_MODELS)}, got {model_type!r}")
    return _MODELS[model_type](config, backend=backend)


def model_from_checkpoint(ckpt: dict, backend: str = "auto", weights: str = "raw"):
    """Rebuild the model stored in an already loaded checkpoint dict (strict state-dict load).

    ``weights``: ``"raw"`` (the trained weights, what ``--resume`` continues), ``"ema"`` (the
    weight EMA kept with ``--ema-decay``; an error when the checkpoint has none) or ``"auto"``
    (the EMA when present, else the raw weights)."""
    if weights not in ("raw", "ema", "auto"):
        raise ValueError(f"weights must be 'raw', 'ema' or 'auto', got {weights!r}")
    if weights == "ema" and "ema_model" not in ckpt:
        raise CheckpointError("the checkpoint has no weight EMA (train with --ema-decay)")
    use_ema = weights != "raw" and "ema_model" in ckpt
    state = ckpt["ema_model"] if use_ema else ckpt["model"]
    model = build_model(ckpt["model_type"], ckpt["config"], backend=backend)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match its config: {exc}") from None
    return model


def load(path: str, backend: str = "auto", weights: str = "auto"):
    """Load a model saved by ``models.train`` in eval mode.

    Loading uses ``torch.load(weights_only=True)``: a checkpoint can only contain tensors and plain
    containers, so loading never executes code from the file.

    Args:
        path: ``checkpoint.pt`` written by ``python -m models.train``.
        backend: kernel backend for the quantizer (``auto``/``cpu``/``reference``/...).
        weights: ``"auto"`` (default: the weight EMA when the run kept one with ``--ema-decay``,
            else the raw weights), ``"ema"`` or ``"raw"``.
    """
    model = model_from_checkpoint(load_checkpoint(path), backend=backend, weights=weights)
    return model.eval()
