"""models.compress: bit packing, round trip through the file format and the CLI, and clear errors
for corrupt, truncated and mismatched files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.compress import (
    CompressError,
    decode_bytes,
    encode_images,
    main,
    pack_indices,
    unpack_indices,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from more threads, and on a shared 2-core machine OpenMP threads
    competing for the cores make each step many times slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("bits", [1, 3, 5, 9, 12])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 2**bits, size=37)
    data = pack_indices(v, bits)
    assert len(data) == (37 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_indices(data, 37, bits), v)
    with pytest.raises(ValueError):
        pack_indices(np.array([2**bits]), bits)


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 13, 10, generator=g), torch.rand(3, 8, 12, generator=g)]


def test_round_trip_matches_direct_decode_and_odd_sizes(tiny_vqvae):
    model = tiny_vqvae()
    imgs = _images()
    data, reports = encode_images(model, imgs, ["a.png", "b.png"])
    out = decode_bytes(model, data)
    assert [n for n, _ in out] == ["a.png", "b.png"]
    for (_, rec), img, rep in zip(out, imgs, reports):
        assert rec.shape == img.shape
        # direct path: pad to a multiple of 4, encode, decode, crop
        x = torch.nn.functional.pad(
            img.unsqueeze(0), (0, (-img.shape[2]) % 4, 0, (-img.shape[1]) % 4), mode="replicate"
        )
        direct = model.decode_indices(model.encode(x))[0, :, : img.shape[1], : img.shape[2]]
        torch.testing.assert_close(rec, direct)
        h, w = -(-img.shape[1] // 4), -(-img.shape[2] // 4)
        assert rep["bits"] == 5 * h * w and rep["bpp"] == pytest.approx(
            rep["bits"] / (13 * 10) if rep["name"] == "a.png" else rep["bits"] / 96
        )


def test_corrupt_truncated_and_mismatched_files_fail_clearly(tiny_vqvae):
    model = tiny_vqvae()
    data, _ = encode_images(model, _images(), ["a.png", "b.png"])
    bad = bytearray(data)
    bad[-8] ^= 0x01  # a payload bit
    with pytest.raises(CompressError, match="corrupt"):
        decode_bytes(model, bytes(bad))
    with pytest.raises(CompressError, match="truncated"):
        decode_bytes(model, data[:-3])
    with pytest.raises(CompressError, match="magic"):
        decode_bytes(model, b"PNG!" + data[4:])
    with pytest.raises(CompressError, match="different model"):
        decode_bytes(tiny_vqvae(seed=1), data)


def test_cli_encode_decode(tmp_path, capsys, write_model_checkpoint, tiny_vqvae):
    from PIL import Image

    model = tiny_vqvae()
    ckpt = tmp_path / "checkpoint.pt"
    write_model_checkpoint(model, str(ckpt))
    paths = []
    for i, img in enumerate(_images()):
        p = tmp_path / f"img{i}.png"
        Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(p)
        paths.append(str(p))
    f = tmp_path / "codes.vqc"
    assert (
        main(
            ["encode", "--checkpoint", str(ckpt), *paths, "--out", str(f), "--backend", "reference"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bpp" in out and "PSNR" in out
    dec = tmp_path / "dec"
    assert (
        main(
            [
                "decode",
                "--checkpoint",
                str(ckpt),
                str(f),
                "--out",
                str(dec),
                "--originals",
                *paths,
                "--backend",
                "reference",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "PSNR" in out
    files = sorted(p.name for p in dec.iterdir())
    assert files == ["000_img0.png", "001_img1.png"]
    with Image.open(dec / files[0]) as im:
        assert im.size == (10, 13)
    f.write_bytes(f.read_bytes()[:-1])
    assert main(["decode", "--checkpoint", str(ckpt), str(f), "--out", str(dec)]) == 2
    assert "truncated" in capsys.readouterr().err
