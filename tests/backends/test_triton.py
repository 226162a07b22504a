"""Triton backend specifics: both precisions, block edges, tie rule across blocks, autotune
configs, deterministic reductions, fused quantize forward/backward (DESIGN.md §3, §5).

Without a GPU these run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest before triton is imported; marker ``interpret``) on small shapes.  Under the interpreter
the blocks are 16 rows x 16 codes, a row fits one D tile up to D = 64, segments are cut into
pieces of 16 rows: the shapes below straddle those edges.  Checks that need a GPU
(``torch.compile`` and ``opcheck`` of the triton_ops, which fail under the interpreter in
fake-tensor tracing, the tf32 "fast" path at scale) carry the ``cuda`` marker.

The public-API tables over every backend live in test_<op>.py; this file calls the Triton module
directly so that ``precision=`` and the raw op contracts are exercised.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import vqkernels
from vqkernels import reference
from vqkernels.testing import (
    EmaTolerance,
    assert_bitwise_equal,
    case_id,
    check_cluster_stats,
    check_distances,
    check_indices,
    check_low_precision,
    make_inputs,
    noncontiguous,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ON_DEVICE = pytest.mark.cuda if HAS_CUDA else pytest.mark.interpret

_why = vqkernels.available_backends(DEVICE)["triton"]
pytestmark = [ON_DEVICE, pytest.mark.skipif(bool(_why), reason=f"triton backend: {_why}")]

if not _why:
    T = importlib.import_module("vqkernels.triton")
    TNC = importlib.import_module("vqkernels.triton.nearest_code")
    TEMA = importlib.import_module("vqkernels.triton.ema_update")
    TQ = importlib.import_module("vqkernels.triton.quantize")

METRICS = ("l2", "cosine")
HALF = (torch.bfloat16, torch.float16)

# N around the 16-row block, K around the 16-code block, D around 16 (min dot width), 64 (one
# tile under the interpreter) and non powers of two; K = 1, K > N, N = 0.
EDGE_SHAPES = [
    (0, 5, 3),
    (1, 1, 1),
    (15, 16, 16),
    (16, 17, 17),
    (17, 1, 5),
    (33, 47, 64),
    (31, 33, 65),
    (5, 40, 100),
]


def make(n, k, d, dtype=torch.float32, **kw):
    return make_inputs(n, k, d, dtype, device=DEVICE, **kw)


# ------------------------------------------------------------------------------- nearest_code


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [pytest.param(s, id=case_id(*s)) for s in EDGE_SHAPES])
def test_nearest_code_fp32_both_precisions(shape, metric, precision):
    n, k, d = shape
    x, cb = make(n, k, d, seed=n * 7 + k + d)
    idx, dist = T.nearest_code(x, cb, metric, precision)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == (n,) and dist.shape == (n,)
    # "fast" is held to the same rule with the tf32 input rounding in the tolerance.
    check_indices(x, cb, idx, metric, precision=precision)
    check_distances(x, cb, idx, dist, metric, precision=precision)


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (33, 47, 20), (20, 18, 70)], ids=str)
def test_nearest_code_half_rule(shape, dtype, metric, precision):
    """bf16/fp16: error at most 2x the reference's own error at that precision (+ floor)."""
    n, k, d = shape
    x, cb = make(n, k, d, dtype, seed=d)
    idx, dist = T.nearest_code(x, cb, metric, precision)
    check_low_precision(x, cb, idx, dist, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_fp32_indices_equal_reference_on_clear_winners(metric):
    """Clustered rows have one clear winner: "exact" must give the reference's indices."""
    x, cb = make(45, 37, 23, kind="clustered", seed=3)
    idx, _ = T.nearest_code(x, cb, metric, "exact")
    ref, _ = reference.nearest_code(x, cb, metric)
    assert torch.equal(idx.cpu(), ref.cpu())


@pytest.mark.parametrize("positions", [(3, 5), (3, 20), (20, 40), (0, 47)], ids=str)
def test_ties_go_to_lowest_index_within_and_across_blocks(positions):
    """Duplicated codes give bit-identical scores (integer data: exact in fp32): the lowest index
    wins whether the copies share a 16-code block or lie in different blocks."""
    lo, hi = positions
    x, cb = make(40, 48, 9, kind="integer", seed=11)
    cb[hi] = cb[lo]
    x[:20] = cb[lo]  # rows sitting exactly on the duplicated code
    for metric in METRICS:
        for precision in ("exact", "fast"):
            idx, dist = T.nearest_code(x, cb, metric, precision)
            ref, _ = reference.nearest_code(x, cb, metric)
            assert torch.equal(idx.cpu(), ref.cpu()), (metric, precision)
            assert bool((idx[:20] <= lo).all())


@pytest.mark.parametrize("splits", [2, 3, 16])
def test_split_k_is_bit_identical(splits, monkeypatch):
    """Searching code ranges in parallel (split-K, used on a GPU for small N) and folding the
    partials gives the same bits as one sweep, ties included: 3 splits of 64 codes put the
    duplicated codes 5 and 40 in different splits; 16 splits leave most splits empty."""
    x, cb = make(21, 50, 9, kind="integer", seed=17)
    cb[40] = cb[5]
    x[:6] = cb[5]
    want = {}
    for metric in METRICS:
        want[metric] = T.nearest_code(x, cb, metric, "exact")
    want_q = T.quantize(x, cb, 0.25, "l2", True, "exact")
    monkeypatch.setattr(TNC, "FORCE_SPLITS", splits)
    assert TNC.num_splits(21, 50, DEVICE) == splits
    for metric in METRICS:
        got = T.nearest_code(x, cb, metric, "exact")
        assert_bitwise_equal(got, want[metric], f"split {metric}")
    assert bool((want["l2"][0][:6] == 5).all())
    assert_bitwise_equal(T.quantize(x, cb, 0.25, "l2", True, "exact"), want_q, "split quantize")


def test_split_heuristic():
    assert TNC.num_splits(100, 16384, torch.device("cpu")) == 1  # CPU (interpreter): never
    if HAS_CUDA and TNC.FORCE_SPLITS is None:
        sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
        assert TNC.num_splits(1024, 16384, DEVICE) > 1
        assert TNC.num_splits(128 * sms, 16384, DEVICE) == 1
        assert TNC.num_splits(1024, 256, DEVICE) == 1  # too few codes to split


def test_all_codes_equal_picks_index_zero():
    x, cb = make(19, 1, 6)
    cb = cb.expand(35, 6).contiguous()
    for metric in METRICS:
        idx, _ = T.nearest_code(x, cb, metric, "exact")
        assert bool((idx == 0).all())


@pytest.mark.parametrize("how", ["transposed", "row-strided", "col-strided"])
def test_nearest_code_noncontiguous(how):
    x, cb = make(21, 19, 10, kind="clustered", seed=5)
    want, _ = T.nearest_code(x, cb, "l2", "exact")
    for xx, cc in ((noncontiguous(x, how), cb), (x, noncontiguous(cb, how))):
        idx, dist = T.nearest_code(xx, cc, "l2", "exact")
        assert torch.equal(idx, want)
        check_distances(x, cb, idx, dist, "l2")


def test_nan_code_never_chosen_and_nan_row_documented():
    x, cb = make(18, 20, 7, kind="clustered", seed=2)
    cb[4, 2] = float("nan")
    x[3, 1] = float("nan")
    for metric in METRICS:
        idx, dist = T.nearest_code(x, cb, metric, "exact")
        assert bool((idx != 4).all())
        assert 0 <= int(idx[3]) < 20 and math.isnan(float(dist[3]))
        others = torch.ones(18, dtype=torch.bool, device=DEVICE)
        others[3] = False
        assert bool(torch.isfinite(dist[others]).all())


def test_cosine_zero_vectors():
    """Zero codes/rows: norms clamp at 1e-12 as in the reference (zero code scores 0, zero row
    has distance 1)."""
    x, cb = make(17, 18, 5, seed=4)
    cb[2] = 0.0
    x[0] = 0.0
    idx, dist = T.nearest_code(x, cb, "cosine", "exact")
    ref, rdist = reference.nearest_code(x, cb, "cosine")
    assert torch.equal(idx.cpu(), ref.cpu())
    torch.testing.assert_close(dist, rdist, atol=1e-6, rtol=0)
    assert float(dist[0]) == 1.0


def test_bad_arguments():
    x, cb = make(4, 3, 5)
    with pytest.raises(ValueError, match="metric"):
        T.nearest_code(x, cb, "dot", "exact")
    with pytest.raises(ValueError, match="precision"):
        T.nearest_code(x, cb, "l2", "tf32")
    with pytest.raises(TypeError, match="dtype"):
        T.nearest_code(x, cb.half(), "l2", "exact")
    with pytest.raises(ValueError, match="codebook"):
        T.nearest_code(x, cb[:, :4], "l2", "exact")


def test_public_api_routes_precision_to_triton():
    x, cb = make(20, 17, 9, seed=8)
    for precision in ("exact", "fast"):
        idx, dist = vqkernels.nearest_code(
            x, cb, "l2", return_distance=True, backend="triton", precision=precision
        )
        check_indices(x, cb, idx, "l2", precision=precision)
        check_distances(x, cb, idx, dist, "l2", precision=precision)


# ------------------------------------------------------------------------------ autotune setup


def _hopper_configs():
    import triton

    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in TNC._HOPPER_SHAPES
    ]


