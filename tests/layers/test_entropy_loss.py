"""The entropy loss (MAGVIT-2 / LlamaGen form) of VectorQuantizer and codebook_entropy_loss,
against LlamaGen's direct ``compute_entropy_loss`` on the N x K affinity matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqkernels import dispatch
from vqkernels.nn import VectorQuantizer, codebook_entropy_loss


def llamagen_entropy_loss(affinity, temperature, sample_weight=1.0, batch_weight=1.0, w=None):
    """LlamaGen's compute_entropy_loss (softmax type), with MAGVIT-2's two weights and row weights."""
    flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(flat, dim=-1)
    log_probs = F.log_softmax(flat + 1e-5, dim=-1)
    w = torch.ones(flat.shape[0], dtype=flat.dtype) if w is None else w.to(flat.dtype)
    avg_probs = (probs * w[:, None]).sum(0) / w.sum()
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -((probs * log_probs).sum(-1) * w).sum() / w.sum()
    return sample_weight * sample_entropy - batch_weight * avg_entropy


def _backends():
    out = ["reference"]
    if (
        "cpu" in dispatch.OP_TABLE["code_distribution"]
        and not dispatch.available_backends("cpu")["cpu"]
    ):
        out.append("cpu")
    return out


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
@pytest.mark.parametrize("backend", _backends())
def test_codebook_entropy_loss_matches_llamagen(backend, metric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, requires_grad=True)
    cb = torch.randn(30, 7, generator=g, requires_grad=True)
    mask = torch.rand(50, generator=g) > 0.25
    loss = codebook_entropy_loss(
        x, cb, 0.3, metric, mask, sample_weight=0.7, batch_weight=1.3, backend=backend
    )
    gx, gc = torch.autograd.grad(loss, (x, cb))
    if metric == "l2":
        aff = -(torch.cdist(x, cb) ** 2)
    elif metric == "dot":
        aff = x @ cb.T
    else:
        aff = F.normalize(x, dim=-1) @ F.normalize(cb, dim=-1).T
    ref = llamagen_entropy_loss(aff, 0.3, 0.7, 1.3, mask)
    ex, ec = torch.autograd.grad(ref, (x, cb))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gc, ec, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_vector_quantizer_entropy_loss(backend):
    """loss(weight w) − loss(weight 0) = w · LlamaGen's entropy loss, gradients included
    (learnable codebook: the codebook gets the entropy gradient too)."""
    torch.manual_seed(0)
    kw = dict(learnable_codebook=True, entropy_temperature=0.1, entropy_sample_weight=1.0,
              entropy_batch_weight=0.5, backend=backend)  # fmt: skip
    vq = VectorQuantizer(8, 24, entropy_loss_weight=0.2, **kw).train()
    vq0 = VectorQuantizer(8, 24, entropy_loss_weight=0.0, **kw).train()
    vq0.load_state_dict(vq.state_dict())
    x = torch.randn(3, 11, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    _, _, la = vq(xa)
    _, _, lb = vq0(xb)
    la.backward()
    lb.backward()
    # LlamaGen's formula in float64; differences of two fp32 gradients are compared norm-wise.
    xc = x.clone().reshape(-1, 8).double().requires_grad_()
    cb = vq0.codebook.detach().double().clone().requires_grad_()
    ent = llamagen_entropy_loss(-(torch.cdist(xc, cb) ** 2), 0.1, 1.0, 0.5)
    ent.backward()
    torch.testing.assert_close((la - lb).double(), 0.2 * ent.detach(), rtol=1e-4, atol=1e-6)
    for got, want in (
        ((xa.grad - xb.grad).reshape(-1, 8), 0.2 * xc.grad),
        (vq.codebook.grad - vq0.codebook.grad, 0.2 * cb.grad),
    ):
        dev = float((got.double() - want).abs().max())
        assert dev <= 1e-4 * float(want.abs().max()) + 1e-7, dev


def test_vector_quantizer_entropy_loss_off_in_eval_and_validated():
    vq = VectorQuantizer(4, 8, entropy_loss_weight=0.5).eval()
    vq0 = VectorQuantizer(4, 8).eval()
    vq0.load_state_dict(vq.state_dict())
    x = torch.randn(10, 4)
    assert torch.equal(vq(x)[2], vq0(x)[2])
    with pytest.raises(ValueError, match="entropy_temperature must be > 0"):
        VectorQuantizer(4, 8, entropy_temperature=0.0)
