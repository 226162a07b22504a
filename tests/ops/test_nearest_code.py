"""nearest_code: every available backend against vqkernels.reference (DESIGN.md §2, §3, §5)."""

from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import reference
from vqkernels.testing import (
    CORE_SHAPES,
    case_id,
    channels_last_x,
    check_distances,
    check_indices,
    check_low_precision,
    exact_distances,
    make_inputs,
    noncontiguous,
)

METRICS = ("l2", "cosine")
FP32_CASES = [pytest.param(s, id=case_id(*s)) for s in CORE_SHAPES]
LOWP_CASES = [
    pytest.param((n, k, d, dt), id=case_id(n, k, d, dt))
    for (n, k, d) in ((1, 1, 1), (37, 16, 3), (100, 65, 17), (300, 257, 96))
    for dt in (torch.bfloat16, torch.float16)
]


def run(backend, x, codebook, metric="l2", **kw):
    """nearest_code through the public API, with distances."""
    return vqkernels.nearest_code(
        x, codebook, metric, return_distance=True, backend=backend.name, **kw
    )


# ------------------------------------------------------------------------------------ fp32


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", FP32_CASES)
def test_fp32_matches_reference(backend, shape, metric):
    n, k, d = shape
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=n + k + d, device=backend.device)
    idx, dist = run(backend, x, cb, metric)
    assert idx.shape == (n,) and dist.shape == (n,)
    assert idx.device == x.device and dist.device == x.device
    report = check_indices(x, cb, idx, metric)
    check_distances(x, cb, idx, dist, metric)
    # Near ties are rare for random data: a tolerance so loose that it exempted many rows would
    # make the rule toothless.
    assert report.near_ties <= max(2, n // 20), report
    # return_distance=False gives the same indices alone.
    idx_only = vqkernels.nearest_code(x, cb, metric, backend=backend.name)
    assert torch.equal(idx_only, idx)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(1000, 512, 64), (129, 300, 7)], ids=lambda s: case_id(*s))
def test_clustered_inputs_match_exactly(backend, shape, metric):
    """With a clear winner per row there is no near tie: indices equal the reference's and the
    code each row was drawn from."""
    n, k, d = shape
    backend.require_small(n, k, d)
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(k, d, generator=g)
    assign = torch.randint(0, k, (n,), generator=g)
    x = cb[assign] + 0.01 * torch.randn(n, d, generator=g)
    x, cb = x.to(backend.device), cb.to(backend.device)
    idx, dist = run(backend, x, cb, metric)
    report = check_indices(x, cb, idx, metric)
    assert report.near_ties == 0 and report.mismatches == 0, report
    assert torch.equal(idx.cpu(), assign)
    check_distances(x, cb, idx, dist, metric)


@pytest.mark.parametrize("offset", [30.0, -100.0])
def test_large_common_offset(backend, offset):
    """x and codes far from the origin: ‖c‖² and 2·x·c nearly cancel, the hard case for the
    expanded form (DESIGN §3).  The rule's tolerance scales with ‖x‖² + ‖c‖²."""
    n, k, d = 64, 48, 24
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=5, kind="clustered", noise=0.3)
    x, cb = (x + offset).to(backend.device), (cb + offset).to(backend.device)
    idx, dist = run(backend, x, cb, "l2")
    check_indices(x, cb, idx, "l2")
    check_distances(x, cb, idx, dist, "l2")


def test_checker_rejects_wrong_indices():
    """The rule can fail: moving one row to its worst code, or reporting a distance 1 % off,
    is caught (guards the tolerance against being vacuous)."""
    x, cb = make_inputs(200, 64, 32, seed=1)
    idx, dist = reference.nearest_code(x, cb)
    check_indices(x, cb, idx)  # the reference satisfies its own rule
    check_distances(x, cb, idx, dist)
    bad = idx.clone()
    bad[17] = int(exact_distances(x[17:18], cb).argmax())
    with pytest.raises(AssertionError, match="differ from the reference"):
        check_indices(x, cb, bad)
    # Second-best code: the smallest possible wrong answer, still outside rounding error here.
    second = exact_distances(x, cb).topk(2, dim=1, largest=False).indices[:, 1]
    bad2 = idx.clone()
    bad2[3] = second[3]
    with pytest.raises(AssertionError):
        check_indices(x, cb, bad2)
    with pytest.raises(AssertionError, match="distances off"):
        check_distances(x, cb, idx, dist * 1.01)