def test_interpreter_uses_one_small_config():
    if HAS_CUDA:
        pytest.skip("GPU run: the Hopper configs are in use")
    assert len(TNC.SEARCH_CONFIGS) == 1
    c = TNC.SEARCH_CONFIGS[0]
    assert c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 256


def test_hopper_configs_are_sane():
    """Power-of-two blocks >= 16 (tl.dot minimum), wgmma-friendly warps, distinct entries."""
    shapes = TNC._HOPPER_SHAPES
    assert len(set(shapes)) == len(shapes) >= 4
    for bn, bk, w, s in shapes:
        for b in (bn, bk):
            assert b >= 16 and b & (b - 1) == 0
        assert w in (4, 8) and 1 <= s <= 5


class _FakeX:
    def __init__(self, elsize):
        self._e = elsize

    def element_size(self):
        return self._e


@pytest.mark.parametrize("elsize", [2, 4])
@pytest.mark.parametrize("k", [1, 100, 16384])
@pytest.mark.parametrize("d", [8, 64, 256, 1024])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_config_pruning(k, d, elsize, precision):
    """Pruning (with the launch constants a GPU run uses) drops configs wider than K, over the
    shared-memory budget or over the accumulator-register cap of the path, and never leaves
    nothing to run."""
    import triton

    dtype = torch.float32 if elsize == 4 else torch.bfloat16
    meta = TNC.search_meta(torch.empty(0, dtype=dtype), d, precision, interpret=False)
    assert meta["IS_SINGLE_D_TILE"] == (d <= (128 if elsize == 2 else 64))
    fma = elsize == 4 and precision == "exact"
    assert meta["USE_TF32"] == (elsize == 4 and precision == "fast")
    named = {"K": k, "x_ptr": _FakeX(elsize), "N_BUCKET": 65536}
    kept = TNC.prune_search_configs(_hopper_configs(), named, **meta)
    assert kept
    if len(kept) > 1:
        for c in kept:
            bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            assert bk <= max(16, triton.next_power_of_2(k))
            stages = c.num_stages
            x_tile = bn * meta["BLOCK_D"] * elsize * (1 if meta["IS_SINGLE_D_TILE"] else stages)
            assert stages * bk * meta["BLOCK_D"] * elsize + x_tile <= TNC._SMEM_BUDGET
            assert bn * bk <= (32 if fma else 64) * 32 * c.num_warps
    if k >= 256:
        assert len(kept) >= (2 if fma else 3)  # something left to tune


