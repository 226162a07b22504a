"""IndexBackpropQuantizer against a direct PyTorch implementation of the IBQ paper's formula
(N x K logits, one-hot straight-through product), on every backend that has soft_quantize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqkernels import dispatch
from vqkernels.nn import IndexBackpropQuantizer


def ibq_direct(z, embed, tau, beta, cb_weight, ent_weight, ent_tau, mask=None):
    """IBQ as published: logits = z·Eᵀ, soft = softmax(logits/τ), hard = one_hot(argmax),
    z_q = (hard − sg(soft) + soft)·E; VQ losses with the hard codes; LlamaGen's entropy loss."""
    logits = z @ embed.T
    soft = F.softmax(logits / tau, dim=-1)
    ind = soft.argmax(-1)
    hard = F.one_hot(ind, embed.shape[0]).to(z.dtype)
    one_hot = hard - soft.detach() + soft
    z_q = one_hot @ embed
    z_q2 = hard @ embed
    w = torch.ones(z.shape[0], dtype=z.dtype) if mask is None else mask.to(z.dtype)
    denom = (w.sum() * z.shape[1]).clamp_min(1)
    loss = beta * (((z_q2.detach() - z) ** 2) * w[:, None]).sum() / denom
    loss = loss + cb_weight * (((z_q2 - z.detach()) ** 2) * w[:, None]).sum() / denom
    if ent_weight:
        a = logits / ent_tau
        probs = F.softmax(a, -1)
        log_probs = F.log_softmax(a + 1e-5, -1)
        avg = (probs * w[:, None]).sum(0) / w.sum()
        avg_entropy = -torch.sum(avg * torch.log(avg + 1e-5))
        sample_entropy = -((probs * log_probs).sum(-1) * w).sum() / w.sum()
        loss = loss + ent_weight * (sample_entropy - avg_entropy)
    return z_q, ind, loss


BACKENDS = [b for b in ("reference", "cpu") if b in dispatch.OP_TABLE["soft_quantize"]]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("ent_weight", [0.0, 0.3], ids=["noent", "ent"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ibq_matches_paper_formula(backend, ent_weight, masked):
    if backend == "cpu" and dispatch.available_backends("cpu")["cpu"]:
        pytest.skip("cpu backend not built")
    torch.manual_seed(0)
    layer = IndexBackpropQuantizer(
        12, 37, temperature=0.5, commitment_weight=0.25, codebook_weight=1.0,
        entropy_loss_weight=ent_weight, entropy_temperature=0.05, backend=backend,
    )  # fmt: skip
    with torch.no_grad():
        layer.codebook.normal_()
    g = torch.Generator().manual_seed(1)
    # Rows near codes (scaled up) so the argmax has a clear winner.
    pick = torch.randint(0, 37, (2, 21), generator=g)
    x = layer.codebook.detach()[pick] * 2.0 + 0.1 * torch.randn(2, 21, 12, generator=g)
    mask = (torch.rand(2, 21, generator=g) > 0.3) if masked else None
    xa = x.clone().requires_grad_()
    q, idx, loss = layer(xa, mask)
    go = torch.randn(q.shape, generator=g)
    ((q * go).sum() + loss).backward()

    # The paper's formula in float64 (the oracle): the fp32 layer must match it to fp32 accuracy.
    e = layer.codebook.detach().double().clone().requires_grad_()
    xb = x.clone().reshape(-1, 12).double().requires_grad_()
    zq, ind, loss_d = ibq_direct(
        xb, e, 0.5, 0.25, 1.0, ent_weight, 0.05, None if mask is None else mask.reshape(-1)
    )
    ((zq * go.reshape(-1, 12).double()).sum() + loss_d).backward()

    assert torch.equal(idx.reshape(-1), ind)
    torch.testing.assert_close(q.reshape(-1, 12).double(), zq.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(q.reshape(-1, 12), layer.codebook.detach()[idx.reshape(-1)])
    torch.testing.assert_close(loss.double(), loss_d.detach(), rtol=1e-5, atol=1e-6)
    _close_normwise(xa.grad.reshape(-1, 12), xb.grad, "grad_x")
    _close_normwise(layer.codebook.grad, e.grad, "grad_codebook")


def _close_normwise(got, want, what, rtol=2e-5):
    """max |got − want| <= rtol · max |want| (fp32 rounding of sums of many terms; individual
    small entries may cancel)."""
    dev = float((got.double() - want).abs().max())
    scale = float(want.abs().max())
    assert dev <= rtol * scale, f"{what}: {dev:.3g} > {rtol:g} x {scale:.3g}"


def test_ibq_channel_first_and_eval():
    layer = IndexBackpropQuantizer(6, 9, channel_dim=1, entropy_loss_weight=0.1).eval()
    x = torch.randn(2, 6, 3, 4)
    q, idx, loss = layer(x)
    assert q.shape == x.shape and idx.shape == (2, 3, 4) and loss.shape == ()
    assert torch.equal(q.permute(0, 2, 3, 1), layer.codebook.detach()[idx])


def test_ibq_errors():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        IndexBackpropQuantizer(4, 8, temperature=0.0)
    layer = IndexBackpropQuantizer(4, 8)
    with pytest.raises(ValueError, match="mask must have"):
        layer(torch.randn(3, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="dim=4 features"):
        layer(torch.randn(3, 5))