# ------------------------------------------------------------------ layouts and leading dims


def test_leading_dims(backend):
    x, cb = make_inputs(2 * 3 * 5, 19, 11, seed=2, device=backend.device)
    x5 = x.reshape(2, 3, 5, 11)
    idx, dist = run(backend, x5, cb)
    assert idx.shape == (2, 3, 5) and dist.shape == (2, 3, 5)
    ref_idx, _ = reference.nearest_code(x.cpu(), cb.cpu())
    check_indices(x, cb, idx.reshape(-1), ref_indices=ref_idx)
    check_distances(x, cb, idx.reshape(-1), dist.reshape(-1))
    # A 1-D x is a single vector: 0-d index.
    i1 = vqkernels.nearest_code(x[4], cb, backend=backend.name)
    assert i1.shape == () and int(i1) == int(idx.reshape(-1)[4])


@pytest.mark.parametrize("metric", METRICS)
def test_channel_strided_feature_map(backend, metric):
    """A permuted (B, D, H, W) conv feature map: D has stride H·W, no copy-free flattening."""
    b, d, h, w = 2, 12, 5, 7
    backend.require_small(b * h * w, 40, d)
    x = channels_last_x(b, d, h, w, seed=4, device=backend.device)
    assert not x.is_contiguous() and x.stride(-1) == h * w
    _, cb = make_inputs(1, 40, d, seed=4, device=backend.device)
    idx, dist = run(backend, x, cb, metric)
    assert idx.shape == (b, h, w) and dist.shape == (b, h, w)
    flat = x.contiguous().reshape(-1, d)
    check_indices(flat, cb, idx.reshape(-1), metric)
    check_distances(flat, cb, idx.reshape(-1), dist.reshape(-1), metric)


@pytest.mark.parametrize("x_layout", ["contiguous", "transposed", "row-strided", "col-strided"])
@pytest.mark.parametrize("cb_layout", ["contiguous", "transposed", "col-strided"])
def test_noncontiguous_inputs(backend, x_layout, cb_layout):
    n, k, d = 45, 23, 10
    x, cb = make_inputs(n, k, d, seed=6, device=backend.device)
    want_idx, _ = reference.nearest_code(x, cb)
    xs = x if x_layout == "contiguous" else noncontiguous(x, x_layout)
    cbs = cb if cb_layout == "contiguous" else noncontiguous(cb, cb_layout)
    idx, dist = run(backend, xs, cbs)
    # The padding of the strided buffers is NaN: reading it would show up here.
    check_indices(x, cb, idx, ref_indices=want_idx)
    check_distances(x, cb, idx, dist)


# ---------------------------------------------------------------------------- ties: lowest index


@pytest.mark.parametrize(
    "n, k, d, pairs",
    [
        (150, 70, 9, ((0, 69), (3, 64), (5, 33), (10, 11), (31, 32), (40, 63), (7, 68))),
        # Few rows, many codes: kernels that split the codes across threads/programs must fold
        # the partial minima with the same lowest-index rule.
        (4, 3001, 3, ((0, 3000), (1, 1500), (2, 2047), (700, 2999), (1024, 1025))),
    ],
    ids=["N150-K70-D9", "N4-K3001-D3"],
)
def test_duplicated_codes_integer_data(backend, n, k, d, pairs):
    """Integer data makes every score exact in fp32 whatever the summation order, so duplicated
    codes tie exactly and the lowest index must win."""
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=7, kind="integer")
    # Copy codes forward (the copy sits at a higher index), across any block boundary.
    for src, dst in pairs:
        cb[dst] = cb[src]
    if n < 10:  # make the rows hit the duplicated codes exactly
        x = cb[torch.tensor([p[0] for p in pairs[:n]])].clone()
    dist = exact_distances(x, cb)
    best = dist.min(1, keepdim=True).values
    want = (dist == best).float().argmax(1)  # first (lowest) index attaining the minimum
    assert int((dist == best).sum(1).gt(1).sum()) >= min(n, 20), "the data should contain ties"
    idx, d_out = run(backend, x.to(backend.device), cb.to(backend.device))
    assert torch.equal(idx.cpu(), want)
    assert torch.equal(d_out.cpu().double(), best.squeeze(1)), "integer distances must be exact"


