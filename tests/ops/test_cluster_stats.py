"""cluster_stats: per-code counts and sums (the first half of the EMA update) against the reference.

Counts must be exact; sums within the fp32 summation bound of vqkernels.testing.sums_tolerance.
"""

from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import reference
from vqkernels.testing import (
    assert_bitwise_equal,
    case_id,
    channels_last_x,
    check_cluster_stats,
    make_inputs,
)

SHAPES = [(0, 4, 3), (1, 1, 1), (9, 1, 7), (5, 40, 3), (100, 17, 33), (1000, 64, 24), (777, 700, 5)]
CASES = [
    pytest.param((n, k, d, dt), id=case_id(n, k, d, dt))
    for (n, k, d) in SHAPES
    for dt in (torch.float32, torch.bfloat16)
] + [pytest.param((130, 9, 19, torch.float16), id=case_id(130, 9, 19, torch.float16))]


def random_indices(n: int, k: int, *, ignore: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``[N] int64`` uniform in [0, K), with a fraction ``ignore`` of rows set to -1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (n,), generator=g)
    idx[torch.rand(n, generator=g) < ignore] = -1
    return idx


def stats(backend, x, idx, k, **kw):
    return vqkernels.cluster_stats(
        x.to(backend.device), idx.to(backend.device), k, backend=backend.name, **kw
    )


@pytest.mark.parametrize("ignore", [0.0, 0.3], ids=["all-rows", "ignore30pct"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, case, ignore):
    n, k, d, dtype = case
    backend.require_small(n, k, d)
    x, _ = make_inputs(n, 1, d, dtype, seed=n + d)
    idx = random_indices(n, k, ignore=ignore, seed=k)
    counts, sums = stats(backend, x, idx, k)
    assert counts.device == backend.device and sums.device == backend.device
    check_cluster_stats(x, idx, k, counts, sums)


def test_ignored_rows_equal_dropping_them(backend):
    """Rows with index -1 contribute nothing: the stats equal those of the remaining rows."""
    n, k, d = 300, 12, 10
    x, _ = make_inputs(n, 1, d, seed=1)
    idx = random_indices(n, k, ignore=0.5, seed=1)
    # The ignored rows hold huge values: any leak shows.
    x[idx < 0] = 1e6
    counts, sums = stats(backend, x, idx, k)
    keep = idx >= 0
    want_c, want_s = reference.cluster_stats(x[keep], idx[keep], k)
    assert torch.equal(counts.cpu(), want_c)
    check_cluster_stats(x[keep], idx[keep], k, counts.cpu(), sums.cpu())
    assert float(sums.abs().max()) < 1e3
    # All rows ignored: zeros.
    counts, sums = stats(backend, x, torch.full((n,), -1), k)
    assert not counts.any() and not sums.any()


def test_skewed_assignment(backend):
    """Every row to one code (the worst case for a parallel reduction by code) and K > N."""
    n, k, d = (70, 100, 6) if backend.interpreted else (513, 1000, 6)
    x, _ = make_inputs(n, 1, d, seed=2)
    idx = torch.full((n,), k - 3)
    counts, sums = stats(backend, x, idx, k)
    check_cluster_stats(x, idx, k, counts, sums)
    assert float(counts[k - 3]) == n


def test_leading_dims_and_strides(backend):
    """x as a channel-strided (B, H, W, D) view, indices as a non-contiguous (B, H, W) view."""
    b, d, h, w, k = 2, 7, 4, 5, 6
    x = channels_last_x(b, d, h, w, seed=3)
    big = random_indices(b * h * w * 2, k, ignore=0.2, seed=3).reshape(b, h, w, 2)
    idx = big[..., 1]
    assert not x.is_contiguous() and not idx.is_contiguous()
    counts, sums = stats(backend, x, idx, k)
    check_cluster_stats(x.reshape(-1, d), idx.reshape(-1), k, counts, sums)


def test_int32_indices(backend):
    x, _ = make_inputs(50, 1, 4, seed=4)
    idx = random_indices(50, 7, ignore=0.1, seed=4)
    counts, sums = stats(backend, x, idx.to(torch.int32), 7)
    check_cluster_stats(x, idx, 7, counts, sums)


def test_checker_rejects_wrong_sums():
    x, _ = make_inputs(200, 1, 8, seed=5)
    idx = random_indices(200, 10, seed=5)
    counts, sums = reference.cluster_stats(x, idx, 10)
    check_cluster_stats(x, idx, 10, counts, sums)
    bad = sums.clone()
    bad[3, 4] += 1e-3 * (1 + abs(float(bad[3, 4])))
    with pytest.raises(AssertionError, match="sums off"):
        check_cluster_stats(x, idx, 10, counts, bad)
    bad_c = counts.clone()
    bad_c[2] += 1
    with pytest.raises(AssertionError, match="counts differ"):
        check_cluster_stats(x, idx, 10, bad_c, sums)


def test_deterministic_across_runs(backend):
    n, k, d = (60, 5, 7) if backend.interpreted else (5000, 37, 48)
    x, _ = make_inputs(n, 1, d, seed=6)
    idx = random_indices(n, k, ignore=0.1, seed=6)
    assert_bitwise_equal(stats(backend, x, idx, k), stats(backend, x, idx, k), "cluster_stats")


def test_cpu_same_bits_for_any_thread_count(cpu_backend, restore_threads):
    """The C++ kernel must not depend on how rows are split over threads (DESIGN §3)."""
    n, k, d = 20011, 50, 33
    x, _ = make_inputs(n, 1, d, seed=7)
    for idx in (random_indices(n, k, ignore=0.1, seed=7), torch.full((n,), 3)):
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(stats(cpu_backend, x, idx, k))
        assert_bitwise_equal(out[0], out[1], "cluster_stats 1 vs 2 threads")
