"""vqkernels.compat against the real vector-quantize-pytorch (same weights, same inputs) and
against taming-transformers' VectorQuantizer2 semantics (written out below in plain PyTorch).

Tolerances: upstream builds the quantized output with a one-hot matmul and a straight-through
``x + (q − x).detach()`` and blends its EMA with ``lerp_``; we gather codes and blend with
``mul_/add_``.  Both are fp32 and differ by a few ulps, hence ``rtol=atol=1e-5``; indices are
compared exactly (continuous random data, no near-ties at these sizes).
"""

from __future__ import annotations

import pytest
import torch

from vqkernels.compat import VectorQuantize, VectorQuantizer2

vqp = pytest.importorskip("vector_quantize_pytorch")

TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(**kwargs):
    torch.manual_seed(0)
    up = vqp.VectorQuantize(rotation_trick=False, **kwargs)
    ours = VectorQuantize(rotation_trick=False, **kwargs)
    ours.load_state_dict(up.state_dict())
    return up, ours


def _assert_state_equal(up, ours):
    a, b = up.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k].float(), a[k].float(), **TOL, msg=k)


CASES = {
    "l2": dict(dim=12, codebook_size=40),
    "cosine": dict(dim=12, codebook_size=40, use_cosine_sim=True),
    "proj": dict(dim=12, codebook_size=40, codebook_dim=5),
    "image_fmap": dict(dim=6, codebook_size=20, accept_image_fmap=True),
    "channel_first_seq": dict(dim=6, codebook_size=20, channel_last=False),
    "3d_fmap": dict(dim=4, codebook_size=10, accept_3d_fmap=True),
}


