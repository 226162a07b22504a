"""The picture a user sees: whole held-out photos (models.holdout), JPEG at equal bpp and the
panel layout (models.figures), the colour augmentation of the photo sampler, and the training
CLI's whole-image colour metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.data import CropSampler, hue_rotate
from models.figures import codec_at_quality, jpeg_at_bpp, reconstruction_figure, save_panels
from models.holdout import pad_to_multiple, reconstruct_whole, whole_image_metrics
from models.vqvae import VQVAE, vqvae_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _photo(h=37, w=50, seed=0):
    """A smooth colour image (JPEG-friendly) with odd sizes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h).view(1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w)
    base = torch.stack(
        [0.2 + 0.6 * x[0].expand(h, w), 0.3 + 0.4 * y[0].expand(h, w), 0.5 + 0 * x[0].expand(h, w)]
    )
    return (base + 0.03 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


def _model():
    torch.manual_seed(0)
    m = VQVAE(vqvae_config("tiny"), backend="reference")
    m.train()
    m(torch.rand(4, 3, 16, 16))
    return m.eval()


def test_jpeg_at_bpp_picks_the_highest_quality_that_fits():
    img = _photo()
    _, full = codec_at_quality(img, "JPEG", 95)
    target = full / 2
    dec, bpp, q = jpeg_at_bpp(img, target)
    assert dec.shape == img.shape and bpp <= target and 1 <= q < 95
    assert codec_at_quality(img, "JPEG", q + 1)[1] > target
    # A budget below quality 1: quality 1, with its real (larger) bpp reported.
    _, bpp1, q1 = jpeg_at_bpp(img, 1e-3)
    assert q1 == 1 and bpp1 > 1e-3
    dec_w, bpp_w = codec_at_quality(img, "WEBP", 50)
    assert dec_w.shape == img.shape and bpp_w > 0


def test_whole_image_reconstruction_pads_and_crops():
    model = _model()
    img = _photo()
    padded = pad_to_multiple(img, 4)
    assert padded.shape == (3, 40, 52) and torch.equal(padded[:, :37, :50], img)
    rec, idx = reconstruct_whole(model, img)
    assert rec.shape == img.shape and idx.shape == (10, 13)
    direct = model.decode_indices(model.encode(padded.unsqueeze(0)))[0, :, :37, :50].clamp(0, 1)
    torch.testing.assert_close(rec, direct)
    met, recs = whole_image_metrics(model, {"a": img, "b": _photo(20, 24, 1)})
    assert met["a"]["bpp_fixed"] == pytest.approx(5 * 10 * 13 / (37 * 50))  # K=32: 5 bits
    for key in ("psnr", "ssim", "delta_e76", "delta_e2000", "bias_rgb"):
        assert key in met["a"]
    assert met["mean"]["delta_e76"] == pytest.approx(
        (met["a"]["delta_e76"] + met["b"]["delta_e76"]) / 2
    )
    assert set(recs) == {"a", "b"}


def test_figure_shows_whole_photos_side_by_side(tmp_path):
    from PIL import Image

    model = _model()
    photos = {"a": _photo(), "b": _photo(20, 24, 1)}
    path = str(tmp_path / "fig.png")
    jpeg = reconstruction_figure(model, photos, path)
    assert set(jpeg) == {"a", "b"} and all(
        v["bpp"] > 0 and math.isfinite(v["psnr"]) for v in jpeg.values()
    )
    with Image.open(path) as im:
        w, h = im.size
    assert w >= 3 * 50 and h >= 37 + 20  # three whole panels per row, two rows (+ zoom rows)
    # save_panels: captions and zoom rows add height; no zoom -> smaller.
    rows = [[(photos["a"], ["x"]), (photos["a"], ["y", "z"])]]
    save_panels(rows, str(tmp_path / "p.png"))
    save_panels(rows, str(tmp_path / "q.png"), zoom=[(0, 0, 16)], zoom_scale=2)
    with Image.open(tmp_path / "p.png") as p, Image.open(tmp_path / "q.png") as q:
        assert p.size[0] >= 2 * 50 and q.size[1] > p.size[1] + 2 * 16


def test_colour_augmentation_changes_only_colours():
    x = torch.rand(3, 6, 6) * 0.5 + 0.25
    torch.testing.assert_close(hue_rotate(x, 2 * math.pi / 3), x[[2, 0, 1]])
    torch.testing.assert_close(hue_rotate(x, 0.7).sum(0), x.sum(0))  # grey axis kept
    grey = torch.full((3, 2, 2), 0.4)
    torch.testing.assert_close(hue_rotate(grey, 1.1), grey)
    imgs = [
        torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(i)) * 0.5 + 0.25
        for i in range(2)
    ]
    plain = CropSampler(imgs, 16).sample(8, torch.Generator().manual_seed(3))
    aug = CropSampler(imgs, 16, colour_aug=1.0).sample(8, torch.Generator().manual_seed(3))
    # Same crops and flips (the colour draws come after them); brightness R+G+B unchanged.
    torch.testing.assert_close(aug.sum(1), plain.sum(1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(aug, plain)
    with pytest.raises(ValueError, match="colour_aug"):
        CropSampler(imgs, 16, colour_aug=1.5)


def test_cli_reports_whole_image_colour_metrics(tmp_path):
    from PIL import Image

    from models.train import train

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        arr = (_photo(30, 36, i).permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(arr).save(folder / f"im{i}.png")
    out = tmp_path / "run"
    m = train(
        [
            "--model",
            "vqvae",
            "--dataset",
            str(folder),
            "--out",
            str(out),
            "--config",
            "tiny",
            "--steps",
            "2",
            "--image-size",
            "16",
            "--backend",
            "reference",
            "--quiet",
            "--eval-every",
            "0",
            "--colour-aug",
            "0.5",
        ]
    )
    disk = json.loads((out / "metrics.json").read_text())
    assert disk["whole_image"]["im1"]["delta_e76"] == pytest.approx(
        m["whole_image"]["im1"]["delta_e76"]
    )
    assert len(disk["whole_image"]["im1"]["bias_rgb"]) == 3 and "delta_e76" in disk
    assert disk["jpeg_same_bpp"]["im1"]["bpp"] > 0
    assert (out / "reconstructions.png").is_file()


def test_comparison_figure_has_a_panel_per_model(tmp_path):
    from PIL import Image

    from models.figures import comparison_figure

    a, b = _model(), _model()
    photos = {"a": _photo()}
    out = comparison_figure({"A": a, "B": b}, photos, str(tmp_path / "c.png"))
    assert set(out) == {"A", "B", "JPEG"} and out["A"]["a"]["psnr"] == out["B"]["a"]["psnr"]
    assert out["JPEG"]["a"]["bpp"] <= out["A"]["a"]["bpp_fixed"] or out["JPEG"]["a"]["quality"] == 1
    with Image.open(tmp_path / "c.png") as im:
        assert im.size[0] >= 4 * 50  # original + 2 models + JPEG, whole
