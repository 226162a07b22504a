"""Perceptual losses: never download, clear errors for missing files, our VGG16 stacks load the
LPIPS (torchvision layout) and ST-LPIPS (stlpips-pytorch wheel layout) weight files."""

from __future__ import annotations

import pytest
import torch

from models import perceptual as P


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from more threads, and on a shared 2-core machine OpenMP threads
    competing for the cores make each step many times slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_weights(monkeypatch):
    for env in ("VQKERNELS_STLPIPS_PATH", "VQKERNELS_VGG16_PATH", "VQKERNELS_LPIPS_HEADS_PATH"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(P, "_package_file", lambda *a: None)


def test_weight_free_losses(no_weights):
    x = torch.rand(2, 3, 16, 16)
    loss, kind = P.build_perceptual("auto")
    assert kind == "ssim"
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1).requires_grad_()
    v = loss(y, x)
    v.backward()
    assert float(v.detach()) > 0.1 and torch.isfinite(y.grad).all()
    zero, kind = P.build_perceptual("none")
    assert kind == "none" and float(zero(y, x)) == 0.0
    with pytest.raises(ValueError, match="perceptual must be one of"):
        P.build_perceptual("vgg")


def test_missing_files_are_clear_errors_not_downloads(no_weights, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="VQKERNELS_STLPIPS_PATH"):
        P.build_perceptual("stlpips")
    with pytest.raises(FileNotFoundError, match="VQKERNELS_VGG16_PATH"):
        P.build_perceptual("lpips")
    monkeypatch.setenv("VQKERNELS_STLPIPS_PATH", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.build_perceptual("stlpips")


def _heads():
    return {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }


def test_stlpips_layout_loads_with_our_network(no_weights, tmp_path, monkeypatch):
    torch.manual_seed(0)
    feats = P.VGG16Features(anti_aliased=True)
    sd = {
        "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
        "scaling_layer.scale": torch.ones(1, 3, 1, 1),
    }
    # the wheel's file names layers net.slice{s}.{index in the full stack}.*
    bounds = [(0, 4), (4, 10), (10, 18), (18, 26), (26, 34)]
    for k, v in feats.state_dict().items():
        idx = int(k.split(".")[1])
        s = next(i for i, (lo, hi) in enumerate(bounds) if lo <= idx < hi) + 1
        sd[f"net.slice{s}.{k.split('.', 1)[1]}"] = v
    sd.update(_heads())
    path = tmp_path / "vgg_shift_tolerant.pth"
    torch.save(sd, path)
    monkeypatch.setenv("VQKERNELS_STLPIPS_PATH", str(path))
    assert P.resolve_perceptual("auto") == "stlpips"
    loss, kind = P.build_perceptual("auto")
    assert kind == "stlpips"
    x = torch.rand(2, 3, 32, 32)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    y = torch.rand(2, 1, 8, 8)  # grey + tiny: repeated to RGB and upsampled
    assert float(loss(y, torch.rand(2, 1, 8, 8))) > 0
    assert all(not p.requires_grad for p in loss.parameters())
    # a file with another layout is rejected, not half-loaded
    torch.save({"net.slice1.0.weight": torch.zeros(1), **_heads()}, path)
    with pytest.raises((ValueError, RuntimeError)):
        P.build_perceptual("stlpips")


def test_lpips_torchvision_layout_loads(no_weights, tmp_path, monkeypatch):
    torch.manual_seed(0)
    feats = P.VGG16Features(anti_aliased=False)
    vgg = tmp_path / "vgg16.pth"
    heads = tmp_path / "vgg_heads.pth"
    torch.save({**feats.state_dict(), "classifier.0.weight": torch.zeros(2, 2)}, vgg)
    torch.save(_heads(), heads)
    monkeypatch.setenv("VQKERNELS_VGG16_PATH", str(vgg))
    monkeypatch.setenv("VQKERNELS_LPIPS_HEADS_PATH", str(heads))
    assert P.resolve_perceptual("auto") == "lpips"
    loss, _ = P.build_perceptual("lpips")
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    d = loss(a, b)
    assert d.shape == () and float(d) > 0 and float(loss(a, a)) == pytest.approx(0.0, abs=1e-6)
