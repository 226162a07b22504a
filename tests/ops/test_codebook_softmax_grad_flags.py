"""``code_distribution_backward(..., need_grad_codebook, need_grad_x)``: unneeded gradient passes skipped.

The losses of the LR drop-in run ``code_distribution`` against an EMA codebook buffer that does
not require grad; the autograd backward then passes ``need_grad_codebook=False`` and every
backend skips the streamed code pass.  The flag must not change ``grad_x`` by a single bit (the
row pass that computes it is the same code either way), and the codebook's gradient must be
absent (``None`` through autograd, an empty ``[0]`` tensor from the op itself).  That the backward
is cheaper is measured by ``benchmarks/bench_beam_search.py --suite losses``, not asserted here.
``need_grad_x=False`` (x detached, a learnable codebook) likewise skips the grad_x row pass.
"""

from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import dispatch, reference
from vqkernels.testing import make_inputs

# Edge shapes (N not a multiple of the row block, K = 1, K > N, D odd), small enough for the
# Triton interpreter to run every case (~0.1 s each).
SHAPES = [(1, 1, 1), (9, 33, 5), (37, 11, 6)]


def _backward_op(backend):
    """The backend's ``code_distribution_backward`` with the schema's argument order."""
    if backend.name not in dispatch.OP_TABLE["code_distribution"]:
        pytest.skip(f"code_distribution has no {backend.name} implementation")
    if backend.name == "reference":
        return reference.code_distribution_backward
    if backend.name == "cpu":
        return torch.ops.vqkernels.code_distribution_backward
    if backend.name == "triton":
        return torch.ops.vqkernels.code_distribution_backward_triton
    pytest.skip(f"no code_distribution_backward for {backend.name}")


def _upstream(n, k, groups, device):
    g = torch.Generator().manual_seed(n + k)
    gl, gh = torch.randn(n, generator=g), torch.randn(n, generator=g)
    gm = torch.randn((groups, k) if groups else (k,), generator=g)
    return gl.to(device), gh.to(device), gm.to(device)


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "grouped"])
@pytest.mark.parametrize("metric", ["l2", "dot", "euclidean"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-K{}-D{}".format(*s))
def test_flag_off_gives_same_grad_x_bits_and_empty_grad_codebook(backend, shape, metric, grouped):
    op = _backward_op(backend)
    n, k, d = shape
    dev = backend.device
    x, cb = make_inputs(n, k, d, seed=k, device=dev, kind="clustered", noise=0.5)
    w = torch.full((n,), 1.0 / n, device=dev)
    groups = 3 if grouped else 0
    row_group = (torch.arange(n) % 3).to(dev) if grouped else None
    lse, ent, _ = reference.code_distribution(x, cb, w, 0.7, metric, row_group, groups)
    gl, gh, gm = _upstream(n, k, groups, dev)
    args = (gl, gh, gm, x, cb, w, lse, ent, 0.7, metric, row_group, groups)
    gx_on, gc_on = op(*args)  # the defaults (both flags True): the existing signature
    gx_off, gc_off = op(*args, False)
    assert gc_on.shape == cb.shape
    assert gc_off.shape == (0,) and gc_off.dtype == cb.dtype
    assert gx_off.dtype == gx_on.dtype and torch.equal(gx_off, gx_on), "grad_x changed bits"
    # The flag-on result is not vacuous: the codebook does get a gradient then.
    assert bool(gc_on.abs().sum() > 0)
    gx_none, gc_only = op(*args, True, False)  # need_grad_x=False
    assert gx_none.shape == (0,) and gx_none.dtype == x.dtype
    assert gc_only.dtype == gc_on.dtype and torch.equal(gc_only, gc_on), "grad_codebook changed"


def test_flag_off_with_no_upstream_gradient_is_empty(cpu_backend):
    """The early exit (no upstream gradient at all) honours the flag too."""
    x, cb = make_inputs(5, 7, 3, seed=0)
    w = torch.full((5,), 0.2)
    lse, ent, _ = reference.code_distribution(x, cb, w, 1.0, "l2")
    empty = torch.empty(0)
    args = (empty, empty, empty, x, cb, w, lse, ent, 1.0, "l2", None, 0)
    for op in (
        torch.ops.vqkernels.code_distribution_backward,
        reference.code_distribution_backward,
    ):
        gx, gc = op(*args, False)
        assert gc.shape == (0,) and torch.equal(gx, torch.zeros_like(x))
        gx, gc = op(*args, True, False)
        assert gx.shape == (0,) and torch.equal(gc, torch.zeros_like(cb))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_frozen_codebook_gets_no_grad_and_same_grad_x(backend, metric):
    """Through autograd: a codebook without requires_grad (an EMA buffer) gets no gradient and
    x's gradient has the same bits as when the codebook does require grad."""
    if backend.name not in dispatch.OP_TABLE["code_distribution"]:
        pytest.skip(f"code_distribution has no {backend.name} implementation")
    x, cb = make_inputs(21, 40, 6, seed=2, device=backend.device)
    grads = {}
    for cb_grad in (True, False):
        xg, cg = x.clone().requires_grad_(), cb.clone().requires_grad_(cb_grad)
        lse, ent, mp = vqkernels.code_distribution(xg, cg, 0.5, metric, backend=backend.name)
        loss = lse.mean() - ent.mean() + (mp * mp.clamp_min(1e-9).log()).sum()
        loss.backward()
        grads[cb_grad] = (xg.grad, cg.grad)
    assert grads[True][1] is not None and grads[False][1] is None
    assert torch.equal(grads[True][0], grads[False][0])


def test_detached_x_gets_no_grad_and_same_grad_codebook(backend):
    """The mirror case: x without requires_grad, the codebook's gradient bits unchanged."""
    if backend.name not in dispatch.OP_TABLE["code_distribution"]:
        pytest.skip(f"code_distribution has no {backend.name} implementation")
    x, cb = make_inputs(21, 40, 6, seed=3, device=backend.device)
    grads = {}
    for x_grad in (True, False):
        xg, cg = x.clone().requires_grad_(x_grad), cb.clone().requires_grad_()
        lse, ent, mp = vqkernels.code_distribution(xg, cg, 0.5, "l2", backend=backend.name)
        (lse.mean() - ent.mean() + (mp * mp.clamp_min(1e-9).log()).sum()).backward()
        grads[x_grad] = (xg.grad, cg.grad)
    assert grads[True][0] is not None and grads[False][0] is None
    assert torch.equal(grads[True][1], grads[False][1])
