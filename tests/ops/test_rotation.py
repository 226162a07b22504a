"""quantize(estimator="rotation"): the rotation trick, against vector-quantize-pytorch 1.32's own
``rotate_to`` (imported from the installed package and differentiated with autograd).

The value of ``quantized`` is exactly the chosen code (as with the straight-through estimator);
the gradient to x is LR's: ``s·(g − 2w(w·g) + 2u(q̂·g))`` (u = x/‖x‖, q̂ = q/‖q‖,
w = (u + q̂)/‖u + q̂‖, s = ‖q‖/‖x‖, norms clamped at 1e-6), plus the commitment-loss gradient.
"""

from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import reference
from vqkernels.testing import case_id, make_inputs, require_feature

lr = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")

SHAPES = [(1, 1, 1), (7, 3, 13), (33, 17, 5), (100, 65, 17), (257, 31, 33)]
CASES = [pytest.param(s, id=case_id(*s)) for s in SHAPES]


def lr_grad_x(x, q, g, beta, grad_loss):
    """grad_x from LR's rotate_to(x, q) (autograd, fp64) plus the commitment-loss gradient."""
    x64 = x.detach().double().cpu().requires_grad_(True)
    q64 = q.detach().double().cpu()
    rotated = lr.rotate_to(x64, q64)
    loss = beta * ((x64 - q64) ** 2).sum() / max(x64.numel(), 1)
    (grad,) = torch.autograd.grad(
        [rotated, loss], [x64], [g.detach().double().cpu(), torch.tensor(grad_loss).double()]
    )
    return grad


def assert_close_scaled(got, want, rtol, what):
    got = got.detach().cpu().double().reshape(want.shape)
    scale = float(want.abs().max()) if want.numel() else 0.0
    dev = float((got - want).abs().max()) if want.numel() else 0.0
    assert dev <= rtol * scale + 1e-30, f"{what}: max |diff| {dev:.3g} > {rtol:.1g} x {scale:.3g}"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", CASES)
def test_rotation_gradient_matches_lr_rotate_to(backend, shape, metric):
    require_feature(backend, "quantize", "rotation")
    n, k, d = shape
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=n + 3 * k, device=backend.device, kind="clustered", noise=0.3)
    x.requires_grad_(True)
    beta, grad_loss = 0.25, 0.7
    q, idx, loss = vqkernels.quantize(
        x, cb, beta, metric, estimator="rotation", backend=backend.name
    )
    assert torch.equal(q.detach(), cb[idx]), "the value must be exactly the chosen codes"
    assert torch.equal(idx, vqkernels.nearest_code(x.detach(), cb, metric, backend=backend.name))
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(d)).to(backend.device)
    (grad_x,) = torch.autograd.grad([q, loss], [x], [g, torch.tensor(grad_loss, device=x.device)])
    want = lr_grad_x(x, cb[idx], g, beta, grad_loss)
    assert_close_scaled(grad_x, want, 2e-5, "grad_x vs LR rotate_to")


def test_rotation_edge_rows_match_lr(backend):
    """A zero row (norm clamped at 1e-6, as LR's safe_div), a row equal to its code (w = u) and
    a row pointing away from its code (u + q̂ small)."""
    require_feature(backend, "quantize", "rotation")
    cb = torch.tensor([[1.0, 2.0, -1.0], [-0.5, 0.25, 3.0]])
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -1.0], [-1.0, -2.0, 1.1], [0.1, -3.0, 0.2]])
    x, cb = x.to(backend.device).requires_grad_(True), cb.to(backend.device)
    q, idx, _ = vqkernels.quantize(x, cb, 0.0, estimator="rotation", backend=backend.name)
    g = torch.tensor([[1.0, -2.0, 0.5]]).expand(4, 3).contiguous().to(backend.device)
    (grad_x,) = torch.autograd.grad(q, x, g)
    want = lr_grad_x(x, cb[idx], g, 0.0, 0.0)
    assert_close_scaled(grad_x, want, 1e-5, "grad_x on edge rows")


@pytest.mark.parametrize("codebook_loss", [False, True], ids=["commit", "commit+codebook"])
def test_rotation_codebook_gradient_only_through_loss(backend, codebook_loss):
    require_feature(backend, "quantize", "rotation")
    x, cb = make_inputs(40, 9, 6, seed=5, device=backend.device, kind="clustered")
    x.requires_grad_(True)
    cb.requires_grad_(True)
    q, idx, loss = vqkernels.quantize(
        x, cb, 0.5, estimator="rotation", codebook_loss=codebook_loss, backend=backend.name
    )
    (q * torch.randn_like(q)).sum().backward(retain_graph=True)
    assert cb.grad is None or float(cb.grad.abs().max()) == 0.0, "no codebook gradient via q"
    if codebook_loss:
        loss.backward()
        want = torch.zeros(9, 6, dtype=torch.float64)
        want.index_add_(0, idx.cpu(), -2.0 * (x - cb[idx]).detach().double().cpu() / x.numel())
        assert_close_scaled(cb.grad, want, 1e-5, "codebook gradient of the codebook loss")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rotation_low_precision(backend, dtype):
    """bf16/fp16 inputs: the gradient is formed in fp32 and rounded once to the input dtype."""
    require_feature(backend, "quantize", "rotation")
    x, cb = make_inputs(50, 12, 24, seed=9, device=backend.device, kind="clustered", noise=0.3)
    xl, cbl = x.to(dtype).requires_grad_(True), cb.to(dtype)
    q, idx, _ = vqkernels.quantize(xl, cbl, 0.25, estimator="rotation", backend=backend.name)
    assert q.dtype == dtype and torch.equal(q.detach(), cbl[idx])
    g = torch.randn(50, 24, generator=torch.Generator().manual_seed(1)).to(backend.device, dtype)
    (grad_x,) = torch.autograd.grad(q, xl, g)
    want = lr_grad_x(xl.float(), cbl[idx].float(), g.float(), 0.0, 0.0)
    assert grad_x.dtype == dtype
    assert_close_scaled(grad_x, want, 2.0**-7, "low-precision grad_x")


def test_rotation_reference_closed_form_matches_autograd():
    """reference.quantize_backward (what the kernels compute) = autograd through the reference."""
    x, cb = make_inputs(60, 7, 11, seed=2, kind="clustered", noise=0.5)
    x.requires_grad_(True)
    cb.requires_grad_(True)
    q, idx, loss = reference.quantize(x, cb, 0.3, estimator="rotation")
    g = torch.randn_like(q)
    gx, gc = torch.autograd.grad([q, loss], [x, cb], [g, torch.tensor(1.3)])
    cx, cc = reference.quantize_backward(g, torch.tensor(1.3), x, cb, idx, 0.3, True, "rotation")
    torch.testing.assert_close(cx, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cc, gc, rtol=1e-5, atol=1e-7)
