"""Hypothesis property tests: every available backend against vqkernels.reference on small shapes.

Profiles (tests/conftest.py): ``ci`` (bounded, derandomized; loaded when CI=true), ``dev``
(default), ``thorough`` (HYPOTHESIS_PROFILE=thorough).  Shapes stay tiny so the Triton
interpreter can run them too.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vqkernels
from vqkernels import reference
from vqkernels.testing import (
    EmaTolerance,
    check_cluster_stats,
    check_distances,
    check_indices,
    check_low_precision,
    make_inputs,
    noncontiguous,
)

sizes_n = st.integers(0, 40)
sizes_k = st.integers(1, 24)
sizes_d = st.integers(1, 20)
seeds = st.integers(0, 2**31 - 1)
metrics = st.sampled_from(["l2", "cosine"])
kinds = st.sampled_from(["gaussian", "clustered", "integer"])
layouts = st.sampled_from(["contiguous", "transposed", "row-strided", "col-strided"])


@given(n=sizes_n, k=sizes_k, d=sizes_d, metric=metrics, kind=kinds, layout=layouts, seed=seeds)
def test_nearest_code_fp32(backend, n, k, d, metric, kind, layout, seed):
    x, cb = make_inputs(n, k, d, seed=seed, kind=kind, device=backend.device)
    xs = x if layout == "contiguous" or n == 0 else noncontiguous(x, layout)
    idx, dist = vqkernels.nearest_code(xs, cb, metric, return_distance=True, backend=backend.name)
    check_indices(x, cb, idx, metric)
    check_distances(x, cb, idx, dist, metric)


@given(
    n=sizes_n,
    k=sizes_k,
    d=sizes_d,
    metric=metrics,
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=seeds,
)
def test_nearest_code_low_precision(backend, n, k, d, metric, dtype, seed):
    x, cb = make_inputs(n, k, d, dtype, seed=seed, device=backend.device)
    idx, dist = vqkernels.nearest_code(x, cb, metric, return_distance=True, backend=backend.name)
    check_low_precision(x, cb, idx, dist, metric)


@given(k=sizes_k, d=sizes_d, dups=st.lists(st.tuples(sizes_k, sizes_k), max_size=6), seed=seeds)
def test_codes_find_themselves_lowest_duplicate(backend, k, d, dups, seed):
    """Querying the (integer-valued, so exactly tied) codes themselves returns, for each code,
    the lowest index holding the same vector."""
    _, cb = make_inputs(0, k, d, seed=seed, kind="integer")
    for a, b in dups:
        lo, hi = sorted((a % k, b % k))
        cb[hi] = cb[lo]
    first = torch.tensor([int((cb == cb[i]).all(1).nonzero()[0]) for i in range(k)])
    idx, dist = vqkernels.nearest_code(
        cb.to(backend.device), cb.to(backend.device), return_distance=True, backend=backend.name
    )
    assert torch.equal(idx.cpu(), first)
    assert not dist.any()


@given(
    n=sizes_n,
    k=sizes_k,
    d=sizes_d,
    ignore=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=seeds,
)
def test_cluster_stats(backend, n, k, d, ignore, dtype, seed):
    x, _ = make_inputs(n, 1, d, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (n,), generator=g)
    idx[torch.rand(n, generator=g) < ignore] = -1
    counts, sums = vqkernels.cluster_stats(
        x.to(backend.device), idx.to(backend.device), k, backend=backend.name
    )
    check_cluster_stats(x, idx, k, counts, sums)


# n = 0 states divide 0 by 0 (the undefined codebook, not checked); numpy under the Triton
# interpreter warns about it.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@given(
    n=sizes_n,
    k=sizes_k,
    d=sizes_d,
    decay=st.floats(0.0, 1.0),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    steps=st.integers(1, 3),
    seed=seeds,
)
def test_ema_update(backend, n, k, d, decay, eps, steps, seed):
    g = torch.Generator().manual_seed(seed)
    cb0 = torch.randn(k, d, generator=g)
    # Unit starting sizes; n = Σ cluster_size can still reach 0 (decay 0, no kept rows), where
    # the codebook is undefined and EmaTolerance checks sizes and sums only.
    state = [cb0.clone().to(backend.device), torch.ones(k, device=backend.device), cb0.clone()]
    state[2] = state[2].to(backend.device)
    ref = [cb0.clone(), torch.ones(k), cb0.clone()]
    tol = EmaTolerance(k, d, eps)
    for _ in range(steps):
        x = torch.randn(n, d, generator=g)
        idx = torch.randint(-1, k, (n,), generator=g)
        vqkernels.ema_update_(
            *state, x.to(backend.device), idx.to(backend.device), decay, eps, backend=backend.name
        )
        reference.ema_update_(*ref, x, idx, decay, eps)
        tol.step(x, idx, decay, ref[2])
        tol.check(state, ref)


@given(
    n=st.integers(1, 40),
    k=sizes_k,
    d=sizes_d,
    beta=st.floats(0.0, 2.0),
    learn=st.booleans(),
    metric=metrics,
    seed=seeds,
)
def test_quantize(backend, n, k, d, beta, learn, metric, seed):
    """Forward values and loss, and gradients, from the backend's own indices (closed forms of
    test_quantize.py, in float64)."""
    x, cb = make_inputs(n, k, d, seed=seed, device=backend.device)
    xr = x.clone().requires_grad_(True)
    cbr = cb.clone().requires_grad_(learn)
    q, idx, loss = vqkernels.quantize(xr, cbr, beta, metric, backend=backend.name)
    check_indices(x, cb, idx, metric)
    assert torch.equal(q.detach(), cb[idx])
    g = torch.Generator().manual_seed(seed)
    grad_q = torch.randn(n, d, generator=g)
    w = float(n * d)
    ((q * grad_q.to(backend.device)).sum() + w * loss).backward()

    x64, q64 = x.double().cpu(), cb.double().cpu()[idx.cpu()]
    diff = x64 - q64
    sq = float((diff * diff).sum()) / x.numel()
    want_loss = beta * sq + (sq if learn else 0.0)
    assert abs(float(loss.detach()) - want_loss) <= 1e-5 * want_loss + 1e-12
    want_gx = grad_q.double() + w * 2.0 * beta * diff / x.numel()
    assert torch.allclose(xr.grad.cpu().double(), want_gx, rtol=1e-5, atol=1e-5)
    if learn:
        want_gcb = torch.zeros(k, d, dtype=torch.float64)
        want_gcb.index_add_(0, idx.cpu(), w * -2.0 * diff / x.numel())
        assert torch.allclose(cbr.grad.cpu().double(), want_gcb, rtol=1e-5, atol=1e-5)
    else:
        assert cbr.grad is None
