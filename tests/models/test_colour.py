"""models.colour: CIE Lab, ΔE (CIE76, CIEDE2000) and per-channel bias against known values."""

from __future__ import annotations

import math

import pytest
import torch

from models.colour import (
    channel_bias,
    colour_report,
    delta_e76,
    delta_e2000,
    delta_e2000_lab,
    rgb_to_lab,
)


def _px(*rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)


@pytest.mark.parametrize(
    "rgb, lab",
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),  # D65 white
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),  # sRGB primaries, standard values
        ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
        ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
        ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),  # mid grey: neutral, L* of 21.4% luminance
    ],
)
def test_lab_of_known_colours(rgb, lab):
    got = rgb_to_lab(_px(*rgb)).flatten().tolist()
    assert got == pytest.approx(lab, abs=2e-3)


# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula", table 1 (a selection
# that covers the hue wrap-around, zero-chroma and large-difference branches).
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, -1.3802, -84.2814), (50.0, 0.0, -82.7485), 1.0000),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0011), 7.2195),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
]


@pytest.mark.parametrize("lab1, lab2, expected", SHARMA)
def test_ciede2000_reference_pairs(lab1, lab2, expected):
    a = torch.tensor(lab1, dtype=torch.float64).view(3, 1, 1)
    b = torch.tensor(lab2, dtype=torch.float64).view(3, 1, 1)
    assert float(delta_e2000_lab(a, b)) == pytest.approx(expected, abs=1e-4)
    assert float(delta_e2000_lab(b, a)) == pytest.approx(expected, abs=1e-4)  # symmetric


def test_delta_e76_is_lab_distance_and_batched():
    red, green = _px(1, 0, 0), _px(0, 1, 0)
    expected = math.dist((53.2408, 80.0925, 67.2032), (87.7347, -86.1827, 83.1793))
    assert float(delta_e76(red, green)) == pytest.approx(expected, abs=1e-2)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 5, 7, generator=g), torch.rand(2, 3, 5, 7, generator=g)
    de = delta_e76(a, b)
    assert de.shape == (2, 5, 7) and de.dtype == torch.float64
    assert float(delta_e76(a, a).abs().max()) == 0.0
    assert delta_e2000(a, b).shape == (2, 5, 7)
    assert float(delta_e2000(a, a).abs().max()) < 1e-6


def test_channel_bias_and_report():
    g = torch.Generator().manual_seed(1)
    orig = torch.rand(3, 16, 16, generator=g) * 0.5 + 0.25  # away from the clamp at 0 and 1
    shift = torch.tensor([11.0, -14.0, 3.0]).view(3, 1, 1) / 255.0
    rec = orig + shift
    assert channel_bias(rec, orig) == pytest.approx([11.0, -14.0, 3.0], abs=1e-3)
    rep = colour_report(rec, orig)
    assert rep["bias_rgb"] == pytest.approx([11.0, -14.0, 3.0], abs=1e-3)
    assert rep["delta_e76"] > 2.3 and rep["delta_e2000"] > 0  # a visible shift
    assert rep["delta_e76_p95"] >= rep["delta_e76"] * 0.9
    grey = colour_report(rec[:1], orig[:1])
    assert set(grey) == {"bias_rgb"} and grey["bias_rgb"] == pytest.approx([11.0], abs=1e-3)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="a and b"):
        delta_e76(torch.rand(3, 4, 4), torch.rand(3, 4, 5))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        delta_e76(torch.rand(4, 4, 4), torch.rand(4, 4, 4))
    with pytest.raises(TypeError, match="float"):
        rgb_to_lab(torch.zeros(3, 2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="a must be"):
        channel_bias([1, 2, 3], torch.rand(3, 2, 2))


def test_lab_loss_is_mean_squared_delta_e_with_finite_gradients():
    from models.colour import lab_loss

    g = torch.Generator().manual_seed(2)
    rec = torch.rand(2, 3, 6, 5, generator=g)
    rec[0, :, 0, 0] = 0.0  # black: the cube root's steep end
    rec.requires_grad_(True)
    target = torch.rand(2, 3, 6, 5, generator=g)
    loss = lab_loss(rec, target)
    expected = delta_e76(rec.detach(), target).pow(2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    loss.backward()
    assert torch.isfinite(rec.grad).all() and rec.grad.abs().sum() > 0
    assert float(lab_loss(target, target)) == 0.0
