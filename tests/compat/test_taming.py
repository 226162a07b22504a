"""vqkernels.compat.VectorQuantizer2 against taming-transformers' VectorQuantizer2 semantics
(written out below in plain PyTorch)."""

from __future__ import annotations

import pytest
import torch

from vqkernels.compat import VectorQuantizer2

TOL = dict(rtol=1e-5, atol=1e-5)


def _taming_reference(z, weight, beta, legacy):
    """taming-transformers' VectorQuantizer2.forward in plain PyTorch (from its documented
    semantics): full distance matrix, argmin, β placement, straight-through."""
    zc = z.permute(0, 2, 3, 1).contiguous()
    flat = zc.view(-1, weight.shape[1])
    d = (flat**2).sum(1, keepdim=True) + (weight**2).sum(1) - 2 * flat @ weight.t()
    idx = torch.argmin(d, dim=1)
    zq = weight[idx].view(zc.shape)
    if legacy:
        loss = torch.mean((zq.detach() - zc) ** 2) + beta * torch.mean((zq - zc.detach()) ** 2)
    else:
        loss = beta * torch.mean((zq.detach() - zc) ** 2) + torch.mean((zq - zc.detach()) ** 2)
    zq = zc + (zq - zc).detach()
    return zq.permute(0, 3, 1, 2).contiguous(), loss, idx


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "fixed"])
@pytest.mark.parametrize("beta", [0.25, 0.0], ids=["beta0.25", "beta0"])
def test_vector_quantizer2_matches_taming(legacy, beta):
    torch.manual_seed(0)
    ours = VectorQuantizer2(24, 6, beta, legacy=legacy)
    # spread the codes so the argmin is well separated from the distance rounding
    with torch.no_grad():
        ours.embedding.weight.normal_()
    weight = ours.embedding.weight.detach().clone().requires_grad_()
    z = torch.randn(2, 6, 4, 5, requires_grad=True)
    z2 = z.detach().clone().requires_grad_()
    zq, loss, (perp, min_enc, idx) = ours(z)
    zq_r, loss_r, idx_r = _taming_reference(z2, weight, beta, legacy)
    assert torch.equal(idx, idx_r) and idx.shape == (40,) and min_enc is None
    torch.testing.assert_close(zq, zq_r, **TOL)
    torch.testing.assert_close(loss, loss_r, **TOL)
    g = torch.randn(zq.shape)
    ((zq * g).sum() + loss).backward()
    ((zq_r * g).sum() + loss_r).backward()
    torch.testing.assert_close(z.grad, z2.grad, **TOL)
    wgrad = ours.embedding.weight.grad
    torch.testing.assert_close(wgrad if wgrad is not None else torch.zeros_like(weight), weight.grad, **TOL)
    p = torch.bincount(idx_r, minlength=24).float() / idx_r.numel()
    torch.testing.assert_close(perp, torch.exp(-(p * torch.log(p + 1e-10)).sum()))


def test_vector_quantizer2_options():
    torch.manual_seed(0)
    vq = VectorQuantizer2(10, 3, 0.25, sane_index_shape=True, return_min_encodings=True)
    z = torch.randn(2, 3, 4, 5)
    zq, loss, (perp, enc, idx) = vq(z)
    assert idx.shape == (2, 4, 5) and enc.shape == (40, 10)
    assert torch.equal(enc.argmax(1), idx.reshape(-1)) and torch.all(enc.sum(1) == 1)
    entry = vq.get_codebook_entry(idx.reshape(-1), (2, 4, 5, 3))
    torch.testing.assert_close(entry, zq.detach())
    with pytest.raises(NotImplementedError, match="remap"):
        VectorQuantizer2(10, 3, 0.25, remap="used.npy")
    with pytest.raises(ValueError, match="z must have shape"):
        vq(torch.randn(2, 4, 4, 5))
    with pytest.raises(TypeError, match="z must be"):
        vq(torch.zeros(2, 3, 4, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="n_e"):
        VectorQuantizer2(0, 3, 0.25)
