"""quantize: straight-through forward values, the VQ-VAE loss and gradients, against the reference.

Gradients are checked analytically (argmin is piecewise constant, so finite differences and
torch.autograd.gradcheck do not apply): with ``q = codebook[idx]`` and ``numel = N·D``,

    grad_x        = grad_q + grad_loss · 2·beta·(x − q) / numel
    grad_codebook = segment_sum_k( grad_loss · (−2)·(x − q) / numel )   (codebook loss only)

computed here in float64 from the backend's own indices, and compared as well with autograd
through ``reference.quantize`` and with ``reference.quantize_backward``.
"""

from __future__ import annotations

import math

import pytest
import torch

import vqkernels
from vqkernels import reference
from vqkernels.testing import (
    U32,
    assert_bitwise_equal,
    case_id,
    channels_last_x,
    check_indices,
    check_low_precision,
    make_inputs,
)

SHAPES = [(1, 1, 1), (7, 1, 13), (5, 33, 7), (100, 65, 17), (257, 130, 33), (1000, 512, 64)]
CASES = [pytest.param(s, id=case_id(*s)) for s in SHAPES]


def expected(x, codebook, idx, beta, codebook_loss, grad_q=None, grad_loss=0.0):
    """Loss and gradients in float64 from the chosen indices (the closed forms above)."""
    d = codebook.shape[-1]
    x64 = x.detach().reshape(-1, d).double().cpu()
    q = codebook.detach().double().cpu()[idx.reshape(-1).cpu()]
    numel = max(x64.numel(), 1)
    diff = x64 - q
    sq = float((diff * diff).sum()) / numel
    loss = beta * sq + (sq if codebook_loss else 0.0)
    gq = torch.zeros_like(x64) if grad_q is None else grad_q.detach().reshape(-1, d).double().cpu()
    grad_x = gq + grad_loss * 2.0 * beta * diff / numel
    grad_cb = torch.zeros(codebook.shape, dtype=torch.float64)
    grad_cb.index_add_(0, idx.reshape(-1).cpu(), grad_loss * (-2.0) * diff / numel)
    return loss, grad_x, grad_cb


def loss_rtol(numel: int) -> float:
    """A sum of ``numel`` non-negative fp32 squares: rounding grows like sqrt(numel) for any
    realistic order (sequential, blocked, pairwise); 16x margin."""
    return 16.0 * math.sqrt(max(numel, 1)) * U32 + 1e-6


def assert_close_scaled(got, want, rtol, what):
    """|got − want| <= rtol·max|want| elementwise (a norm-wise relative check: small entries
    of a gradient may cancel, large ones must be right)."""
    got = got.detach().cpu().double().reshape(want.shape)
    scale = float(want.abs().max()) if want.numel() else 0.0
    dev = float((got - want).abs().max()) if want.numel() else 0.0
    assert dev <= rtol * scale + 1e-30, f"{what}: max |diff| {dev:.3g} > {rtol:.1g} x {scale:.3g}"


# --------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("codebook_loss", [False, True], ids=["commit", "commit+codebook"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", CASES)
def test_forward_matches_reference(backend, shape, metric, codebook_loss):
    n, k, d = shape
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=n + k, device=backend.device)
    beta = 0.25
    q, idx, loss = vqkernels.quantize(
        x, cb, beta, metric, codebook_loss=codebook_loss, backend=backend.name
    )
    assert q.shape == x.shape and q.dtype == x.dtype and q.device == x.device
    assert idx.shape == (n,) and idx.dtype == torch.int64
    assert loss.shape == () and loss.dtype == torch.float32
    check_indices(x, cb, idx, metric)
    assert torch.equal(q, cb[idx]), "quantized must hold exactly the chosen codes' values"
    want, _, _ = expected(x, cb, idx, beta, codebook_loss)
    assert abs(float(loss.detach()) - want) <= loss_rtol(x.numel()) * want + 1e-30, (
        float(loss.detach()),
        want,
    )
    # Same indices as nearest_code.
    assert torch.equal(idx, vqkernels.nearest_code(x, cb, metric, backend=backend.name))


def test_empty_input(backend):
    x = torch.empty(0, 6, device=backend.device, requires_grad=True)
    _, cb = make_inputs(0, 4, 6, device=backend.device)
    cb.requires_grad_(True)
    q, idx, loss = vqkernels.quantize(x, cb, backend=backend.name)
    assert q.shape == (0, 6) and idx.shape == (0,) and float(loss.detach()) == 0.0
    (q.sum() + loss).backward()
    assert x.grad.shape == (0, 6)
    assert cb.grad is None or not cb.grad.any()