@pytest.mark.parametrize("metric", METRICS)
def test_constant_codebook_picks_index_zero(backend, metric):
    """A codebook of identical codes (e.g. a fresh zero or constant init): every row ties with
    every code and must get index 0."""
    n, k, d = 37, 130, 5
    backend.require_small(n, k, d)
    x, _ = make_inputs(n, 1, d, seed=8, device=backend.device)
    for value in (0.0, 0.5):
        cb = torch.full((k, d), value, device=backend.device)
        idx = vqkernels.nearest_code(x, cb, metric, backend=backend.name)
        assert torch.equal(idx.cpu(), torch.zeros(n, dtype=torch.int64)), (value, idx)


def test_duplicated_random_codes(backend):
    """Random fp32 codes duplicated at higher indices (a dead-code restart that copied a live
    code): the same code must give the same score wherever it sits in the codebook, so the copy
    never wins."""
    n, k, d = 96, 200, 33
    backend.require_small(n, k, d)
    g = torch.Generator().manual_seed(9)
    cb = torch.randn(k, d, generator=g)
    pairs = [(1, 199), (2, 128), (15, 16), (60, 127), (63, 64), (100, 131)]
    for src, dst in pairs:
        cb[dst] = cb[src]
    srcs = torch.tensor([s for s, _ in pairs])
    assign = srcs[torch.randint(0, len(pairs), (n,), generator=g)]
    x = cb[assign] + 0.05 * torch.randn(n, d, generator=g)
    idx = vqkernels.nearest_code(x.to(backend.device), cb.to(backend.device), backend=backend.name)
    assert torch.equal(idx.cpu(), assign)


# ----------------------------------------------------------------------------- bf16 / fp16


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", LOWP_CASES)
def test_low_precision_rule(backend, case, metric):
    n, k, d, dtype = case
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, dtype, seed=10 + n, device=backend.device)
    idx, dist = run(backend, x, cb, metric)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    errs = check_low_precision(x, cb, idx, dist, metric)
    assert errs["index"] >= 0.0


def test_low_precision_rule_can_fail():
    """The rule rejects a backend that loses more than the low-precision reference does."""
    x, cb = make_inputs(300, 257, 96, torch.bfloat16, seed=11)
    worst = exact_distances(x, cb).argmax(1)
    with pytest.raises(AssertionError, match="index error"):
        check_low_precision(x, cb, worst)
    idx, dist = reference.nearest_code(x, cb)
    check_low_precision(x, cb, idx, dist)  # fp32 accumulation of bf16 inputs passes easily
    with pytest.raises(AssertionError, match="distance error"):
        check_low_precision(x, cb, idx, dist + 5.0)


# -------------------------------------------------------------------- precision="fast"


@pytest.mark.parametrize("metric", METRICS)
def test_fast_precision(backend, metric):
    """precision="fast" (tf32 products on GPUs; "exact" elsewhere) within the tf32 tolerance."""
    n, k, d = (40, 33, 24) if backend.interpreted else (700, 300, 64)
    x, cb = make_inputs(n, k, d, seed=12, device=backend.device)
    idx, dist = run(backend, x, cb, metric, precision="fast")
    check_indices(x, cb, idx, metric, precision="fast")
    check_distances(x, cb, idx, dist, metric, precision="fast")


# --------------------------------------------------------------------------- edge values


def test_cosine_zero_vectors(backend):
    """Zero rows of x and zero codes (normalized with eps): finite distances, within the rule."""
    x, cb = make_inputs(30, 12, 6, seed=13)
    x[[0, 7, 29]] = 0.0
    cb[[0, 5]] = 0.0
    x, cb = x.to(backend.device), cb.to(backend.device)
    idx, dist = run(backend, x, cb, "cosine")
    check_indices(x, cb, idx, "cosine")
    check_distances(x, cb, idx, dist, "cosine")
    assert torch.allclose(dist[[0, 7, 29]].cpu(), torch.ones(3)), dist[[0, 7, 29]]


