"""Tests for models/compare.py: the sharpness measure, the generated plain-word differences, and
the whole comparison end to end in its tiny configuration (digits, a few steps per model)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from models import compare as C  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two on the shared 2-core machine
    (no spin-waiting against other processes); restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.ones(x.shape[1], 1, 3, 3) / 9.0
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


def test_gradient_magnitude_of_known_ramps():
    x = torch.arange(5.0).repeat(5, 1)[None, None] / 10  # luma rises 0.1 per column
    g = C.gradient_magnitude(x)
    assert g.shape == (1, 4, 4)
    torch.testing.assert_close(g, torch.full((1, 4, 4), 0.1))
    rgb = torch.stack([x[0, 0], x[0, 0].T, torch.zeros(5, 5)])[None]  # R: x-ramp, G: y-ramp
    gx, gy = 0.299 * 0.1, 0.587 * 0.1
    torch.testing.assert_close(
        C.gradient_magnitude(rgb), torch.full((1, 4, 4), (gx**2 + gy**2) ** 0.5)
    )


def test_sharpness_detects_blur_and_exaggeration():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    same = C.sharpness(x, x)
    assert same["grad_error"] == 0.0 and same["grad_ratio"] == pytest.approx(1.0)
    blurred = C.sharpness(_blur(x), x)
    assert blurred["grad_ratio"] < 0.7 and blurred["grad_error"] > 0.05
    # More blur: lower ratio, larger error.
    more = C.sharpness(_blur(_blur(x)), x)
    assert more["grad_ratio"] < blurred["grad_ratio"] and more["grad_error"] > blurred["grad_error"]
    # Exaggerated contrast is not "sharper = better": the error grows, the ratio exceeds 1.
    loud = C.sharpness((0.5 + 1.5 * (x - 0.5)), x)
    assert loud["grad_ratio"] == pytest.approx(1.5, rel=1e-4) and loud["grad_error"] > 0.05


def _m(**kw):
    base = dict(
        psnr=25.0,
        ssim=0.80,
        perceptual=0.20,
        grad_error=0.050,
        grad_ratio=0.80,
        codebook_usage=0.90,
        perplexity=300.0,
        steps_per_second=10.0,
    )
    base.update(kw)
    return base


def test_differences_are_computed_from_the_numbers():
    a = _m()
    b = _m(
        psnr=23.8,
        ssim=0.7512,
        perceptual=0.15,
        grad_error=0.040,
        grad_ratio=0.95,
        codebook_usage=0.60,
        perplexity=150.0,
        steps_per_second=4.0,
    )
    d = C.describe_differences(a, b)
    text = "\n".join(d["sentences"])
    assert "VQGAN's held-out PSNR is 1.20 dB lower than VQ-VAE's (23.80 dB vs 25.00 dB)" in text
    assert "VQGAN's held-out SSIM is 0.0488 lower" in text
    assert "perceptual distance is 25% lower" in text and "lower is better" in text
    assert "gradient-magnitude error is 20% lower" in text
    assert "30.0 percentage points lower" in text
    assert "code perplexity is 50% lower" in text
    assert "VQGAN trains 2.5x slower than VQ-VAE (4.00 steps/s vs 10.00 steps/s)" in text
    assert (
        "VQ-VAE's reconstructions carry 80% of the originals' gradient energy (blurrier than the "
        "originals), VQGAN's 95% (blurrier than the originals); VQGAN is closer to 100%." in text
    )
    assert d["winners"]["psnr"] == "VQ-VAE" and d["winners"]["perceptual"] == "VQGAN"
    assert d["winners"]["steps_per_second"] == "VQ-VAE"
    assert d["summary"].startswith(
        "On the 4 reconstruction-quality measures, VQ-VAE is better on 2"
    )
    # Swap the roles: every direction flips.
    flipped = "\n".join(C.describe_differences(b, a)["sentences"])
    assert "VQGAN's held-out PSNR is 1.20 dB higher than VQ-VAE's (25.00 dB vs 23.80 dB)" in flipped
    assert "VQGAN trains 2.5x faster" in flipped


def test_differences_call_tiny_gaps_a_tie_and_skip_missing():
    a = _m()
    b = _m(psnr=25.01, perceptual=0.2001)
    d = C.describe_differences(a, b)
    text = "\n".join(d["sentences"])
    assert "held-out PSNR is about the same as VQ-VAE's (25.01 dB vs 25.00 dB)" in text
    assert "perceptual distance is about the same" in text
    assert d["winners"]["psnr"] is None
    assert "about the same on 4" in d["summary"]
    d = C.describe_differences({"psnr": 20.0}, {"psnr": 21.0})
    assert len(d["sentences"]) == 1 and "On the 1 reconstruction-quality" in d["summary"]
    r = C._ratio_sentence(1.3, 0.8, "A", "B")
    assert "A's reconstructions carry 130%" in r and "(more contrasted than the originals)" in r
    assert r.endswith("B is closer to 100%.")
    assert C._ratio_sentence(1.1, 0.9, "A", "B").endswith("both are equally close.")


def test_gan_note_says_whether_the_discriminator_ran():
    never = C._gan_note({"disc_start": 2000, "steps": 900, "train_perceptual": "ssim"})
    assert "never switched on" in never and "2,000" in never and "900" in never
    on = C._gan_note({"disc_start": 100, "steps": 400, "train_perceptual": "ssim"})
    assert "on for the last 300 (75%)" in on


def test_pick_tiles_spreads_over_sources():
    groups = {"a": torch.zeros(10, 1, 2, 2), "b": torch.zeros(3, 1, 2, 2)}
    idx = C._pick_tiles(groups, 6)
    assert idx.tolist() == [0, 4, 9, 10, 11, 12]


# --------------------------------------------------------------------- end to end (tiny)


def test_tiny_comparison_end_to_end(tmp_path):
    from PIL import Image

    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--tiny", "--steps", "6", "--prior-steps", "8", "--minutes", "10",
            "--prior-minutes", "10",
            "--train-crops", "256", "--samples", "8", "--perceptual", "ssim",
            "--backend", "reference"]  # fmt: skip
    report = C.main(argv)
    files = set(os.listdir(out))
    assert {"report.md", "metrics.json", "reconstructions.png", "samples_vqvae.png",
            "samples_vqgan.png"} <= files  # fmt: skip
    s, models = report["setup"], report["models"]
    assert s["dataset"] == "digits" and s["perceptual"] == "ssim"
    for kind in ("vqvae", "vqgan"):
        m = models[kind]
        assert m["steps"] == 6
        assert 0 < m["psnr"] < 100 and -1 <= m["ssim"] <= 1 and m["perceptual"] >= 0
        assert 0 < m["codebook_usage"] <= 1 and 1 <= m["perplexity"] <= s["codebook_size"]
        assert m["bits_per_image"] == 5 * s["latent_grid"][0] * s["latent_grid"][1]  # K = 32
        assert m["prior_bits_per_index"] > 0 and m["steps_per_second"] > 0
        assert m["prior_steps"] == 8
    text = (out / "report.md").read_text()
    # The report quotes the measured numbers, not canned ones.
    assert f"{models['vqvae']['psnr']:.2f}" in text and f"{models['vqgan']['psnr']:.2f}" in text
    assert "| load average while training (start → end) |" in text
    # VQGAN tiny: discriminator from step 5, 6 steps run -> on for the last one.
    assert "so the adversarial loss was on for the last 1 (17%) of them" in text
    for sentence in report["differences"]["sentences"]:
        assert sentence in text
    assert json.loads((out / "metrics.json").read_text())["models"]["vqgan"]["psnr"] == (
        pytest.approx(models["vqgan"]["psnr"])
    )
    with Image.open(out / "reconstructions.png") as im:
        # three rows (originals, VQ-VAE, VQGAN) of 8x8 digits magnified 4x, 2-pixel padding
        assert im.size[1] == 2 + 3 * (32 + 2)
    # --resume reuses the finished runs: same numbers, no retraining.
    again = C.main(argv + ["--resume"])
    assert again["models"]["vqvae"]["psnr"] == pytest.approx(models["vqvae"]["psnr"])
    assert again["models"]["vqgan"]["prior_bits_per_index"] == pytest.approx(
        models["vqgan"]["prior_bits_per_index"]
    )
