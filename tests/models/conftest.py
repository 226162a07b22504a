"""Fixtures shared by the models tests: a tiny k-means-initialized VQ-VAE and a model-only
checkpoint in the format ``models.load`` / the compress CLI read."""

from __future__ import annotations

import pytest
import torch

from models import checkpoint as ck
from models.vqvae import VQVAE, vqvae_config


def make_tiny_vqvae(seed: int = 0, k: int = 32) -> VQVAE:
    torch.manual_seed(seed)
    m = VQVAE(vqvae_config("tiny", codebook_size=k), backend="reference")
    m.train()
    m(torch.rand(4, 3, 16, 16))  # k-means init on one batch so codes are data-like
    return m.eval()


def save_model_checkpoint(model: VQVAE, path: str) -> None:
    ck.atomic_save(
        {
            "format": ck.FORMAT,
            "version": ck.VERSION,
            "model_type": "vqvae",
            "config": model.config,
            "model": model.state_dict(),
        },
        path,
    )


@pytest.fixture
def tiny_vqvae():
    """``tiny_vqvae(seed=0, k=32)``: a fresh tiny VQ-VAE (reference backend, k-means initialized)."""
    return make_tiny_vqvae


@pytest.fixture
def write_model_checkpoint():
    """``write_model_checkpoint(model, path)``: an atomic model-only checkpoint."""
    return save_model_checkpoint