def test_beta_zero_and_loss_terms(backend):
    """beta scales only the commitment term; the codebook term has weight 1."""
    x, cb = make_inputs(40, 9, 5, seed=1, device=backend.device)
    _, idx, l_commit = vqkernels.quantize(x, cb, 1.0, codebook_loss=False, backend=backend.name)
    _, _, l_zero = vqkernels.quantize(x, cb, 0.0, codebook_loss=False, backend=backend.name)
    _, _, l_both = vqkernels.quantize(x, cb, 0.5, codebook_loss=True, backend=backend.name)
    sq, _, _ = expected(x, cb, idx, 1.0, False)
    assert float(l_zero.detach()) == 0.0
    assert math.isclose(float(l_commit.detach()), sq, rel_tol=1e-5)
    assert math.isclose(float(l_both.detach()), 1.5 * sq, rel_tol=1e-5)


# -------------------------------------------------------------------------------- gradients


def _grad_inputs(n, k, d, device, seed, dtype=torch.float32):
    """Clustered x (no near ties, so every implementation picks the same codes)."""
    x, cb = make_inputs(n, k, d, dtype, seed=seed, kind="clustered", noise=0.3)
    g = torch.Generator().manual_seed(seed + 100)
    grad_q = torch.randn(n, d, generator=g).to(dtype)
    return x.to(device), cb.to(device), grad_q.to(device)


def _backward(fn, x, cb, grad_q, grad_loss, beta, learn_codebook, **kw):
    xr = x.detach().clone().requires_grad_(True)
    cbr = cb.detach().clone().requires_grad_(learn_codebook)
    q, idx, loss = fn(xr, cbr, beta, **kw)
    obj = loss * grad_loss
    if grad_q is not None:
        obj = obj + (q.float() * grad_q.float()).sum()
    obj.backward()
    return q, idx, loss, xr.grad, cbr.grad


@pytest.mark.parametrize("learn_codebook", [False, True], ids=["frozen-codebook", "learnable"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (64, 10, 7), (300, 129, 33), (600, 256, 48)], ids=lambda s: case_id(*s)
)
def test_gradients(backend, shape, learn_codebook):
    n, k, d = shape
    backend.require_small(n, k, d)
    beta = 0.3
    x, cb, grad_q = _grad_inputs(n, k, d, backend.device, seed=n)
    # A loss weight of ~numel makes the loss term of grad_x as large as the straight-through
    # term, so a wrong or missing loss gradient cannot hide below the tolerance.
    w = 0.37 * x.numel()
    q, idx, loss, gx, gcb = _backward(
        lambda *a, **kw: vqkernels.quantize(*a, backend=backend.name, **kw),
        x, cb, grad_q, w, beta, learn_codebook,
    )  # fmt: skip
    report = check_indices(x, cb, idx)
    assert report.mismatches == 0, report
    want_loss, want_gx, want_gcb = expected(x, cb, idx, beta, learn_codebook, grad_q, w)
    assert math.isclose(float(loss.detach()), want_loss, rel_tol=loss_rtol(x.numel()))
    assert gx.dtype == x.dtype and gx.shape == x.shape
    assert_close_scaled(gx, want_gx, 1e-5, "grad_x")
    # The loss part of grad_x alone (grad_x − grad_q), against its own scale.
    assert_close_scaled(gx.double().cpu() - grad_q.double().cpu(), want_gx - grad_q.double().cpu(),
                        1e-4, "loss part of grad_x")  # fmt: skip
    if learn_codebook:
        assert gcb is not None and gcb.dtype == cb.dtype and gcb.shape == cb.shape
        assert_close_scaled(gcb, want_gcb, 1e-5, "grad_codebook")
    else:
        assert gcb is None

    # Autograd through the reference gives the same gradients.
    _, r_idx, r_loss, r_gx, r_gcb = _backward(
        reference.quantize, x.cpu(), cb.cpu(), grad_q.cpu(), w, beta, learn_codebook
    )
    assert torch.equal(r_idx, idx.cpu())
    assert_close_scaled(gx, r_gx.double(), 1e-5, "grad_x vs reference autograd")
    if learn_codebook:
        assert_close_scaled(gcb, r_gcb.double(), 1e-5, "grad_codebook vs reference autograd")
    # ... and so does the reference's closed-form backward.
    c_gx, c_gcb = reference.quantize_backward(
        grad_q.cpu(), torch.tensor(w), x.cpu(), cb.cpu(), idx.cpu(), beta, learn_codebook
    )
    assert_close_scaled(gx, c_gx.double(), 1e-5, "grad_x vs reference.quantize_backward")
    if learn_codebook:
        assert_close_scaled(gcb, c_gcb.double(), 1e-5, "grad_codebook vs quantize_backward")


def test_codebook_loss_off_with_learnable_codebook(backend):
    """codebook_loss=False: the codebook gets no gradient even when it requires grad (the
    straight-through output carries none), and the loss is the commitment term only."""
    x, cb, grad_q = _grad_inputs(50, 8, 6, backend.device, seed=2)
    q, idx, loss, gx, gcb = _backward(
        lambda *a, **kw: vqkernels.quantize(*a, backend=backend.name, **kw),
        x, cb, grad_q, 10.0, 0.25, True, codebook_loss=False,
    )  # fmt: skip
    assert gcb is None or not gcb.any()
    want_loss, want_gx, _ = expected(x, cb, idx, 0.25, False, grad_q, 10.0)
    assert math.isclose(float(loss.detach()), want_loss, rel_tol=1e-5)
    assert_close_scaled(gx, want_gx, 1e-5, "grad_x")


