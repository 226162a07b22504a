"""models.entropy_coding and ``models.compress --prior``: the range coder round-trips exactly,
costs close to the ideal −log2 p, codes a trained prior's predictable grids shorter than
fixed-length indices, and corrupt / truncated / wrong-prior files fail clearly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import entropy_coding as ec
from models import prior as P
from models.compress import CompressError, decode_bytes, encode_images, main, read_header


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------- the range coder


@pytest.mark.parametrize("k, alpha", [(1, 1.0), (2, 0.3), (17, 0.1), (512, 0.05), (700, 1.0)])
def test_round_trip_on_random_distributions(k, alpha):
    rng = np.random.default_rng(k)
    n = 1500
    probs = rng.dirichlet(np.full(k, alpha), size=n)
    sym = np.array([rng.choice(k, p=p) for p in probs])
    freqs = ec.quantize_frequencies(probs)
    data = ec.encode_symbols(sym, freqs).finish()
    out = ec.decode_symbols(ec.RangeDecoder(data), freqs)
    np.testing.assert_array_equal(out, sym)
    # Cost: the ideal −Σ log2 p plus the frequency rounding (<1% for these tables) and the flush.
    ideal_bytes = -np.log2(probs[np.arange(n), sym]).sum() / 8
    assert len(data) <= 1.01 * ideal_bytes + 8
    assert len(data) >= ideal_bytes * 0.95 - 1


def test_extreme_tables_and_carries():
    # Near-certain symbols (tiny intervals for the others) and the least likely symbol, mixed:
    # exercises renormalisation and carry propagation through runs of 0xFF bytes.
    k = 300
    rng = np.random.default_rng(5)
    probs = np.full((4000, k), 1e-12)
    probs[np.arange(4000), rng.integers(0, k, 4000)] = 1.0
    probs /= probs.sum(1, keepdims=True)
    freqs = ec.quantize_frequencies(probs)
    assert (freqs.sum(1) == ec.FREQ_TOTAL).all() and freqs.min() == 1
    sym = np.where(rng.random(4000) < 0.9, probs.argmax(1), rng.integers(0, k, 4000))
    data = ec.encode_symbols(sym, freqs).finish()
    np.testing.assert_array_equal(ec.decode_symbols(ec.RangeDecoder(data), freqs), sym)


def test_quantize_frequencies_contract():
    p = np.array([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]])
    f = ec.quantize_frequencies(p, total=1000)
    assert (f.sum(1) == 1000).all() and f.min() >= 1
    # 1 + floor(p * 997) each, the remainder to the most probable symbol (lowest index on ties).
    np.testing.assert_array_equal(f, [[500, 499, 1], [334, 333, 333], [1, 1, 998]])
    np.testing.assert_array_equal(f, ec.quantize_frequencies(p.copy(), total=1000))
    with pytest.raises(ValueError, match="K < total"):
        ec.quantize_frequencies(np.full((1, 8), 1 / 8), total=8)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        ec.quantize_frequencies(np.ones(4) / 4)


def test_truncated_stream_is_a_clear_error():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(64), size=400)
    freqs = ec.quantize_frequencies(probs)
    sym = probs.argmin(1)  # unlikely symbols: many bytes
    data = ec.encode_symbols(sym, freqs).finish()
    with pytest.raises(ec.CodingError, match="ended early"):
        ec.decode_symbols(ec.RangeDecoder(data[: len(data) // 2]), freqs)


# --------------------------------------------------------------------------- with a prior

K, TH, TW = 16, 3, 4  # prior grid 3x4 (non-square: catches h/w mix-ups)


def _toy_grids(n: int, seed: int) -> torch.Tensor:
    """Predictable grids: a random first code, then +1 (mod K) along the tile's raster order."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, K, (n, 1), generator=g)
    return ((start + torch.arange(TH * TW)) % K).reshape(n, TH, TW)