def test_empty_input(backend):
    _, cb = make_inputs(0, 8, 5, device=backend.device)
    for shape in ((0, 5), (3, 0, 5)):
        x = torch.empty(shape, device=backend.device)
        idx, dist = run(backend, x, cb)
        assert idx.shape == shape[:-1] and idx.dtype == torch.int64
        assert dist.shape == shape[:-1] and dist.dtype == torch.float32


def test_unchecked_nan_row_documented_behaviour(backend):
    """check_inputs=False: a row of x containing NaN gets a valid index and a NaN distance; the
    other rows are unaffected (vqkernels.functional package docs)."""
    x, cb = make_inputs(20, 9, 4, seed=14)
    x[5, 2] = float("nan")
    xd, cbd = x.to(backend.device), cb.to(backend.device)
    idx, dist = run(backend, xd, cbd, check_inputs=False)
    assert 0 <= int(idx[5]) < 9 and torch.isnan(dist[5])
    keep = torch.arange(20) != 5
    check_indices(x[keep], cb, idx.cpu()[keep])
    check_distances(x[keep], cb, idx.cpu()[keep], dist.cpu()[keep])


def test_unchecked_nan_code_never_chosen_by_fused_kernels(backend):
    """check_inputs=False: a code containing NaN is never chosen by the fused kernels (all
    comparisons with NaN are false); the reference's argmin would pick it (documented)."""
    if backend.is_reference:
        pytest.skip("the reference picks NaN codes (torch.min propagates NaN), as documented")
    x, cb = make_inputs(25, 10, 4, seed=15)
    cb[3, 1] = float("nan")
    idx = vqkernels.nearest_code(
        x.to(backend.device), cb.to(backend.device), backend=backend.name, check_inputs=False
    )
    keep = torch.arange(10) != 3
    want, _ = reference.nearest_code(x, cb[keep])
    assert torch.equal(idx.cpu(), keep.nonzero().squeeze(1)[want])


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("metric", METRICS)
def test_deterministic_across_runs(backend, metric):
    n, k, d = (50, 40, 12) if backend.interpreted else (2000, 700, 40)
    x, cb = make_inputs(n, k, d, seed=16, device=backend.device)
    a = run(backend, x, cb, metric)
    b = run(backend, x, cb, metric)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(3001, 515, 37), (5, 9000, 24)], ids=lambda s: case_id(*s))
def test_cpu_same_result_for_any_thread_count(cpu_backend, restore_threads, metric, shape):
    """Row-block and code-split parallelism give the same bits for 1 and 2 threads."""
    x, cb = make_inputs(*shape, seed=17)
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(run(cpu_backend, x, cb, metric))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


# ----------------------------------------------------------------------- C++ ISA variants

ISA_SHAPES = [(64, 7, 1), (37, 16, 3), (257, 130, 33), (300, 2049, 5), (130, 300, 129)]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_cpu_isa_variants(cpu_backend, monkeypatch, isa):
    """Every register kernel of the C++ backend (VQKERNELS_CPU_ISA caps the ISA; capped to what
    this CPU has) obeys the fp32 rule, the bf16 rule and the lowest-index tie rule."""
    monkeypatch.setenv("VQKERNELS_CPU_ISA", isa)
    for n, k, d in ISA_SHAPES:
        for metric in METRICS:
            x, cb = make_inputs(n, k, d, seed=n * k, kind="gaussian")
            idx, dist = run(cpu_backend, x, cb, metric)
            check_indices(x, cb, idx, metric)
            check_distances(x, cb, idx, dist, metric)
            xb, cbb = x.bfloat16(), cb.bfloat16()
            idx, dist = run(cpu_backend, xb, cbb, metric)
            check_low_precision(xb, cbb, idx, dist, metric)
    x, cb = make_inputs(150, 70, 9, seed=7, kind="integer")
    cb[69], cb[40], cb[33] = cb[0], cb[5], cb[5]
    dist = exact_distances(x, cb)
    want = (dist == dist.min(1, keepdim=True).values).float().argmax(1)
    assert torch.equal(vqkernels.nearest_code(x, cb, backend="cpu"), want)