@pytest.mark.parametrize("use", ["quantized-only", "loss-only"])
def test_one_output_used(backend, use):
    """Backward when only one differentiable output is used (the other's grad is None)."""
    x, cb, grad_q = _grad_inputs(30, 7, 5, backend.device, seed=3)
    xr = x.clone().requires_grad_(True)
    cbr = cb.clone().requires_grad_(True)
    q, idx, loss = vqkernels.quantize(xr, cbr, 0.25, backend=backend.name)
    if use == "quantized-only":
        (q * grad_q).sum().backward()
        want_loss_w = 0.0
    else:
        (loss * 5.0).backward()
        grad_q, want_loss_w = None, 5.0
    _, want_gx, want_gcb = expected(x, cb, idx, 0.25, True, grad_q, want_loss_w)
    assert_close_scaled(xr.grad, want_gx, 1e-5, "grad_x")
    if want_loss_w:
        assert_close_scaled(cbr.grad, want_gcb, 1e-5, "grad_codebook")
    else:
        assert cbr.grad is None or not cbr.grad.any()


def test_channel_strided_leading_dims(backend):
    """(B, H, W, D) view of a (B, D, H, W) map: output shapes follow x, gradient lands in the
    feature map's layout."""
    b, d, h, w = 2, 6, 3, 5
    fmap = channels_last_x(b, d, h, w, seed=4, device=backend.device)
    _, cb = make_inputs(1, 11, d, seed=4, device=backend.device)
    x = fmap.detach().clone().requires_grad_(True)
    q, idx, loss = vqkernels.quantize(x, cb, 0.25, backend=backend.name)
    assert q.shape == (b, h, w, d) and idx.shape == (b, h, w)
    flat = x.detach().reshape(-1, d)
    check_indices(flat, cb, idx.reshape(-1))
    assert torch.equal(q.reshape(-1, d), cb[idx.reshape(-1)])
    wgt = float(x.numel())
    (q.sum() + wgt * loss).backward()
    _, want_gx, _ = expected(flat, cb, idx, 0.25, False, torch.ones_like(flat), wgt)
    assert x.grad.shape == x.shape
    assert_close_scaled(x.grad.reshape(-1, d), want_gx, 1e-5, "grad_x")


# ---------------------------------------------------------------------------- bf16 / fp16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(backend, dtype):
    n, k, d = 200, 37, 24
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, dtype, seed=5, device=backend.device)
    xr = x.clone().requires_grad_(True)
    cbr = cb.clone().requires_grad_(True)
    q, idx, loss = vqkernels.quantize(xr, cbr, 0.25, backend=backend.name)
    assert q.dtype == dtype and loss.dtype == torch.float32
    check_low_precision(x, cb, idx)
    assert torch.equal(q.detach(), cb[idx])
    # The loss is accumulated in fp32 from the low-precision values.
    want_loss, _, _ = expected(x, cb, idx, 0.25, True)
    assert math.isclose(float(loss.detach()), want_loss, rel_tol=loss_rtol(x.numel()))
    wgt = 0.5 * x.numel()
    grad_q = torch.randn(n, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    ((q * grad_q.to(backend.device)).sum().float() + wgt * loss).backward()
    _, want_gx, want_gcb = expected(x, cb, idx, 0.25, True, grad_q, wgt)
    assert xr.grad.dtype == dtype and cbr.grad.dtype == dtype
    # Computed in fp32, rounded once to the input dtype: within ~one ulp of the input dtype.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert_close_scaled(xr.grad, want_gx, ulp, "grad_x")
    assert_close_scaled(cbr.grad, want_gcb, ulp + 1e-4, "grad_codebook")


# ----------------------------------------------------------------------------- determinism


def _fwd_bwd(backend, n, k, d):
    x, cb, grad_q = _grad_inputs(n, k, d, backend.device, seed=6)
    # Few codes, many rows: the codebook gradient reduces many rows per code.
    q, idx, loss, gx, gcb = _backward(
        lambda *a, **kw: vqkernels.quantize(*a, backend=backend.name, **kw),
        x, cb, grad_q, 1000.0, 0.25, True,
    )  # fmt: skip
    return q.detach(), idx, loss.detach(), gx, gcb


def test_deterministic_across_runs(backend):
    n, k, d = (60, 4, 6) if backend.interpreted else (8000, 16, 40)
    a, b = _fwd_bwd(backend, n, k, d), _fwd_bwd(backend, n, k, d)
    if backend.is_reference and backend.device.type == "cuda":
        # The reference's codebook gradient is an index_add_, which uses atomics on CUDA.
        a, b = a[:4], b[:4]
    assert_bitwise_equal(a, b, "quantize")


def test_cpu_same_bits_for_any_thread_count(cpu_backend, restore_threads):
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(_fwd_bwd(cpu_backend, 20011, 16, 33))
    assert_bitwise_equal(out[0], out[1], "quantize 1 vs 2 threads")