def test_autotune_off_keeps_first_fitting_config(monkeypatch):
    meta = TNC.search_meta(torch.empty(0, dtype=torch.float32), 64, "exact", interpret=False)
    named = {"K": 4096, "x_ptr": _FakeX(4), "N_BUCKET": 65536}
    on = TNC.prune_search_configs(_hopper_configs(), named, **meta)
    monkeypatch.setenv("VQKERNELS_TRITON_AUTOTUNE", "0")
    off = TNC.prune_search_configs(_hopper_configs(), named, **meta)
    assert len(on) > 1 and len(off) == 1 and str(off[0]) == str(on[0])
    assert off[0].kwargs == {"BLOCK_N": 128, "BLOCK_K": 64} and off[0].num_warps == 8


def test_block_d_is_not_autotuned():
    """BLOCK_D (the reduction split) comes from the launcher, so every autotuned config sums each
    dot product in the same order: no config key may carry it."""
    for c in TNC.SEARCH_CONFIGS + _hopper_configs():
        assert "BLOCK_D" not in c.kwargs


# --------------------------------------------------------------------- cluster_stats / EMA


STATS_CASES = [
    (0, 3, 4),  # N = 0
    (1, 1, 1),
    (37, 5, 7),  # pieces of 16 rows: several per code
    (20, 50, 33),  # K > N: empty codes
    (70, 9, 17),
    (90, 3, 17),  # ~30 rows per code: every segment spans 2+ pieces
]


@pytest.mark.parametrize("shape", STATS_CASES, ids=lambda s: f"N{s[0]}-K{s[1]}-D{s[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cluster_stats_matches_reference(shape, dtype):
    n, k, d = shape
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, d, generator=g).to(device=DEVICE, dtype=dtype)
    idx = torch.randint(-1, k, (n,), generator=g).to(DEVICE)
    counts, sums = T.cluster_stats(x, idx, k)
    check_cluster_stats(x, idx, k, counts, sums)


def test_cluster_stats_collapsed_codebook_spans_many_pieces():
    """Every row on one code (codebook collapse): the segment is split into pieces and summed
    in order; the result must still match and be reproducible."""
    n, k, d = 83, 6, 5
    x, _ = make(n, k, d, seed=9)
    idx = torch.full((n,), 4, dtype=torch.int64, device=DEVICE)
    idx[::7] = -1
    counts, sums = T.cluster_stats(x, idx, k)
    check_cluster_stats(x, idx, k, counts, sums)
    assert float(counts[4]) == float((idx == 4).sum())
    assert_bitwise_equal((counts, sums), T.cluster_stats(x, idx, k), "cluster_stats rerun")


def test_cluster_stats_noncontiguous_x():
    x, _ = make(30, 4, 9, seed=1)
    idx = torch.arange(30, device=DEVICE) % 4
    want = T.cluster_stats(x, idx, 4)
    assert_bitwise_equal(T.cluster_stats(noncontiguous(x, "col-strided"), idx, 4), want)
    assert_bitwise_equal(T.cluster_stats(noncontiguous(x, "transposed"), idx, 4), want)


def test_segments_cover_every_row_once():
    n, k, chunk = 50, 7, 16
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, k, (n,), generator=g)
    idx[:30] = 2  # one long segment: 2+ pieces
    perm, start, end, first, npieces, piece_code = TEMA._segments(idx, k, chunk)
    assert piece_code.shape[0] == k + math.ceil(n / chunk)
    seen = []
    for code in range(k):
        rows = perm[start[code] : end[code]].tolist()
        assert all(int(idx[r]) == code for r in rows) and rows == sorted(rows)
        assert int(npieces[code]) == max(1, math.ceil(len(rows) / chunk))
        seen += rows
        assert (piece_code[first[code] : first[code] + npieces[code]] == code).all()
    assert sorted(seen) == sorted((idx >= 0).nonzero().squeeze(1).tolist())
    assert (piece_code[int(npieces.sum()) :] == k).all()


