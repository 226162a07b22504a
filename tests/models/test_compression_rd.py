"""benchmarks.compression_rd: the equal-bpp comparison and its plain-words verdicts come from the
numbers (synthetic rows here; the full benchmark trains models for minutes)."""

from __future__ import annotations

import pytest

from benchmarks import compression_rd as rd


def _rows():
    rows = []
    for q, bpp, p in ((10, 0.2, 28.0), (50, 0.6, 32.0), (90, 1.6, 40.0)):
        rows.append({"codec": "JPEG", "photo": "x", "setting": f"q={q}", "bpp": bpp, "psnr": p,
                     "ssim": p / 50, "delta_e76": 40 / p})  # fmt: skip
        rows.append({"codec": "WebP", "photo": "x", "setting": f"q={q}", "bpp": bpp / 2,
                     "psnr": p, "ssim": p / 50, "delta_e76": 40 / p})  # fmt: skip
    rows.append({"codec": "VQ fixed", "photo": "x", "setting": "K512-f4", "bpp": 0.4,
                 "psnr": 31.0, "ssim": 0.6, "delta_e76": 2.0})  # fmt: skip
    rows.append({"codec": "VQ + prior", "photo": "x", "setting": "K512-f4", "bpp": 0.1,
                 "psnr": 31.0, "ssim": 0.6, "delta_e76": 2.0})  # fmt: skip
    return rows


def test_interpolation_and_range():
    assert rd._interp([(0.0, 0.0), (1.0, 10.0)], 0.25) == pytest.approx(2.5)
    assert rd._interp([(1.0, 10.0), (0.0, 0.0)], 1.0) == pytest.approx(10.0)
    assert rd._interp([(0.0, 0.0), (1.0, 10.0)], 1.5) is None


def test_equal_bpp_verdicts_follow_the_numbers():
    cmp = rd.compare_at_equal_bpp(_rows())
    fixed, coded = cmp
    assert fixed["JPEG_psnr"] == pytest.approx(30.0)  # halfway between 28 dB and 32 dB
    assert fixed["WebP_psnr"] == pytest.approx(33.6)  # WebP: 32 dB at 0.3, 40 dB at 0.8 bpp
    assert coded["JPEG_psnr"] is None and coded["WebP_psnr"] == pytest.approx(28.0)
    words = rd._words(cmp)
    assert "vs JPEG wins by 1.0 dB" in words[0] and "vs WebP loses by 2.6 dB" in words[0]
    assert "JPEG cannot go this low" in words[1]
    summary = rd._summary(cmp)
    assert (
        "1 lie below the smallest JPEG file and 0 below the smallest WebP" in summary
        and "saves 75–75%" in summary
    )
