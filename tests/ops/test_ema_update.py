"""ema_update_: EMA codebook state after several in-place updates, against the reference.

The reference state is the oracle; each step feeds both states the same (x, indices) (indices
from the reference's codebook, so that the rounding differences of a backend do not change which
rows go where) and vqkernels.testing.EmaTolerance carries the fp32 bound through the steps.
"""

from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import reference
from vqkernels.testing import EmaTolerance, assert_bitwise_equal, case_id, make_inputs


def init_state(k: int, d: int, *, seed: int = 0, device="cpu", zero_sizes: bool = False):
    """EMA state ``(codebook [K, D], cluster_size [K], embed_sum [K, D])``, fp32, contiguous:
    ``embed_sum = codebook`` with unit cluster sizes (or zero sizes: a fresh layer)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g)
    sizes = torch.zeros(k) if zero_sizes else torch.ones(k)
    return tuple(t.to(device) for t in (codebook, sizes, codebook.clone()))


def clone_state(state, device=None):
    return tuple(t.clone().to(device or t.device) for t in state)


def run_steps(backend, k, d, n, *, steps, decay, eps, dtype=torch.float32, ignore=0.0, seed=0):
    """Apply ``steps`` updates with the backend and with the reference; check after each."""
    state = init_state(k, d, seed=seed, device=backend.device)
    ref_state = init_state(k, d, seed=seed)
    tol = EmaTolerance(k, d, eps)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        # Clustered data around the current (reference) codes, so every step moves the codes.
        assign = torch.randint(0, k, (n,), generator=g)
        x = (ref_state[0][assign] + 0.5 * torch.randn(n, d, generator=g)).to(dtype)
        idx = vqkernels.nearest_code(x, ref_state[0].to(dtype), backend="reference")
        idx[torch.rand(n, generator=g) < ignore] = -1
        ptrs = [t.data_ptr() for t in state]
        out = vqkernels.ema_update_(
            *state, x.to(backend.device), idx.to(backend.device), decay, eps, backend=backend.name
        )
        assert out is None
        assert [t.data_ptr() for t in state] == ptrs, "ema_update_ must update in place"
        reference.ema_update_(*ref_state, x, idx, decay, eps)
        tol.step(x, idx, decay, ref_state[2])
        try:
            tol.check(state, ref_state)
        except AssertionError as exc:
            raise AssertionError(f"after step {step + 1}: {exc}") from None
    return state, ref_state


SHAPES = [(1, 4, 3), (7, 3, 40), (64, 24, 500), (300, 17, 1000), (4096, 8, 256)]


@pytest.mark.parametrize("decay", [0.99, 0.5])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: case_id(s[2], s[0], s[1]))
def test_several_updates_match_reference(backend, shape, decay):
    k, d, n = shape
    backend.require_small(n, k, d)
    run_steps(backend, k, d, n, steps=5, decay=decay, eps=1e-5, seed=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_x_fp32_state(backend, dtype):
    """x in bf16/fp16 is accumulated in fp32; the state stays fp32."""
    k, d, n = 16, 12, 200
    backend.require_small(n, k, d)
    state, _ = run_steps(backend, k, d, n, steps=3, decay=0.9, eps=1e-5, dtype=dtype, seed=1)
    assert all(t.dtype == torch.float32 for t in state)


def test_ignored_rows(backend):
    k, d, n = 20, 9, 400
    backend.require_small(n, k, d)
    run_steps(backend, k, d, n, steps=4, decay=0.8, eps=1e-3, ignore=0.4, seed=2)


def test_decay_extremes(backend):
    """decay = 1 keeps sizes and sums (the codebook is still re-derived from them); decay = 0
    replaces them by this batch's counts and sums."""
    k, d, n = 6, 5, 50
    x, _ = make_inputs(n, 1, d, seed=3)
    idx = torch.arange(n) % k
    state = init_state(k, d, seed=3, device=backend.device)
    before = clone_state(state)
    vqkernels.ema_update_(
        *state, x.to(backend.device), idx.to(backend.device), 1.0, 1e-5, backend=backend.name
    )
    assert torch.equal(state[1], before[1]) and torch.equal(state[2], before[2])
    ref = clone_state(before, "cpu")
    reference.ema_update_(*ref, x, idx, 1.0, 1e-5)
    tol = EmaTolerance(k, d, 1e-5)
    tol.check(state, ref)

    vqkernels.ema_update_(
        *state, x.to(backend.device), idx.to(backend.device), 0.0, 1e-5, backend=backend.name
    )
    counts, sums = reference.cluster_stats(x, idx, k)
    assert torch.equal(state[1].cpu(), counts)
    tol = EmaTolerance(k, d, 1e-5)
    ref = clone_state(before, "cpu")
    reference.ema_update_(*ref, x, idx, 0.0, 1e-5)
    tol.step(x, idx, 0.0, ref[2])
    tol.check(state, ref)


