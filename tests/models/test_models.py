"""Reference models: parity of fused vs reference kernels in training, VQGAN mechanics, atomic and
safe checkpoints, exact --resume, the training CLI, data splits and metrics.

Everything runs on the tiny configs and the 8x8 digits (a few seconds each on 2 cores)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import models
import vqkernels
from models import checkpoint as ck
from models.data import PHOTOS_EVAL, PHOTOS_TRAIN, eval_groups, load_dataset
from models.metrics import bits_per_image, codebook_usage, perplexity, psnr, ssim
from models.train import train
from models.vqgan import VQGAN, VQGANLoss, make_vqgan_optimizers, vqgan_config, vqgan_train_step
from models.vqvae import VQVAE, reconstruction_loss, vqvae_config

CPU_WHY = vqkernels.available_backends()["cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from more threads, and on a shared 2-core machine OpenMP threads
    competing for the cores make each step many times slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _digits_batches(n: int, batch: int = 16, seed: int = 0) -> list[torch.Tensor]:
    sampler = load_dataset("digits", "train")
    g = torch.Generator().manual_seed(seed)
    return [sampler.sample(batch, g) for _ in range(n)]


def _vqvae_losses(backend: str, batches, seed: int = 0) -> tuple[list[float], dict]:
    torch.manual_seed(seed)
    model = VQVAE(vqvae_config("tiny", in_channels=1, downsample=2), backend=backend).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for x in batches:
        recon, _, vq_loss = model(x)
        loss = reconstruction_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, model.state_dict()


# ------------------------------------------------------------------------------------ parity


@pytest.mark.skipif(bool(CPU_WHY), reason=f"cpu backend unavailable: {CPU_WHY}")
def test_parity_cpu_backend_vs_reference_step_by_step():
    """A tiny VQ-VAE trained with the fused C++ kernels and with the reference gives the same
    losses step by step (fp32; k-means init, EMA updates and restarts all go through the ops)."""
    batches = _digits_batches(6)
    ref, sd_ref = _vqvae_losses("reference", batches)
    cpu, sd_cpu = _vqvae_losses("cpu", batches)
    torch.testing.assert_close(torch.tensor(cpu), torch.tensor(ref), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        sd_cpu["quantizer.codebook"], sd_ref["quantizer.codebook"], rtol=1e-3, atol=1e-4
    )


def test_reference_training_is_deterministic():
    batches = _digits_batches(3)
    a, _ = _vqvae_losses("reference", batches)
    b, _ = _vqvae_losses("reference", batches)
    assert a == b


# ------------------------------------------------------------------------- VQGAN mechanics


def _tiny_vqgan(**over):
    torch.manual_seed(0)
    cfg = vqgan_config("tiny", in_channels=1, **over)
    model = VQGAN(cfg, backend="reference").train()
    from models.perceptual import build_perceptual

    loss = VQGANLoss(model.config, build_perceptual("ssim")[0])
    return model, loss


def test_vqgan_adaptive_weight_is_finite_and_clamped():
    model, loss = _tiny_vqgan(lambda_max=10.0)
    x = _digits_batches(1)[0]
    recon, _, _ = model(x)
    last = model.last_layer_weight()
    nll = (recon - x).abs().mean()
    g = -loss.discriminator(recon).mean()
    lam = loss.adaptive_weight(nll, g, last)
    g_rec = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    expect = torch.clamp(g_rec / (g_gan + 1e-4), 0, 10.0)
    assert torch.isfinite(lam) and not lam.requires_grad
    torch.testing.assert_close(lam, expect)
    # A GAN loss with a vanishing gradient: λ would be ‖∇rec‖/1e-4; the clamp bounds it.
    zero_gan = 0.0 * last.sum()
    lam0 = loss.adaptive_weight(nll, zero_gan, last)
    assert torch.isfinite(lam0) and float(lam0) == 10.0


def test_vqgan_discriminator_off_before_disc_start_then_both_optimizers_step():
    model, loss = _tiny_vqgan(disc_start=2)
    opt_g, opt_d = make_vqgan_optimizers(model, loss)
    x = _digits_batches(1)[0]
    d0 = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}
    g0 = {k: v.clone() for k, v in model.state_dict().items() if "quantizer" not in k}
    for step in range(2):
        out = vqgan_train_step(model, loss, opt_g, opt_d, x, step)
        assert out["disc_factor"] == 0.0 and out["d_loss"] == 0.0 and out["lambda"] == 0.0
    # The discriminator neither stepped nor updated its BatchNorm statistics.
    for k, v in loss.discriminator.state_dict().items():
        assert torch.equal(v, d0[k]), k
    assert len(opt_d.state) == 0
    assert any(not torch.equal(v, g0[k]) for k, v in model.state_dict().items() if k in g0)

    g1 = {k: v.clone() for k, v in model.state_dict().items() if k in g0}
    out = vqgan_train_step(model, loss, opt_g, opt_d, x, 2)
    assert out["disc_factor"] == 1.0 and out["d_loss"] > 0.0 and out["lambda"] > 0.0
    assert len(opt_d.state) > 0 and len(opt_g.state) > 0
    assert any(not torch.equal(v, d0[k]) for k, v in loss.discriminator.state_dict().items())
    assert any(not torch.equal(v, g1[k]) for k, v in model.state_dict().items() if k in g1)


@pytest.mark.parametrize("norm,gan", [("batch", "hinge"), ("actnorm", "vanilla")])
def test_vqgan_short_toy_run_reconstruction_decreases(norm, gan):
    model, loss = _tiny_vqgan(disc_start=10, disc_norm=norm, gan_loss=gan, lr=2e-3)
    opt_g, opt_d = make_vqgan_optimizers(model, loss)
    x = _digits_batches(1, batch=32)[0]
    rec = [vqgan_train_step(model, loss, opt_g, opt_d, x, s)["rec_loss"] for s in range(20)]
    assert all(map(torch.isfinite, map(torch.tensor, rec)))
    assert sum(rec[-3:]) / 3 < 0.8 * sum(rec[:3]) / 3, rec


# ------------------------------------------------------------------------------ checkpoints


def test_atomic_save_crash_mid_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    old = {
        "format": ck.FORMAT,
        "version": ck.VERSION,
        "model_type": "vqvae",
        "config": {},
        "model": {"w": torch.arange(5.0)},
    }
    ck.atomic_save(old, path)

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")  # some bytes reach the temp file, then the "crash"
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({**old, "model": {"w": torch.zeros(5)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = ck.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind


class _Evil:
    ran = False

    def __reduce__(self):
        return (_set_ran, ())


def _set_ran():
    _Evil.ran = True
    return "pwned"


def test_safe_loading_never_executes_code(tmp_path):
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        torch.save(
            {
                "format": ck.FORMAT,
                "version": 1,
                "model_type": "vqvae",
                "config": {},
                "model": {},
                "x": _Evil(),
            },
            f,
            pickle_module=pickle,
        )
    with pytest.raises(ck.CheckpointError, match="safely"):
        models.load(path)
    assert _Evil.ran is False
    other = str(tmp_path / "other.pt")
    torch.save({"hello": torch.ones(1)}, other)
    with pytest.raises(ck.CheckpointError, match="not a vqkernels-models checkpoint"):
        models.load(other)
    with pytest.raises(FileNotFoundError):
        models.load(str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------------------ the CLI


def _cli(out, *extra, model="vqvae", dataset="digits", steps=3):
    argv = [
        "--model",
        model,
        "--dataset",
        dataset,
        "--config",
        "tiny",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--backend",
        "reference",
        "--quiet",
        "--eval-every",
        "0",
        *extra,
    ]
    return train(argv)


def test_cli_smoke_writes_outputs_and_model_round_trips(tmp_path):
    m = _cli(tmp_path)
    for name in ("checkpoint.pt", "metrics.json", "config.json", "reconstructions.png"):
        assert (tmp_path / name).is_file(), name
    disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "psnr",
        "ssim",
        "codebook_usage",
        "perplexity",
        "bits_per_image",
        "steps",
        "seconds",
        "backend",
        "perceptual",
    ):
        assert key in disk and key in m
    assert disk["steps"] == 3 and disk["backend"] == "reference" and disk["perceptual"] == "none"
    model = models.load(str(tmp_path / "checkpoint.pt"), backend="reference")
    assert not model.training and model.downsample == 2 and model.codebook_size == 32
    cfg = json.loads((tmp_path / "config.json").read_text())["model"]
    assert cfg == model.config
    x = load_dataset("digits", "eval")[:4]
    idx = model.encode(x)
    assert idx.shape == (4, 4, 4) and idx.dtype == torch.int64
    y = model.decode_indices(idx)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    recon, idx2, vq_loss = model(x)
    assert torch.equal(idx2, idx) and vq_loss.dtype == torch.float32 and vq_loss.dim() == 0


def test_cli_vqgan_on_a_folder_records_perceptual_choice(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        arr = (torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"im{i}.png")
    out = tmp_path / "run"
    m = _cli(
        out,
        "--image-size",
        "8",
        "--perceptual",
        "auto",
        "--disc-start",
        "1",
        model="vqgan",
        dataset=str(folder),
        steps=2,
    )
    assert m["perceptual"] in ("ssim", "lpips", "stlpips")
    ckpt = ck.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["perceptual"] == m["perceptual"]
    assert (
        json.loads((out / "config.json").read_text())["train"]["perceptual_resolved"]
        == m["perceptual"]
    )
    assert "discriminator" in ckpt["train"] and set(ckpt["train"]["optimizers"]) == {"g", "d"}


def test_resume_continues_exactly(tmp_path):
    """A 5-step run interrupted after 3 steps and resumed equals an uninterrupted 5-step run
    (the cosine learning-rate schedule included)."""
    a, b = tmp_path / "a", tmp_path / "b"
    _cli(a, "--stop-after", "3", steps=5)
    resumed = _cli(a, "--resume", steps=5)
    straight = _cli(b, steps=5)
    assert resumed["steps"] == 5 and resumed["steps_this_run"] == 2
    assert resumed["final_loss"] == straight["final_loss"]
    sa = ck.load_checkpoint(str(a / "checkpoint.pt"))["model"]
    sb = ck.load_checkpoint(str(b / "checkpoint.pt"))["model"]
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k


def test_cli_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _cli(tmp_path / "none", "--resume")
    with pytest.raises(ValueError, match="unknown VQ-VAE config key"):
        _cli(tmp_path / "x", "--set", "hiddden=3")
    with pytest.raises(ValueError, match="folder"):
        _cli(tmp_path / "y", dataset=str(tmp_path / "does-not-exist"))


# ---------------------------------------------------------------------------- data & metrics


def test_photo_splits_are_disjoint_and_eval_tiles_fixed():
    assert not set(PHOTOS_TRAIN) & set(PHOTOS_EVAL)
    names = {n for _, n in PHOTOS_EVAL}
    assert names == {"flower.jpg", "chelsea.png"}
    g1, g2 = eval_groups("photos"), eval_groups("photos")
    assert set(g1) == {"flower", "chelsea"}
    for k in g1:
        assert torch.equal(g1[k], g2[k]) and g1[k].shape[1:] == (3, 32, 32)
    s = load_dataset("photos", "train", image_size=16)
    a = s.sample(4, torch.Generator().manual_seed(3))
    b = s.sample(4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 3, 16, 16) and s.channels == 3
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_digits_hold_out_last_297():
    ev = load_dataset("digits", "eval")
    tr = load_dataset("digits", "train")
    assert ev.shape == (297, 1, 8, 8) and tr.data.shape == (1500, 1, 8, 8)
    from sklearn.datasets import load_digits

    last = torch.from_numpy(load_digits().images[-297:]).float() / 16
    assert torch.equal(ev[:, 0], last)


def test_metrics_known_values():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.full((2, 1, 8, 8), 0.1)
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert psnr(a, a) == pytest.approx(100.0)
    x = torch.rand(2, 3, 16, 16)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5) and ssim(x, 1 - x) < 0.5
    idx = torch.arange(16).reshape(1, 4, 4)
    assert perplexity(idx, 16) == pytest.approx(16.0)
    assert perplexity(torch.zeros(1, 4, 4, dtype=torch.long), 16) == pytest.approx(1.0)
    assert codebook_usage(idx, 32) == 0.5
    assert bits_per_image(idx, 512) == 9 * 16 and bits_per_image(idx, 500) == 9 * 16
    with pytest.raises(ValueError):
        codebook_usage(idx, 8)