@pytest.fixture(scope="module")
def trained_prior(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior")
    P.run_training(
        out,
        _toy_grids(512, 0),
        None,
        K,
        (TH, TW),
        steps=60,
        config="tiny",
        batch_size=32,
        lr=3e-3,
        progress=False,
    )
    return P.load_prior(out / "prior.pt")


def test_stepper_matches_teacher_forced_forward(trained_prior):
    idx = _toy_grids(5, 3).reshape(5, -1)
    with torch.no_grad():
        ref = trained_prior(idx).double().softmax(-1)
    st = ec.PriorStepper(trained_prior, 5)
    got = []
    for t in range(TH * TW):
        got.append(torch.from_numpy(st.probs()))
        st.push(idx[:, t])
    torch.testing.assert_close(torch.stack(got, 1), ref, atol=1e-5, rtol=1e-4)


def test_trained_prior_codes_predictable_grids_shorter(trained_prior):
    # A 2x3 arrangement of predictable tiles: a 6x12 grid.
    tiles = _toy_grids(6, 7).reshape(2, 3, TH, TW)
    grid = tiles.permute(0, 2, 1, 3).reshape(2 * TH, 3 * TW)
    data = ec.encode_grid(trained_prior, grid)
    np.testing.assert_array_equal(ec.decode_grid(trained_prior, data, *grid.shape), grid.numpy())
    fixed_bytes = grid.numel() * math.log2(K) / 8
    assert len(data) < 0.5 * fixed_bytes


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 4), (7, 13)])
def test_partial_tiles_round_trip(trained_prior, shape):
    g = torch.Generator().manual_seed(sum(shape))
    grid = torch.randint(0, K, shape, generator=g)
    data = ec.encode_grid(trained_prior, grid)
    np.testing.assert_array_equal(ec.decode_grid(trained_prior, data, *shape), grid.numpy())


def test_grid_errors(trained_prior):
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        ec.encode_grid(trained_prior, torch.full((2, 2), K))
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        ec.encode_grid(trained_prior, torch.zeros(2, 2, 2, dtype=torch.int64))


# ------------------------------------------------------------------ models.compress --prior


def _prior_for(model, seed=0, grid=(2, 3)):
    torch.manual_seed(seed)
    return P.IndexPrior(model.codebook_size, grid, **P.PRIOR_CONFIGS["tiny"]).eval()


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 13, 10, generator=g), torch.rand(3, 8, 12, generator=g)]


def test_prior_coded_file_decodes_to_the_same_images(tiny_vqvae):
    model = tiny_vqvae()
    prior = _prior_for(model)
    imgs = _images()
    fixed, _ = encode_images(model, imgs, ["a", "b"])
    coded, reports = encode_images(model, imgs, ["a", "b"], prior=prior)
    header, _ = read_header(coded)
    assert header["prior"]["fingerprint"] == ec.prior_fingerprint(prior)
    for (na, a), (nb, b) in zip(decode_bytes(model, fixed), decode_bytes(model, coded, prior)):
        assert na == nb
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for r in reports:
        assert r["bits"] % 8 == 0 and r["bpp_fixed"] == pytest.approx(
            r["bits_fixed"] / r["height"] / r["width"]
        )
    # The fixed-length format stays readable, with or without a prior at hand.
    assert len(decode_bytes(model, fixed, prior)) == 2


def test_prior_file_errors(tiny_vqvae):
    model = tiny_vqvae()
    prior = _prior_for(model)
    coded, _ = encode_images(model, _images(), ["a", "b"], prior=prior)
    with pytest.raises(CompressError, match="pass --prior"):
        decode_bytes(model, coded)
    with pytest.raises(CompressError, match="different prior"):
        decode_bytes(model, coded, _prior_for(model, seed=1))
    bad = bytearray(coded)
    bad[-6] ^= 0x10
    with pytest.raises(CompressError, match="corrupt"):
        decode_bytes(model, bytes(bad), prior)
    with pytest.raises(CompressError, match="truncated"):
        decode_bytes(model, coded[:-2], prior)
    with pytest.raises(ValueError, match="K=16"):
        encode_images(
            model, _images(), ["a", "b"], prior=P.IndexPrior(16, (2, 2), d_model=8, n_heads=2)
        )


def test_cli_encode_decode_with_prior(tmp_path, capsys, write_model_checkpoint, tiny_vqvae):
    from PIL import Image

    model = tiny_vqvae()
    ckpt = tmp_path / "checkpoint.pt"
    write_model_checkpoint(model, str(ckpt))
    P.run_training(
        tmp_path / "prior",
        torch.randint(0, 32, (64, 2, 3)),
        None,
        32,
        (2, 3),
        steps=2,
        config="tiny",
        progress=False,
    )
    prior_path = str(tmp_path / "prior" / "prior.pt")
    img = tmp_path / "img.png"
    Image.fromarray((_images()[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(img)
    f = tmp_path / "codes.vqc"
    common = ["--backend", "reference"]
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(ckpt),
                str(img),
                "--out",
                str(f),
                "--prior",
                prior_path,
                *common,
            ]
        )
        == 0
    )
    assert "prior-coded; fixed-length" in capsys.readouterr().out
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
                "--prior",
                prior_path,
                *common,
            ]
        )
        == 0
    )
    assert "bpp" in capsys.readouterr().out
    assert main(["decode", "--checkpoint", str(ckpt), str(f), "--out", str(dec), *common]) == 2
    assert "pass --prior" in capsys.readouterr().err
