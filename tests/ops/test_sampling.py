"""Gumbel-max sampling fused into nearest_code (``sample_temperature > 0``).

The noise is a counter-based hash of (seed, row, code) (vqkernels.reference.sampling); this file
checks the hash against an independent pure-Python implementation, every backend against the
reference (equal indices except for float-rounding near-ties of the perturbed scores, counted),
reproducibility across runs, thread counts and generators, and the sampled distribution against
softmax(logits/τ) with vector-quantize-pytorch's logits.
"""

from __future__ import annotations

import math

import pytest
import torch

import vqkernels
from vqkernels import reference
from vqkernels.reference import sampling
from vqkernels.testing import make_inputs, require_feature

M32 = 0xFFFFFFFF


def py_mix32(v: int) -> int:
    v ^= v >> 16
    v = (v * 0x21F0AAAD) & M32
    v ^= v >> 15
    v = (v * 0x735A2D97) & M32
    return v ^ (v >> 15)


def py_gumbel(seed: int, row: int, code: int) -> float:
    h = py_mix32((seed >> 32) ^ 0x9E3779B9)
    h = py_mix32(h ^ (seed & M32))
    h = py_mix32(h ^ (row >> 32))
    h = py_mix32(h ^ (row & M32))
    bits = py_mix32(h ^ py_mix32(code))
    u = (2 * (bits >> 9) + 1) * 2.0**-24
    return -math.log(-math.log(u))


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**63 - 1])
def test_counter_hash_matches_pure_python(seed):
    rows = torch.tensor([0, 1, 5, 2**31, 2**40 + 3])
    got = sampling.gumbel_noise(seed, rows, 6).double()
    want = torch.tensor(
        [[py_gumbel(seed, int(r), c) for c in range(6)] for r in rows.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)  # fp32 logs vs fp64


def perturbed_gap(x, cb, metric, temp, seed, heads=1):
    """Per row: the gap between the best and second-best perturbed score (fp64 logits + the
    reference's noise): a backend may differ from the reference only where this is tiny."""
    x64, cb64 = x.double().cpu(), cb.double().cpu()
    if metric == "l2":
        logits = -torch.cdist(x64, cb64).clamp_min(1e-4)
    else:
        logits = (
            torch.nn.functional.normalize(x64, dim=1) @ torch.nn.functional.normalize(cb64, dim=1).T
        )
    rows = torch.arange(x.shape[0]) * heads
    z = logits / temp + sampling.gumbel_noise(seed, rows, cb.shape[0]).double()
    top = z.topk(min(2, cb.shape[0]), dim=1).values
    return (top[:, 0] - top[:, -1]) if cb.shape[0] > 1 else torch.full((x.shape[0],), math.inf)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (7, 3, 5), (50, 17, 9), (130, 70, 33)],
    ids=lambda s: f"N{s[0]}-K{s[1]}-D{s[2]}",
)
@pytest.mark.parametrize("temp", [0.05, 1.0, 10.0])
def test_sampling_matches_reference(backend, shape, metric, temp):
    require_feature(backend, "nearest_code", "sample")
    n, k, d = shape
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=n + k, device=backend.device)
    seed = 12345 + n
    idx, dist = vqkernels.nearest_code(
        x, cb, metric, True, sample_temperature=temp, seed=seed, backend=backend.name
    )
    ridx, rdist = reference.nearest_code(
        x.cpu(), cb.cpu(), metric, sample_temperature=temp, seed=seed
    )
    mismatch = idx.cpu() != ridx
    gap = perturbed_gap(x, cb, metric, temp, seed)
    # Allowed only where the perturbed scores are within float rounding of each other.
    assert bool((gap[mismatch] < 1e-4 * (1 + 1 / temp)).all()), (mismatch.sum(), gap[mismatch])
    assert int(mismatch.sum()) <= max(1, n // 50)
    same = ~mismatch
    torch.testing.assert_close(dist.cpu()[same], rdist[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sampling_low_precision_matches_reference(backend, dtype):
    """Half inputs: scores from the same rounded values in fp32, so the draws agree with the
    reference's (up to float-rounding near-ties of the perturbed scores)."""
    require_feature(backend, "nearest_code", "sample")
    x, cb = make_inputs(90, 21, 10, dtype, seed=8, device=backend.device)
    idx = vqkernels.nearest_code(x, cb, sample_temperature=0.3, seed=4, backend=backend.name)
    ridx, _ = reference.nearest_code(x.cpu(), cb.cpu(), sample_temperature=0.3, seed=4)
    assert int((idx.cpu() != ridx).sum()) <= 2


def test_sampling_reproducible_runs_threads_generators(backend, restore_threads):
    require_feature(backend, "nearest_code", "sample")
    x, cb = make_inputs(300, 40, 12, seed=1, device=backend.device)
    backend.require_small(300, 40, 12)
    kw = dict(sample_temperature=0.7, backend=backend.name)
    a = vqkernels.nearest_code(x, cb, seed=99, **kw)
    torch.set_num_threads(1)
    b = vqkernels.nearest_code(x, cb, seed=99, **kw)
    torch.set_num_threads(max(2, restore_threads))
    c = vqkernels.nearest_code(x, cb, seed=99, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, vqkernels.nearest_code(x, cb, seed=100, **kw))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        vqkernels.nearest_code(x, cb, generator=g1, **kw),
        vqkernels.nearest_code(x, cb, generator=g2, **kw),
    )
    torch.manual_seed(3)
    d1 = vqkernels.nearest_code(x, cb, **kw)
    torch.manual_seed(3)
    assert torch.equal(d1, vqkernels.nearest_code(x, cb, **kw))


def test_sampling_heads_use_row_counters(backend):
    """Multi-head row counters are n·H + h: with the same codebook on every head, sampling x
    [N, H, D] against [H, K, D] equals sampling x.reshape(N·H, D) against [K, D]."""
    require_feature(backend, "nearest_code", "heads", "sample")
    x, cb = make_inputs(60, 11, 7, seed=2, device=backend.device)
    x3 = x.reshape(20, 3, 7)
    kw = dict(sample_temperature=0.5, seed=7, backend=backend.name)
    multi = vqkernels.nearest_code(x3, cb.expand(3, 11, 7).contiguous(), **kw)
    flat = vqkernels.nearest_code(x, cb, **kw)
    assert torch.equal(multi.reshape(-1), flat)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_sampled_distribution_is_softmax_of_lr_logits(metric):
    """One vector repeated over many rows (independent noise per row): code frequencies match
    softmax(logits/τ) with LR's logits (−cdist, or the cosine similarity)."""
    n, temp = 40000, 0.5
    cb = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-0.7, 0.9], [0.3, -1.2], [2.0, 2.0]])
    x = torch.tensor([[0.2, 0.1]]).expand(n, 2).contiguous()
    idx = vqkernels.nearest_code(
        x, cb, metric, sample_temperature=temp, seed=11, backend="reference"
    )
    freq = torch.bincount(idx, minlength=5).double() / n
    if metric == "l2":
        logits = -torch.cdist(x[:1].double(), cb.double())[0]
    else:
        logits = torch.nn.functional.normalize(cb.double(), dim=1) @ torch.nn.functional.normalize(
            x[0].double(), dim=0
        )
    p = (logits / temp).softmax(0)
    assert float((freq - p).abs().max()) < 4 * math.sqrt(0.25 / n), (freq, p)


def test_low_temperature_is_nearest():
    x, cb = make_inputs(200, 30, 8, seed=4, kind="clustered", noise=0.05)
    near = vqkernels.nearest_code(x, cb, backend="reference")
    samp = vqkernels.nearest_code(x, cb, sample_temperature=1e-6, seed=1, backend="reference")
    assert torch.equal(near, samp)


def test_sampling_argument_errors():
    x, cb = make_inputs(4, 3, 2)
    with pytest.raises(ValueError, match="sample_temperature must be a finite float >= 0"):
        vqkernels.nearest_code(x, cb, sample_temperature=-1.0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\^63\)"):
        vqkernels.nearest_code(x, cb, sample_temperature=1.0, seed=-3)
    with pytest.raises(ValueError, match="either seed or generator"):
        vqkernels.nearest_code(x, cb, sample_temperature=1.0, seed=3, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        vqkernels.nearest_code(x, cb, sample_temperature=1.0, generator=3)