def _ema_state(k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    cs = (torch.rand(k, generator=g) * 3).to(DEVICE)
    es = torch.randn(k, d, generator=g).to(DEVICE)
    cb = torch.randn(k, d, generator=g).to(DEVICE)
    return cb, cs, es


@pytest.mark.parametrize(
    "shape", [(37, 5, 7), (20, 50, 33), (1, 1, 1), (0, 4, 3), (90, 6, 5, "skewed")], ids=str
)
def test_ema_update_matches_reference_over_steps(shape):
    n, k, d = shape[:3]
    decay, eps = 0.9, 1e-5
    got = _ema_state(k, d)
    want = tuple(t.clone() for t in got)
    tol = EmaTolerance(k, d, eps)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(n, d, generator=g).to(DEVICE)
        idx = torch.randint(-1, k, (n,), generator=g).to(DEVICE)
        if len(shape) > 3:  # half the rows on one code: a segment of several pieces
            idx[: n // 2] = step % k
        T.ema_update_(*got, x, idx, decay, eps)
        reference.ema_update_(*want, x, idx, decay, eps)
        tol.step(x, idx, decay, want[2])
        tol.check(got, want)


def test_ema_update_bitwise_reproducible():
    n, k, d = 70, 6, 11
    x, _ = make(n, k, d, seed=12)
    idx = torch.randint(-1, k, (n,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    idx[:40] = 3  # a multi-piece segment
    a = _ema_state(k, d, seed=2)
    b = tuple(t.clone() for t in a)
    T.ema_update_(*a, x, idx, 0.95, 1e-5)
    T.ema_update_(*b, x, idx, 0.95, 1e-5)
    assert_bitwise_equal(a, b, "EMA state")


def test_ema_update_decay_edges():
    """decay = 1 keeps the state (codebook refreshed from it); decay = 0 replaces it."""
    n, k, d = 25, 4, 6
    x, _ = make(n, k, d, seed=6)
    idx = torch.arange(n, device=DEVICE) % k
    for decay in (0.0, 1.0):
        got = _ema_state(k, d, seed=4)
        want = tuple(t.clone() for t in got)
        T.ema_update_(*got, x, idx, decay, 1e-5)
        reference.ema_update_(*want, x, idx, decay, 1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- quantize


def _ref_quantize(x, cb, beta, metric, codebook_loss):
    xr = x.detach().clone().requires_grad_(x.requires_grad)
    cr = cb.detach().clone().requires_grad_(cb.requires_grad)
    return xr, cr, reference.quantize(xr, cr, beta, metric, codebook_loss)


@pytest.mark.parametrize("codebook_loss", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 16, 17), (33, 21, 70)], ids=str)
def test_quantize_forward_backward(shape, metric, codebook_loss):
    n, k, d = shape
    x, cb = make(n, k, d, kind="clustered", seed=k)
    x.requires_grad_(True)
    cb.requires_grad_(codebook_loss)
    q, idx, loss = T.quantize(x, cb, 0.3, metric, codebook_loss, "exact")
    xr, cr, (rq, ridx, rloss) = _ref_quantize(x, cb, 0.3, metric, codebook_loss)
    assert torch.equal(idx, ridx)
    # quantized holds the chosen codes' values exactly (the reference's x + (q − x) rounds)
    assert torch.equal(q.detach(), cb.detach()[idx])
    torch.testing.assert_close(q, rq, rtol=0, atol=1e-6)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-7)
    gq = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (q * gq).sum().add(loss * 1.7).backward()
    (rq * gq).sum().add(rloss * 1.7).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
    if codebook_loss:
        torch.testing.assert_close(cb.grad, cr.grad, rtol=1e-5, atol=1e-7)
    else:
        assert cb.grad is None


def test_quantize_empty_input():
    x = torch.empty(0, 6, device=DEVICE, requires_grad=True)
    cb = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    q, idx, loss = T.quantize(x, cb, 0.25, "l2", True, "exact")
    assert q.shape == (0, 6) and idx.shape == (0,) and float(loss.detach()) == 0.0
    (q.sum() + loss).backward()
    assert x.grad.shape == (0, 6)
    assert torch.equal(cb.grad, torch.zeros_like(cb))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_quantize_half(dtype):
    """Low precision: the search follows the bf16/fp16 rule; given the indices the gather is
    exact and the loss/gradients are fp32 computations of the same values as the reference."""
    x, cb = make(40, 19, 24, dtype, kind="clustered", seed=7)
    x.requires_grad_(True)
    cb.requires_grad_(True)
    q, idx, loss = T.quantize(x, cb, 0.25, "l2", True, "fast")
    assert q.dtype == dtype and loss.dtype == torch.float32
    check_low_precision(x.detach(), cb.detach(), idx)
    assert torch.equal(q.detach(), cb.detach()[idx])
    xf, cf = x.detach().float(), cb.detach().float()
    want = 1.25 * ((xf - cf[idx]) ** 2).sum() / x.numel()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    q.float().sum().add(loss).backward()
    gx, gc = reference.quantize_backward(
        torch.ones_like(x), torch.ones((), device=DEVICE), x.detach(), cb.detach(), idx, 0.25, True
    )
    torch.testing.assert_close(x.grad, gx, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(cb.grad.float(), gc.float(), rtol=1e-2, atol=1e-3)


def test_quantize_backward_matches_closed_form_and_is_deterministic():
    n, k, d = 60, 5, 9
    x, cb = make(n, k, d, seed=13)
    idx, _ = reference.nearest_code(x, cb)
    g = torch.Generator().manual_seed(2)
    gq = torch.randn(n, d, generator=g).to(DEVICE)
    gl = torch.tensor(0.7, device=DEVICE)
    got = TQ.quantize_backward(gq, gl, x, cb, idx, 0.4, True)
    want = reference.quantize_backward(gq, gl, x, cb, idx, 0.4, True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    assert_bitwise_equal(got, TQ.quantize_backward(gq, gl, x, cb, idx, 0.4, True), "backward")
    # non-contiguous grad_q and x give the same bits
    alt = TQ.quantize_backward(
        noncontiguous(gq, "transposed"), gl, noncontiguous(x, "row-strided"), cb, idx, 0.4, True
    )
    assert_bitwise_equal(got, alt, "backward (strided)")
    gx, gc = TQ.quantize_backward(gq, gl, x, cb, idx, 0.4, False)
    assert gc is None and torch.equal(gx, got[0])


def test_quantize_only_one_output_used():
    """Autograd with grad only through the loss, or only through quantized."""
    x, cb = make(20, 7, 6, kind="clustered", seed=1)
    for use in ("loss", "quantized"):
        xx = x.clone().requires_grad_(True)
        cc = cb.clone().requires_grad_(True)
        q, _, loss = T.quantize(xx, cc, 0.25, "l2", True, "exact")
        (loss if use == "loss" else q.sum()).backward()
        xr, cr, (rq, _, rloss) = _ref_quantize(xx, cc, 0.25, "l2", True)
        (rloss if use == "loss" else rq.sum()).backward()
        torch.testing.assert_close(xx.grad, xr.grad, rtol=1e-5, atol=1e-8)
        if cr.grad is None:  # no path from quantized to the codebook: None or zeros both fine
            assert cc.grad is None or not bool(cc.grad.any())
        else:
            torch.testing.assert_close(cc.grad, cr.grad, rtol=1e-5, atol=1e-8)


def test_quantize_public_api_triton():
    x, cb = make(3 * 7, 11, 5, kind="clustered", seed=21)
    x3 = x.reshape(3, 7, 5).requires_grad_(True)
    q, idx, loss = vqkernels.quantize(x3, cb, 0.25, backend="triton", precision="fast")
    assert q.shape == (3, 7, 5) and idx.shape == (3, 7)
    loss.backward()
    assert x3.grad is not None and x3.grad.shape == x3.shape


_TRACE_SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
import vqkernels.triton as T
from torch._functorch.aot_autograd import aot_module_simplified

class Captured(Exception):
    pass

graphs = []

def backend(gm, inputs):
    def fw(g, ins):
        graphs.append(g.code)
        raise Captured()
    return aot_module_simplified(gm, inputs, fw_compiler=fw)

def step(x, cb, cb2, cs, es):
    i, d = T.nearest_code(x, cb, "cosine", "fast")
    q, j, loss = T.quantize(x, cb, 0.25, "l2", False, "exact")
    T.ema_update_(cb2, cs, es, x, j, 0.99, 1e-5)
    return i, d, q, loss

x, cb = torch.randn(37, 9), torch.randn(20, 9)
state = (torch.randn(20, 9), torch.rand(20), torch.randn(20, 9))
torch._dynamo.mark_dynamic(x, 0)
try:
    torch.compile(step, backend=backend, fullgraph=True)(x, cb, *state)
except Exception as exc:
    if not graphs:
        raise
print("RESULT" + json.dumps({"code": graphs[0]}))
"""


def test_compile_traces_into_kernels_with_dynamic_n():
    """torch.compile(fullgraph=True) traces through the triton_ops down to the kernels (no graph
    break) with a dynamic N, and no launcher turns N into a constant (which would specialize the
    graph).  Runs on CPU without a GPU: a subprocess without the interpreter traces and stops
    before anything launches (the GPU run checks compiled results: test_gpu_compile_*)."""
    if HAS_CUDA:
        pytest.skip("the GPU run compiles and runs for real")
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    code = json.loads(lines[0][len("RESULT") :])["code"]
    # 2 launches for nearest_code, 3 for quantize, 4 for ema_update_ (kernels appear by index)
    assert code.count("triton_kernel_wrapper_functional(") >= 9, code
    # N is symbolic: no kernel gets a literal row count 37 or numel 333
    assert "'N': 37" not in code and "333" not in code, code


# Ahead-of-time compilation for Hopper (sm_90) without a GPU: Triton's NVIDIA backend and its
# bundled ptxas/cuobjdump build and inspect the cubins on the CPU.  Catches what the
# interpreter cannot: type errors of the compiled language (an int argument equal to 1 arrives
# as a constexpr), shared-memory overflows and register spills of the shipped configs.
_SM90_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

NC = importlib.import_module("vqkernels.triton.nearest_code")
EM = importlib.import_module("vqkernels.triton.ema_update")
QZ = importlib.import_module("vqkernels.triton.quantize")
SP = importlib.import_module("vqkernels.triton.sampling")
CS = importlib.import_module("vqkernels.triton.codebook_softmax")
CSQ = importlib.import_module("vqkernels.triton.codebook_softmax_soft")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTR = {"f32": "*fp32", "bf16": "*bf16", "f16": "*fp16", "i64": "*i64", "i32": "*i32"}


def build(kernel, args, num_warps=4, num_stages=2):
    # Specialize like the launcher: ints equal to 1 become constexprs, pointers and ints that
    # are multiples of 16 carry the divisibility hint.
    jit = kernel
    while not isinstance(jit, triton.runtime.jit.JITFunction):
        jit = jit.fn
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(jit.arg_names):
        v = args[name]
        if jit.params[i].is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = PTR[v], [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(jit, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                         capture_output=True, text=True).stdout
    sass = subprocess.run([os.path.join(BIN, "nvdisasm"), f.name], capture_output=True,
                          text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return {"reg": int(m.group(1)), "stack": int(m.group(2)), "smem": k.metadata.shared,
            "hgmma": sass.count("HGMMA")}


def search(dt, n, k, d, splits, meta, bn, bk):
    return dict(x_ptr=dt, stride_xn=d, stride_xd=1, stride_xh=d, cb_ptr=dt, stride_ck=d,
                stride_cd=1, stride_ch=k * d, aux_ptr="f32", idx_ptr="i64", dist_ptr="f32",
                part_best_ptr="f32", part_idx_ptr="i32", q_ptr=dt, stride_qn=d, stride_qh=d,
                err_ptr="f32", N=n, K=k, D=d, H=8, N_BUCKET=1024, EPS=1e-12, BLOCK_N=bn, BLOCK_K=bk, IS_COSINE=splits > 1,
                NUM_SPLITS=splits, **meta)


out = {}
if sys.argv[1] == "kernels":
    m32 = NC.search_meta(torch.empty(0), 1, "exact", interpret=False)
    m16 = NC.search_meta(torch.empty(0, dtype=torch.bfloat16), 192, "fast", interpret=False)
    modd = NC.search_meta(torch.empty(0, dtype=torch.float16), 200, "exact", interpret=False)
    jobs = {
        "code_aux": (NC._code_aux_kernel, dict(cb_ptr="bf16", stride_ck=1, stride_cd=1,
                     aux_ptr="f32", K=1, D=1, EPS=1e-12, BLOCK_K=64, BLOCK_D=128, IS_COSINE=True)),
        "nearest_n1": (NC._nearest_code_kernel, search("f32", 1, 1, 1, 1, m32, 64, 64)),
        "nearest_split": (NC._nearest_code_kernel, search("bf16", 100, 4096, 192, 4, m16, 64, 128)),
        "nearest_odd_d": (NC._nearest_code_kernel, search("f16", 100, 4096, 200, 1, modd, 64, 128)),
        "nearest_combine": (NC._nearest_combine_kernel, dict(x_ptr="f32", stride_xn=1,
                            stride_xd=1, stride_xh=1, part_best_ptr="f32", part_idx_ptr="i32",
                            idx_ptr="i64", dist_ptr="f32", N=1, D=1, H=1, EPS=1e-12, BLOCK_N=64,
                            BLOCK_D=16, IS_COSINE=True, NUM_SPLITS=4)),
        "quantize_fwd": (QZ._quantize_fwd_kernel, search("bf16", 1, 1, 192, 1, m16, 64, 64)),
        "quantize_combine": (QZ._quantize_combine_kernel, dict(x_ptr="f16", stride_xn=64,
                             stride_xd=1, stride_xh=64, cb_ptr="f16", stride_ck=64, stride_cd=1,
                             stride_ch=64 * 512, part_best_ptr="f32", part_idx_ptr="i32",
                             q_ptr="f16", stride_qn=64, stride_qh=64, idx_ptr="i64",
                             err_ptr="f32", N=1000, D=64, H=8,
                             BLOCK_N=64, BLOCK_D=64, NUM_SPLITS=3)),
        "loss": (QZ._loss_kernel, dict(err_ptr="f32", loss_ptr="f32", N=1, D=1, beta=0.25,
                 BLOCK=1024, HAS_CODEBOOK_LOSS=True)),
        "backward_x": (QZ._quantize_bwd_x_kernel, dict(gq_ptr="bf16", stride_gn=1, stride_gd=1,
                       gl_ptr="f32", x_ptr="bf16", stride_xn=1, stride_xd=1, cb_ptr="bf16",
                       stride_ck=1, stride_cd=1, idx_ptr="i64", gx_ptr="bf16", stride_on=1,
                       beta=0.25, N=1, D=1, BLOCK_N=32, BLOCK_D=128)),
        "segment_partial": (EM._segment_partial_kernel, dict(x_ptr="bf16", stride_xn=7,
                            stride_xd=1, cb_ptr="bf16", stride_ck=7, stride_cd=1,
                            perm_ptr="i64", start_ptr="i64", end_ptr="i64",
                            piece_first_ptr="i64", piece_code_ptr="i64", part_ptr="f32",
                            stride_pp=7, K=1, D=7, CHUNK=256, BLOCK_R=32, BLOCK_D=16,
                            HAS_SUBTRACT=True)),
        "segment_combine_grad": (EM._segment_combine_kernel, dict(part_ptr="f32", stride_pp=1,
                                 piece_first_ptr="i64", npieces_ptr="i64", start_ptr="i64",
                                 end_ptr="i64", sums_ptr="bf16", stride_sk=1, counts_ptr="f32",
                                 scale_ptr="f32", scale=-2.0, decay=0.0, one_minus_decay=0.0,
                                 N=1, K=1, D=1, BLOCK_KC=16, BLOCK_D=16, IS_EMA=False,
                                 HAS_SCALE=True)),
        "segment_combine_ema": (EM._segment_combine_kernel, dict(part_ptr="f32", stride_pp=64,
                                piece_first_ptr="i64", npieces_ptr="i64", start_ptr="i64",
                                end_ptr="i64", sums_ptr="f32", stride_sk=64, counts_ptr="f32",
                                scale_ptr="f32", scale=1.0, decay=0.99, one_minus_decay=0.01,
                                N=5000, K=512, D=64, BLOCK_KC=16, BLOCK_D=64, IS_EMA=True,
                                HAS_SCALE=False)),
        "sum": (EM._sum_kernel, dict(v_ptr="f32", out_ptr="f32", K=1, BLOCK=1024)),
        "ema_refresh": (EM._ema_refresh_kernel, dict(cb_ptr="f32", stride_ck=1, es_ptr="f32",
                        stride_ek=1, cs_ptr="f32", n_ptr="f32", eps=1e-5, K=1, KT=1, D=1,
                        BLOCK_KC=16, BLOCK_D=16)),
        "ema_refresh_heads": (EM._ema_refresh_kernel, dict(cb_ptr="f32", stride_ck=64,
                              es_ptr="f32", stride_ek=64, cs_ptr="f32", n_ptr="f32", eps=1e-5,
                              K=512, KT=4096, D=64, BLOCK_KC=16, BLOCK_D=64)),
        "backward_x_rotation": (QZ._quantize_bwd_x_rotation_kernel, dict(gq_ptr="bf16",
                                stride_gn=256, stride_gd=1, gl_ptr="f32", x_ptr="bf16",
                                stride_xn=256, stride_xd=1, cb_ptr="bf16", stride_ck=256,
                                stride_cd=1, idx_ptr="i64", gx_ptr="bf16", stride_on=256,
                                beta=0.25, N=1000, D=256, EPS=1e-6, BLOCK_N=32, BLOCK_D=64)),
        "sample": (SP._sample_kernel, dict(x_ptr="f32", stride_xn=256, stride_xd=1,
                   stride_xh=32, cb_ptr="f32", stride_ck=32, stride_cd=1, stride_ch=32 * 512,
                   aux_ptr="f32", idx_ptr="i64", dist_ptr="f32", seed_key=123456, inv_temp=0.5,
                   N=1000, K=512, D=32, H=8, EPS=1e-12, L2_EPS=1e-8, BLOCK_N=64, BLOCK_K=64,
                   BLOCK_D=32, IS_COSINE=False)),
    }
    # codebook_softmax: grouped mean_probs (HAS_GROUPS) and not, l2 and euclidean logits.
    cs = dict(x_ptr="bf16", stride_xn=64, stride_xd=1, xsq_ptr="f32", c_ptr="bf16",
              stride_ck=64, stride_cd=1, csq_ptr="f32", N=1000, K=4096, D=64, inv_tau=2.0,
              BLOCK_N=32, BLOCK_K=64, BLOCK_D=64)
    bwd = dict(lse_rel_ptr="f32", gl_ptr="f32", gh_ptr="f32", ent_ptr="f32", w_ptr="f32",
               gm_ptr="f32", gbar_ptr="f32", grp_ptr="i64")
    for g in (True, False):
        m = 0 if g else 2
        jobs[f"cd_code_fwd_groups{g}"] = (CS._cd_code_fwd_kernel, dict(cs, lse_rel_ptr="f32",
            w_ptr="f32", mp_ptr="f32", perm_ptr="i64", seg_ptr="i64", METRIC=m, HAS_GROUPS=g))
        jobs[f"cd_gbar_groups{g}"] = (CS._cd_row_gbar_kernel, dict(cs, lse_rel_ptr="f32",
            gm_ptr="f32", gbar_ptr="f32", grp_ptr="i64", METRIC=m, HAS_GROUPS=g))
        jobs[f"cd_row_bwd_groups{g}"] = (CS._cd_row_bwd_kernel, dict(cs, **bwd, gx_ptr="f32",
            METRIC=m, HAS_GROUPS=g))
        jobs[f"cd_code_bwd_groups{g}"] = (CS._cd_code_bwd_kernel, dict(cs, **bwd, gc_ptr="f32",
            METRIC=m, HAS_GROUPS=g))
    jobs["cd_row_fwd"] = (CS._cd_row_fwd_kernel, dict(cs, lse_rel_ptr="f32", lse_ptr="f32",
                          ent_ptr="f32", METRIC=0))
    jobs["sq_row_fwd"] = (CSQ._sq_row_fwd_kernel, dict(cs, v_ptr="bf16", stride_vk=64,
                          stride_vd=1, out_ptr="bf16", lse_ptr="f32", idx_ptr="i64", METRIC=1))
    for name, (kern, args) in jobs.items():
        try:
            out[name] = build(kern, args)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:800]}"}
else:
    dt, precision, d = sys.argv[2], sys.argv[3], int(sys.argv[4])
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}[dt]
    meta = NC.search_meta(torch.empty(0, dtype=tdt), d, precision, interpret=False)
    named = {"K": 16384, "x_ptr": torch.empty(0, dtype=tdt), "N_BUCKET": 65536}
    configs = [triton.Config({"BLOCK_N": a, "BLOCK_K": b}, num_warps=w, num_stages=st)
               for a, b, w, st in NC._HOPPER_SHAPES]
    for c in NC.prune_search_configs(configs, named, **meta):
        a = search(dt, 65536, 16384, d, 1, meta, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
        r = build(NC._nearest_code_kernel, a, c.num_warps, c.num_stages)
        out[f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}/w{c.num_warps}/s{c.num_stages}"] = r
print("RESULT" + json.dumps(out))
"""


def _run_sm90(*argv):
    import json
    import os
    import subprocess
    import sys

    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bindir, "cuobjdump")):
        pytest.skip("triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", _SM90_SCRIPT, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    return json.loads(lines[0][len("RESULT") :])


@pytest.mark.slow
def test_sm90_every_kernel_compiles():
    """Every kernel compiles for sm_90 with sizes of 1 (constexpr-specialized), mixed dtypes and
    both branches of its flags, within the shared-memory limit and (aligned rows) without
    spills."""
    out = _run_sm90("kernels")
    errors = {k: v["error"] for k, v in out.items() if "error" in v}
    assert not errors, errors
    for name, r in out.items():
        assert r["smem"] <= 227 * 1024, (name, r)
        # Rows whose stride is not a multiple of 16 elements (D = 200) cannot use vector loads
        # and need per-element addresses: that variant may spill; it only has to compile.
        # The codebook_softmax kernels (cd_*, sq_*: fp32 "ieee" tile products, no tensor cores)
        # spill at their shipped 32x64 tiles, grouped or not (recorded in the issue-11 notes):
        # a tuning item for the first GPU session; here they only have to compile.
        assert r["stack"] == 0 or name.endswith("_odd_d") or name.startswith(("cd_", "sq_")), (
            name,
            r,
        )
    assert out["nearest_split"]["hgmma"] > 0  # bf16 search on the wgmma tensor-core path


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,precision,d",
    [("bf16", "fast", 64), ("bf16", "fast", 256), ("f32", "fast", 64), ("f32", "exact", 200)],
    ids=str,
)
def test_sm90_search_configs_fit(dtype, precision, d):
    """Every config the autotuner may try for this path compiles for sm_90 within the
    shared-memory limit, with (nearly) no register spills, and tensor-core paths use wgmma."""
    out = _run_sm90("configs", dtype, precision, str(d))
    assert out
    for name, r in out.items():
        assert r["smem"] <= 227 * 1024, (name, r)
        # Measured stack (spill) bytes: 0 on every config with Triton 3.9 and 3.8; 48 with
        # Triton 3.6 (the GPU image's) on 64x64/w4/s3 for fp32 "exact" with D split in tiles
        # (255 registers, the FMA tile at its 32-accumulator cap; see prune_search_configs).
        # A few dozen bytes stay in L1; a config that spills more than that is a regression.
        assert r["stack"] <= 64, (name, r)
        if precision == "fast" and not name.startswith("32x"):
            assert r["hgmma"] > 0, (name, r)


# ------------------------------------------------------------------------------ GPU only


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4099, 1031, 67), (2048, 4096, 256), (300, 16384, 8)], ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_nearest_code_at_scale(shape, dtype, metric):
    n, k, d = shape
    x, cb = make(n, k, d, dtype, seed=1)
    for precision in ("exact", "fast"):
        idx, dist = T.nearest_code(x, cb, metric, precision)
        if dtype == torch.float32:
            check_indices(x, cb, idx, metric, precision=precision)
            check_distances(x, cb, idx, dist, metric, precision=precision)
        else:
            check_low_precision(x, cb, idx, dist, metric)
        # the same config is reused within the process: same bits
        assert_bitwise_equal((idx, dist), T.nearest_code(x, cb, metric, precision))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_opcheck_triton_ops():
    x, cb = make(300, 70, 33, seed=2)
    idx, _ = reference.nearest_code(x, cb)
    ops = torch.ops.vqkernels
    torch.library.opcheck(ops.nearest_code_triton, (x, cb, "l2", "exact"))
    torch.library.opcheck(ops.nearest_code_triton, (x.bfloat16(), cb.bfloat16(), "cosine", "fast"))
    torch.library.opcheck(ops.cluster_stats_triton, (x, idx, 70))
    state = _ema_state(70, 33)
    torch.library.opcheck(ops.ema_update_triton_, (*state, x, idx, 0.99, 1e-5))
    xg = x.clone().requires_grad_(True)
    cg = cb.clone().requires_grad_(True)
    torch.library.opcheck(ops.quantize_triton, (xg, cg, 0.25, "l2", True, "exact"))
    torch.library.opcheck(
        ops.quantize_backward_triton,
        (torch.randn_like(x), torch.tensor(1.0, device=DEVICE), x, cb, idx, 0.25, True),
    )


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_compile_fullgraph_matches_eager():
    x, cb = make(1000, 256, 64, kind="clustered", seed=3)
    idx_e, dist_e = T.nearest_code(x, cb, "l2", "exact")
    f = torch.compile(lambda a, b: T.nearest_code(a, b, "l2", "exact"), fullgraph=True)
    idx_c, dist_c = f(x, cb)
    assert torch.equal(idx_c, idx_e)
    torch.testing.assert_close(dist_c, dist_e)

    def step(a, b, state):
        q, i, loss = T.quantize(a, b, 0.25, "l2", False, "fast")
        T.ema_update_(*state, a.detach(), i, 0.99, 1e-5)
        return q, i, loss

    xg = x.clone().requires_grad_(True)
    s_e, s_c = _ema_state(256, 64), _ema_state(256, 64)
    q_e, i_e, l_e = step(xg, cb, s_e)
    cstep = torch.compile(step, fullgraph=True)
    xc = x.clone().requires_grad_(True)
    q_c, i_c, l_c = cstep(xc, cb, s_c)
    assert torch.equal(i_c, i_e)
    torch.testing.assert_close(q_c, q_e)
    torch.testing.assert_close(l_c, l_e)
    for a, b in zip(s_c, s_e):
        torch.testing.assert_close(a, b)
    (q_e.sum() + l_e).backward()
    (q_c.sum() + l_c).backward()
    torch.testing.assert_close(xc.grad, xg.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_ema_update_large_k_reproducible():
    n, k, d = 65536, 16384, 64
    x, _ = make(n, 1, d, seed=5)
    idx = torch.randint(-1, k, (n,), device=DEVICE)
    idx[: n // 2] = 7  # a collapsed code next to a spread of small ones
    a = _ema_state(k, d)
    b = tuple(t.clone() for t in a)
    want = tuple(t.clone() for t in a)
    T.ema_update_(*a, x, idx, 0.99, 1e-5)
    T.ema_update_(*b, x, idx, 0.99, 1e-5)
    assert_bitwise_equal(a, b, "EMA state")
    reference.ema_update_(*want, x, idx, 0.99, 1e-5)
    tol = EmaTolerance(k, d, 1e-5)
    tol.step(x, idx, 0.99, want[2])
    tol.check(a, want)
