"""Tests for models/prior.py: the causal-transformer prior over VQ code indices.

Most tests use synthetic index grids (no VQ model needed); the last ones run the CLI end to end on
a tiny VQ-VAE trained for a few steps on the digits. Sizes are kept small: 2 shared CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from models import prior as P  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two on the shared 2-core machine
    (no spin-waiting against other processes); restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


K, H, W = 16, 3, 4  # a non-square grid: catches h/w mix-ups in reshapes
L = H * W


def toy_indices(n: int, seed: int) -> torch.Tensor:
    """Sequences with structure a prior can learn: a uniform first code, then +1 (mod K) along
    the raster order. Ideal NLL = log2(K) / L bits per index; a unigram model gets log2(K)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, K, (n, 1), generator=g)
    return ((start + torch.arange(L)) % K).reshape(n, H, W)


def tiny_prior(seed: int = 0, **kw) -> P.IndexPrior:
    torch.manual_seed(seed)
    cfg = dict(P.PRIOR_CONFIGS["tiny"])
    cfg.update(kw)
    return P.IndexPrior(K, (H, W), **cfg).eval()


# ------------------------------------------------------------------------------ the model


def test_forward_is_causal():
    prior = tiny_prior()
    x = toy_indices(4, 0).reshape(4, L)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 5) % K  # change the future from position 7 on
    with torch.no_grad():
        a, b = prior(x), prior(y)
    assert a.shape == (4, L, K) and a.dtype == torch.float32
    # logits at t see codes < t only: positions 0..7 are unchanged, later ones differ.
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    # next_logits(prefix) is the same computation as the teacher-forced forward.
    with torch.no_grad():
        torch.testing.assert_close(prior.next_logits(x[:, :5]), a[:, 5], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prior.next_logits(x[:, :0]), a[:, 0], rtol=1e-5, atol=1e-5)


def test_initial_nll_is_near_uniform():
    # Small init -> near-uniform predictions: a fresh prior costs about log2(K) bits per index.
    bits = P.bits_per_index(tiny_prior(), toy_indices(32, 1).reshape(32, L))
    assert abs(bits - math.log2(K)) < 0.1


