"""Multi-head codebooks ``[H, K, D]`` (x ``[..., H, D]``): one op call per op, against the same
backend's single-codebook op run head by head (bit-identical: the kernels do the same arithmetic
per head) and against the reference."""

from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import reference
from vqkernels.testing import assert_bitwise_equal, check_indices, make_inputs, require_feature

# (N, H, K, D): H = 1, K = 1, N = 0, odd D, K > N.
SHAPES = [(0, 2, 3, 5), (1, 1, 1, 1), (9, 3, 1, 7), (17, 4, 33, 5), (40, 2, 65, 19), (5, 3, 40, 8)]
CASES = [pytest.param(s, id=f"N{s[0]}-H{s[1]}-K{s[2]}-D{s[3]}") for s in SHAPES]


def heads_inputs(n, h, k, d, device, seed=0, kind="gaussian"):
    xs, cbs = zip(
        *(make_inputs(n, k, d, seed=seed + j, device=device, kind=kind) for j in range(h))
    )
    return torch.stack(xs, dim=1), torch.stack(cbs, dim=0)  # [N, H, D], [H, K, D]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", CASES)
def test_nearest_code_heads_equal_per_head(backend, shape, metric):
    require_feature(backend, "nearest_code", "heads")
    n, h, k, d = shape
    backend.require_small(n * h, k, d)
    x, cb = heads_inputs(n, h, k, d, backend.device, seed=n + k)
    idx, dist = vqkernels.nearest_code(x, cb, metric, True, backend=backend.name)
    assert idx.shape == (n, h) and dist.shape == (n, h)
    for j in range(h):
        i1, d1 = vqkernels.nearest_code(x[:, j], cb[j], metric, True, backend=backend.name)
        assert_bitwise_equal((idx[:, j], dist[:, j]), (i1, d1), f"head {j}")
        check_indices(x[:, j], cb[j], idx[:, j], metric)


def test_nearest_code_heads_leading_dims_and_strides(backend):
    require_feature(backend, "nearest_code", "heads")
    x, cb = heads_inputs(24, 3, 10, 6, backend.device, seed=4)
    x4 = x.reshape(2, 12, 3, 6).transpose(0, 1)  # non-contiguous leading dims
    idx = vqkernels.nearest_code(x4, cb, backend=backend.name)
    assert idx.shape == (12, 2, 3)
    want, _ = reference.nearest_code(x4.reshape(-1, 3, 6), cb)
    assert torch.equal(idx.reshape(-1, 3).cpu(), want.cpu())


@pytest.mark.parametrize("shape", CASES)
def test_cluster_stats_and_ema_heads_equal_per_head(backend, shape):
    require_feature(backend, "cluster_stats", "heads")
    require_feature(backend, "ema_update_", "heads")
    n, h, k, d = shape
    backend.require_small(n * h, k, d)
    x, cb = heads_inputs(n, h, k, d, backend.device, seed=7)
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(-1, k, (n, h), generator=g).to(backend.device)
    counts, sums = vqkernels.cluster_stats(x, idx, k, heads=h, backend=backend.name)
    assert counts.shape == (h, k) and sums.shape == (h, k, d)
    rc, rs = reference.cluster_stats(x.cpu(), idx.cpu(), k)
    for j in range(h):
        c1, s1 = vqkernels.cluster_stats(x[:, j], idx[:, j], k, backend=backend.name)
        assert_bitwise_equal((counts[j], sums[j]), (c1, s1), f"head {j} stats")
        torch.testing.assert_close(counts[j].cpu(), rc[j])
        torch.testing.assert_close(sums[j].cpu(), rs[j], rtol=1e-6, atol=1e-6)
    state = [cb.clone(), torch.rand(h, k, generator=g).to(backend.device) + 0.5, cb.clone() * 2]
    per_head = [[t[j].clone() for t in state] for j in range(h)]
    vqkernels.ema_update_(*state, x, idx, 0.9, 1e-5, backend=backend.name)
    for j in range(h):
        vqkernels.ema_update_(*per_head[j], x[:, j], idx[:, j], 0.9, 1e-5, backend=backend.name)
        assert_bitwise_equal(tuple(t[j] for t in state), tuple(per_head[j]), f"head {j} EMA")


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
@pytest.mark.parametrize("shape", CASES[1:])
def test_quantize_heads_matches_reference(backend, shape, estimator):
    features = ("heads",) + (("rotation",) if estimator == "rotation" else ())
    require_feature(backend, "quantize", *features)
    n, h, k, d = shape
    backend.require_small(n * h, k, d)
    x, cb = heads_inputs(n, h, k, d, backend.device, seed=3, kind="clustered")
    x.requires_grad_(True)
    cb.requires_grad_(True)
    q, idx, loss = vqkernels.quantize(x, cb, 0.25, estimator=estimator, backend=backend.name)
    assert q.shape == x.shape and idx.shape == (n, h)
    xr, cbr = x.detach().cpu().requires_grad_(True), cb.detach().cpu().requires_grad_(True)
    qr, idxr, lossr = reference.quantize(xr, cbr, 0.25, estimator=estimator)
    assert torch.equal(idx.cpu(), idxr)
    assert torch.equal(q.detach().cpu(), qr.detach())
    torch.testing.assert_close(loss.detach().cpu(), lossr.detach(), rtol=1e-5, atol=1e-7)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    gx, gc = torch.autograd.grad(
        [q, loss], [x, cb], [g.to(q.device), torch.tensor(0.6, device=q.device)]
    )
    rx, rc = torch.autograd.grad([qr, lossr], [xr, cbr], [g, torch.tensor(0.6)])
    torch.testing.assert_close(gx.cpu(), rx, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gc.cpu(), rc, rtol=2e-5, atol=1e-7)


def test_heads_shape_errors():
    x, cb = heads_inputs(4, 3, 5, 6, "cpu")
    with pytest.raises(ValueError, match=r"multi-head codebook \[H=3"):
        vqkernels.nearest_code(x[:, :2], cb)
    with pytest.raises(ValueError, match=r"with heads=2, x must have shape"):
        vqkernels.cluster_stats(x, torch.zeros(4, 3, dtype=torch.long), 5, heads=2)
    with pytest.raises(ValueError, match=r"cluster_size must have shape \[3, 5\]"):
        vqkernels.ema_update_(cb.clone(), torch.ones(5), cb.clone(), x, torch.zeros(4, 3).long())