def _input(name, seed):
    g = torch.Generator().manual_seed(seed)
    if name == "image_fmap":
        return torch.randn(2, 6, 5, 4, generator=g)
    if name == "channel_first_seq":
        return torch.randn(3, 6, 9, generator=g)
    if name == "3d_fmap":
        return torch.randn(2, 4, 3, 2, 2, generator=g)
    return torch.randn(3, 17, 12, generator=g)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_vector_quantize_pytorch_training_and_eval(name):
    up, ours = _pair(decay=0.9, commitment_weight=0.7, **CASES[name])
    for step in range(3):
        x = _input(name, step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        qa, ia, la = up(x)
        qb, ib, lb = ours(x2)
        assert qa.shape == qb.shape and ia.shape == ib.shape
        assert torch.equal(ia, ib)
        torch.testing.assert_close(qb, qa, **TOL)
        torch.testing.assert_close(lb, la, **TOL)
        # same gradient to the input (straight-through + commitment)
        g = torch.randn(qa.shape, generator=torch.Generator().manual_seed(10 + step))
        ((qa * g).sum() + la).backward()
        ((qb * g).sum() + lb).backward()
        torch.testing.assert_close(x2.grad, x.grad, **TOL)
        _assert_state_equal(up, ours)
    up.eval(), ours.eval()
    x = _input(name, 7)
    qa, ia, la = up(x)
    qb, ib, lb = ours(x)
    assert torch.equal(ia, ib) and float(la.detach()) == float(lb.detach()) == 0.0
    torch.testing.assert_close(qb, qa, **TOL)
    _assert_state_equal(up, ours)


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
@pytest.mark.parametrize("zeros", [True, False], ids=["zeros", "input"])
@pytest.mark.parametrize("how", ["mask", "lens"])
def test_masked_sequences_match(how, zeros, cosine):
    up, ours = _pair(
        dim=8, codebook_size=16, decay=0.8, return_zeros_for_masked_padding=zeros,
        use_cosine_sim=cosine,
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 8, generator=g)
    lens = torch.tensor([11, 6, 2])
    kw = {"lens": lens} if how == "lens" else {"mask": torch.arange(11)[None] < lens[:, None]}
    qa, ia, la = up(x, **kw)
    qb, ib, lb = ours(x, **kw)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(qb, qa, **TOL)
    torch.testing.assert_close(lb, la, **TOL)
    _assert_state_equal(up, ours)


def test_freeze_codebook_keeps_state():
    up, ours = _pair(dim=8, codebook_size=16, freeze_codebook=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(2, 9, 8)
    qa, ia, la = up(x)
    qb, ib, lb = ours(x)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(lb, la, **TOL)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    _assert_state_equal(up, ours)
    ours(x, freeze_codebook=False)  # the forward override wins
    assert not torch.equal(ours.state_dict()["_codebook.embed"], before["_codebook.embed"])


def test_single_token_input():
    up, ours = _pair(dim=8, codebook_size=16)
    x = torch.randn(5, 8)
    qa, ia, la = up(x)
    qb, ib, lb = ours(x)
    assert ib.shape == (5,) and torch.equal(ia, ib)
    torch.testing.assert_close(qb, qa, **TOL)
    torch.testing.assert_close(lb, la, **TOL)


def test_state_dict_loads_both_ways():
    torch.manual_seed(0)
    ours = VectorQuantize(8, 16, codebook_dim=4, rotation_trick=False)
    ours(torch.randn(2, 10, 8))  # move the EMA state away from the init
    up = vqp.VectorQuantize(8, 16, codebook_dim=4, rotation_trick=False)
    up.load_state_dict(ours.state_dict())  # strict: same keys and shapes as upstream
    _assert_state_equal(up, ours)
    # upstream checkpoint taken before its k-means init: both initialize on the next forward
    up_k = vqp.VectorQuantize(8, 16, kmeans_init=True, rotation_trick=False)
    ours_k = VectorQuantize(8, 16, kmeans_init=True, rotation_trick=False)
    ours_k.load_state_dict(up_k.state_dict())
    assert not bool(ours_k.initted)
    ours_k(torch.randn(2, 30, 8))
    assert bool(ours_k.state_dict()["_codebook.initted"])
    assert ours_k.codebook.abs().sum() > 0


def test_kmeans_state_follows_upstream_convention():
    # upstream: embed_avg = means·bins, cluster_size = bins, embed = embed_avg / smoothed(bins)
    torch.manual_seed(0)
    ours = VectorQuantize(4, 6, kmeans_init=True, rotation_trick=False, eps=1e-5)
    ours.eval()  # upstream initializes on the first forward whatever the mode
    ours(torch.randn(1, 50, 4))
    cs, es, cb = ours.cluster_size, ours.embed_sum, ours.codebook
    n = cs.sum()
    smoothed = (cs + 1e-5) / (n + 6e-5) * n
    torch.testing.assert_close(cb, es / smoothed[:, None])
    assert float(cs.sum()) == 50.0


def test_dead_code_replacement_semantics():
    # upstream re-seeds expired codes from the batch and resets cluster_size to the threshold and
    # embed_avg to code·threshold; the draws are random, so check the structure on both
    torch.manual_seed(0)
    # threshold 1.3 cannot be hit by a used code (0.5·1 + 0.5·count), only by a reset
    kw = dict(dim=4, codebook_size=12, threshold_ema_dead_code=1.3, decay=0.5)
    for layer in (vqp.VectorQuantize(rotation_trick=False, **kw), VectorQuantize(rotation_trick=False, **kw)):
        x = torch.randn(1, 40, 4)
        layer(x)
        cs = layer.state_dict()["_codebook.cluster_size"][0]
        avg = layer.state_dict()["_codebook.embed_avg"][0]
        emb = layer.state_dict()["_codebook.embed"][0]
        reset = cs == torch.tensor(1.3)
        assert reset.any()
        torch.testing.assert_close(avg[reset], emb[reset] * 1.3)
        # (torch.cdist itself is only accurate to ~1e-3 here)
        assert torch.cdist(emb[reset], x[0]).min(dim=1).values.max() < 2e-3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(heads=2), "heads"),
        (dict(rotation_trick=True), "rotation_trick"),
        (dict(rotation_trick=None), "rotation_trick"),
        (dict(use_cosine_sim=False, learnable_codebook=True, ema_update=False), "ema_update"),
        (dict(orthogonal_reg_weight=0.1), "orthogonal_reg_weight"),
        (dict(stochastic_sample_codes=True), "stochastic_sample_codes"),
        (dict(commitment_use_cross_entropy_loss=True), "commitment_use_cross_entropy_loss"),
        (dict(affine_param=True), "affine_param"),
        (dict(layernorm_after_project_in=True), "layernorm_after_project_in"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_options_raise(kwargs, name):
    kwargs = {"rotation_trick": False, **kwargs}
    with pytest.raises(NotImplementedError, match=name):
        VectorQuantize(8, 16, **kwargs)


def test_unsupported_forward_options_and_bad_input():
    vq = VectorQuantize(8, 16, rotation_trick=False)
    x = torch.randn(2, 3, 8)
    with pytest.raises(NotImplementedError, match="topk"):
        vq(x, topk=2)
    with pytest.raises(NotImplementedError, match="indices"):
        vq(x, indices=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="dim=8"):
        vq(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="mask"):
        vq(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantize(8, 0, rotation_trick=False)


# ------------------------------------------------------------------------------ taming


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