def test_bad_arguments():
    with pytest.raises(ValueError, match="codebook_size"):
        P.IndexPrior(0, (2, 2))
    with pytest.raises(ValueError, match="grid"):
        P.IndexPrior(4, (0, 2))
    with pytest.raises(ValueError, match="n_heads"):
        P.IndexPrior(4, (2, 2), d_model=10, n_heads=4)
    prior = tiny_prior()
    with pytest.raises(ValueError, match="indices"):
        P.bits_per_index(prior, torch.full((2, L), K))  # out of range
    with pytest.raises(TypeError, match="int64"):
        P.bits_per_index(prior, torch.zeros(2, L, dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        P.bits_per_index(prior, torch.zeros(2, L + 1, dtype=torch.int64))


# ------------------------------------------------------------------------------ training


def test_loss_decreases_on_toy_run(tmp_path):
    train, held = toy_indices(512, 0), toy_indices(64, 1)
    m = P.run_training(
        tmp_path,
        train,
        held,
        K,
        (H, W),
        steps=60,
        config="tiny",
        batch_size=32,
        lr=3e-3,
        progress=False,
    )
    first = m["uniform_bits_per_index"]  # ~ the untrained loss (see test above)
    assert m["steps"] == 60
    # The +1 rule is learnable: held-out NLL falls far below the unigram baseline (log2 K = 4 bits
    # here, since codes are uniform overall) towards the ideal log2(K)/L = 0.33 bits.
    assert m["eval_unigram_bits_per_index"] > 3.9
    assert m["eval_bits_per_index"] < 0.5 * first
    assert m["train_bits_per_index"] < 0.6 * first
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["eval_bits_per_index"] == pytest.approx(m["eval_bits_per_index"])
    # The saved prior reproduces the reported held-out number.
    prior = P.load_prior(tmp_path / "prior.pt")
    assert not prior.training
    held_bits = P.bits_per_index(prior, held.reshape(-1, L))
    assert held_bits == pytest.approx(m["eval_bits_per_index"], rel=1e-5)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_resume_continues_exactly(tmp_path):
    # Dropout on: resuming must also restore the global RNG, not just weights/optimizer/batches.
    cfg = dict(P.PRIOR_CONFIGS["tiny"], dropout=0.2)
    train = toy_indices(256, 0)
    kw = dict(steps=10, config=cfg, batch_size=16, lr=3e-3, progress=False, checkpoint_every=0)
    P.run_training(tmp_path / "full", train, None, K, (H, W), seed=3, **kw)
    m = P.run_training(
        tmp_path / "cut", train, None, K, (H, W), seed=3, stop=lambda s: s >= 4, **kw
    )
    assert m["steps"] == 4
    torch.manual_seed(12345)  # whatever happens in between must not matter
    m = P.run_training(tmp_path / "cut", train, None, K, (H, W), seed=3, resume=True, **kw)
    assert m["steps"] == 10
    full = torch.load(tmp_path / "full" / "prior.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "prior.pt", weights_only=True)
    assert full["history"] == cut["history"]  # every step's loss, bit for bit
    for name, t in full["model"].items():
        assert torch.equal(t, cut["model"][name]), name


def test_resume_rejects_other_codebook(tmp_path):
    train = toy_indices(32, 0)
    kw = dict(steps=2, config="tiny", batch_size=8, progress=False)
    P.run_training(tmp_path, train, None, K, (H, W), **kw)
    with pytest.raises(ValueError, match="K="):
        P.run_training(tmp_path, train, None, K + 1, (H, W), resume=True, **kw)


def test_load_prior_is_safe_and_checks_format(tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not a vqkernels prior"):
        P.load_prior(bad)
    with pytest.raises(FileNotFoundError):
        P.load_prior(tmp_path / "missing.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": P.PRIOR_FORMAT, "config": Evil()}, evil)
    # weights_only=True refuses to unpickle arbitrary objects instead of running them.
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        P.load_prior(evil)


# ------------------------------------------------------------------------------ sampling


def test_samples_are_valid_and_reproducible():
    prior = tiny_prior()
    g = torch.Generator().manual_seed(7)
    s = P.sample(prior, 9, temperature=1.3, top_k=None, generator=g, batch_size=4)
    assert s.shape == (9, H, W) and s.dtype == torch.int64
    assert int(s.min()) >= 0 and int(s.max()) < K
    s2 = P.sample(prior, 9, 1.3, generator=torch.Generator().manual_seed(7), batch_size=4)
    assert torch.equal(s, s2)
    assert P.sample(prior, 0).shape == (0, H, W)


def _greedy(prior: P.IndexPrior, n: int) -> torch.Tensor:
    seq = torch.empty(n, 0, dtype=torch.int64)
    with torch.no_grad():
        for _ in range(L):
            seq = torch.cat([seq, prior.next_logits(seq).argmax(-1, keepdim=True)], 1)
    return seq.reshape(n, H, W)


def test_top_k_restricts_choices():
    prior = tiny_prior(seed=1)
    # top_k = 1 is greedy decoding, whatever the temperature.
    assert torch.equal(P.sample(prior, 3, temperature=5.0, top_k=1), _greedy(prior, 3))
    # Every sampled code is among the k likeliest given its prefix.
    k = 3
    s = P.sample(prior, 16, temperature=2.0, top_k=k, generator=torch.Generator().manual_seed(0))
    flat = s.reshape(16, L)
    with torch.no_grad():
        for t in range(L):
            top = prior.next_logits(flat[:, :t]).topk(k, dim=-1).indices
            assert (top == flat[:, t : t + 1]).any(-1).all(), t
    # ... and with a large sample the choice really is among exactly k codes per step.
    probs = P._filtered_probs(torch.randn(5, K), 1.0, k)
    assert ((probs > 0).sum(-1) == k).all()
    tied = torch.zeros(2, K)  # all tied: still exactly k candidates, not K
    assert ((P._filtered_probs(tied, 1.0, k) > 0).sum(-1) == k).all()


def test_temperature_scales_the_distribution():
    logits = torch.randn(4, K) * 3
    p1 = P._filtered_probs(logits, 1.0, None)
    torch.testing.assert_close(p1, torch.softmax(logits, -1))
    entropy = [
        float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
        for p in (P._filtered_probs(logits, t, None) for t in (0.25, 1.0, 4.0))
    ]
    assert entropy[0] < entropy[1] < entropy[2] < math.log(K)
    # A tiny temperature becomes argmax without overflowing to NaN.
    cold = P._filtered_probs(logits, 1e-30, None)
    assert torch.isfinite(cold).all()
    assert torch.equal(cold.argmax(-1), logits.argmax(-1)) and (cold.max(-1).values == 1).all()
    prior = tiny_prior(seed=2)
    assert torch.equal(P.sample(prior, 3, temperature=1e-6), _greedy(prior, 3))


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        P.sample(tiny_prior(), 1, temperature=temperature)


@pytest.mark.parametrize(
    "top_k,err", [(0, ValueError), (K + 1, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_bad_top_k(top_k, err):
    with pytest.raises(err, match="top_k"):
        P.sample(tiny_prior(), 1, top_k=top_k)


def test_make_grid_layout():
    imgs = torch.rand(5, 1, 4, 6)
    g = P.make_grid(imgs, nrow=2, pad=1, scale=2)
    # 3 rows x 2 cols of 8x12 tiles with 1-pixel padding; grey is expanded to RGB.
    assert g.shape == (3, 1 + 3 * 9, 1 + 2 * 13)
    torch.testing.assert_close(
        g[0, 1:9, 1:13], imgs[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    )
    with pytest.raises(ValueError, match="images"):
        P.make_grid(torch.rand(2, 2, 4, 4))


# ------------------------------------------------------------- with a real (tiny) VQ model


@pytest.fixture(scope="module")
def vq_checkpoint(tmp_path_factory):
    """A tiny VQ-VAE trained for a few steps on the digits (fast: 8x8 images, 2x2 code grid)."""
    from models.train import train

    out = tmp_path_factory.mktemp("vq")
    train(
        [
            "--model",
            "vqvae",
            "--dataset",
            "digits",
            "--config",
            "tiny",
            "--steps",
            "3",
            "--batch-size",
            "16",
            "--out",
            str(out),
            "--backend",
            "reference",
            "--eval-every",
            "0",
        ]
    )
    return out / "checkpoint.pt"


def test_decoded_samples_have_image_shape_and_range(vq_checkpoint):
    import models

    model = models.load(vq_checkpoint)
    with torch.no_grad():
        grid = model.encode(torch.rand(1, 1, 8, 8)).shape[1:]
    prior = P.IndexPrior(model.codebook_size, tuple(grid), **P.PRIOR_CONFIGS["tiny"])
    images, idx = P.generate_images(prior, model, 5, temperature=1.0, top_k=4, seed=0)
    assert idx.shape == (5, *grid) and int(idx.min()) >= 0 and int(idx.max()) < model.codebook_size
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    other = P.IndexPrior(model.codebook_size + 1, tuple(grid), **P.PRIOR_CONFIGS["tiny"])
    with pytest.raises(ValueError, match="K="):
        P.generate_images(other, model, 1, 1.0, None)


def test_cli_train_then_sample(vq_checkpoint, tmp_path):
    from PIL import Image

    out = tmp_path / "prior"
    m = P.main(
        [
            "train",
            "--checkpoint",
            str(vq_checkpoint),
            "--steps",
            "12",
            "--out",
            str(out),
            "--config",
            "tiny",
            "--train-crops",
            "256",
            "--batch-size",
            "16",
            "--no-progress",
        ]
    )
    assert m["steps"] == 12 and m["dataset"] == "digits"
    assert 0 < m["eval_bits_per_index"] < 2 * m["uniform_bits_per_index"]
    assert set(os.listdir(out)) >= {"prior.pt", "metrics.json", "indices.pt"}
    # --resume to a larger step count reuses the stored pool and continues.
    m = P.main(
        [
            "train",
            "--checkpoint",
            str(vq_checkpoint),
            "--steps",
            "15",
            "--out",
            str(out),
            "--config",
            "tiny",
            "--batch-size",
            "16",
            "--no-progress",
            "--resume",
        ]
    )
    assert m["steps"] == 15
    png = tmp_path / "samples.png"
    P.main(
        [
            "sample",
            "--prior",
            str(out),
            "--checkpoint",
            str(vq_checkpoint),
            "--n",
            "6",
            "--temperature",
            "0.9",
            "--top-k",
            "5",
            "--out",
            str(png),
        ]
    )
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size[0] > 8 and im.size[1] > 8
    with pytest.raises(SystemExit):  # argparse rejects a non-positive temperature
        P.main(
            [
                "sample",
                "--prior",
                str(out),
                "--checkpoint",
                str(vq_checkpoint),
                "--temperature",
                "0",
                "--out",
                str(png),
            ]
        )


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(
        [sys.executable, "-m", "models.prior", "sample", "--prior", str(tmp_path / "missing"),
         "--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "x.png")],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "error: prior checkpoint not found" in r.stderr and "Traceback" not in r.stderr


def test_lr_schedule_warms_up_then_follows_steps_or_clock():
    assert P._lr_at(0, 1000, 1.0) == pytest.approx(1 / 50)  # warm-up: min(100, 1000 // 20) = 50
    assert P._lr_at(49, 1000, 1.0) == pytest.approx(1.0)
    assert P._lr_at(1000, 1000, 1.0) == pytest.approx(0.1)
    mid = P._lr_at(525, 1000, 1.0)
    assert 0.5 < mid < 0.6  # half-way through the cosine: 0.1 + 0.45
    # A huge step target with the clock nearly out: the decay follows the clock.
    assert P._lr_at(300, 100_000, 1.0, time_progress=1.0) == pytest.approx(0.1)
    assert P._lr_at(300, 100_000, 1.0, time_progress=0.0) > 0.99