def test_empty_batch_and_k1(backend):
    """N = 0 only decays the state; K = 1 puts every row in one code."""
    for k, n in ((5, 0), (1, 33)):
        d = 4
        x, _ = make_inputs(n, 1, d, seed=4)
        idx = torch.zeros(n, dtype=torch.int64)
        state = init_state(k, d, seed=4, device=backend.device)
        ref = init_state(k, d, seed=4)
        vqkernels.ema_update_(
            *state, x.to(backend.device), idx.to(backend.device), 0.9, 1e-5, backend=backend.name
        )
        reference.ema_update_(*ref, x, idx, 0.9, 1e-5)
        tol = EmaTolerance(k, d, 1e-5)
        tol.step(x, idx, 0.9, ref[2])
        tol.check(state, ref)


def test_fresh_state_first_update(backend):
    """A fresh layer (zero cluster sizes): the first update defines the codes of assigned
    clusters; unassigned codes collapse to embed_sum / tiny (finite) as in the reference."""
    k, d, n = 10, 6, 80
    x, _ = make_inputs(n, 1, d, seed=5)
    idx = torch.arange(n) % 7  # codes 7..9 unassigned
    state = init_state(k, d, seed=5, device=backend.device, zero_sizes=True)
    ref = init_state(k, d, seed=5, zero_sizes=True)
    vqkernels.ema_update_(
        *state, x.to(backend.device), idx.to(backend.device), 0.99, 1e-5, backend=backend.name
    )
    reference.ema_update_(*ref, x, idx, 0.99, 1e-5)
    tol = EmaTolerance(k, d, 1e-5)
    tol.step(x, idx, 0.99, ref[2])
    tol.check(state, ref)


def test_leading_dims(backend):
    k, d = 5, 3
    x, _ = make_inputs(24, 1, d, seed=6)
    idx = torch.arange(24) % k
    state = init_state(k, d, seed=6, device=backend.device)
    ref = init_state(k, d, seed=6)
    vqkernels.ema_update_(
        *state,
        x.reshape(2, 3, 4, d).to(backend.device),
        idx.reshape(2, 3, 4).to(backend.device),
        0.9,
        1e-5,
        backend=backend.name,
    )
    reference.ema_update_(*ref, x, idx, 0.9, 1e-5)
    tol = EmaTolerance(k, d, 1e-5)
    tol.step(x, idx, 0.9, ref[2])
    tol.check(state, ref)


def test_checker_rejects_wrong_state():
    k, d, n = 8, 4, 100
    x, _ = make_inputs(n, 1, d, seed=7)
    idx = torch.arange(n) % k
    ref = init_state(k, d, seed=7)
    reference.ema_update_(*ref, x, idx, 0.9, 1e-5)
    tol = EmaTolerance(k, d, 1e-5)
    tol.step(x, idx, 0.9, ref[2])
    for i, name in enumerate(("codebook", "cluster_size", "embed_sum")):
        bad = clone_state(ref)
        bad[i].view(-1)[1] *= 1.0001
        with pytest.raises(AssertionError, match=name):
            tol.check(bad, ref)
    # Forgetting the Laplace smoothing (c_k = cluster_size_k) is caught too (uneven cluster
    # sizes: with equal sizes the smoothing is the identity).
    idx = torch.arange(n) % k
    idx[: n // 2] = 0
    ref = init_state(k, d, seed=7)
    reference.ema_update_(*ref, x, idx, 0.9, 1e-3)
    tol = EmaTolerance(k, d, 1e-3)
    tol.step(x, idx, 0.9, ref[2])
    bad = clone_state(ref)
    bad[0].copy_(bad[2] / bad[1].unsqueeze(1))
    with pytest.raises(AssertionError, match="codebook"):
        tol.check(bad, ref)


def _updates(backend, n, k, d, steps=3):
    state = init_state(k, d, seed=8, device=backend.device)
    g = torch.Generator().manual_seed(8)
    for _ in range(steps):
        x = torch.randn(n, d, generator=g)
        idx = torch.randint(-1, k, (n,), generator=g)
        vqkernels.ema_update_(
            *state, x.to(backend.device), idx.to(backend.device), 0.95, 1e-5, backend=backend.name
        )
    return state


def test_deterministic_across_runs(backend):
    n, k, d = (50, 6, 5) if backend.interpreted else (6000, 300, 40)
    assert_bitwise_equal(_updates(backend, n, k, d), _updates(backend, n, k, d), "EMA state")


def test_cpu_same_bits_for_any_thread_count(cpu_backend, restore_threads):
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(_updates(cpu_backend, 20011, 97, 33))
    assert_bitwise_equal(out[0], out[1], "EMA state 1 vs 2 threads")
