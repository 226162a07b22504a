"""VectorQuantizer / ResidualVectorQuantizer: numbers against the reference ops, state updates,
masks, k-means, dead-code restarts, statistics, mixed precision and input errors.

Small shapes throughout (the suite shares 2 CPU cores); every layer uses ``backend="auto"`` so the
fused CPU kernels are exercised when they are built and the reference otherwise.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vqkernels import reference
from vqkernels.nn import ResidualVectorQuantizer, VectorQuantizer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(*shape, seed=0, scale=1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)) * scale


def _smoothed(cs: torch.Tensor, eps: float) -> torch.Tensor:
    n = cs.sum()
    return (cs + eps) / (n + cs.shape[0] * eps) * n


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("channel_dim", [-1, 1], ids=["channel_last", "channel_first"])
@pytest.mark.parametrize("codebook_dim", [None, 5], ids=["cd=dim", "cd=5"])
def test_forward_shapes_and_values(channel_dim, codebook_dim):
    torch.manual_seed(0)
    vq = VectorQuantizer(12, 37, codebook_dim=codebook_dim, channel_dim=channel_dim).eval()
    x = _x(3, 12, 4, 5) if channel_dim == 1 else _x(3, 4, 5, 12)
    q, idx, loss = vq(x)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert idx.shape == (3, 4, 5) and idx.dtype == torch.int64
    assert loss.shape == () and loss.dtype == torch.float32
    # same search as the reference on the (projected) channel-last input
    x_cl = x.movedim(1, -1) if channel_dim == 1 else x
    h = vq.project_in(x_cl) if vq.project_in is not None else x_cl
    flat = h.reshape(-1, vq.codebook_dim).detach()
    ref_idx, _ = reference.nearest_code(flat, vq.codebook, "l2")
    assert torch.equal(idx.reshape(-1), ref_idx)
    # quantized = codes (after project_out) in the input layout; get_codes_from_indices agrees
    codes = vq.get_codes_from_indices(idx)
    assert codes.shape == (3, 4, 5, 12)
    q_cl = q.movedim(1, -1) if channel_dim == 1 else q
    torch.testing.assert_close(q_cl, codes, rtol=1e-5, atol=1e-6)
    # loss = β·mean((h − q)²) in codebook space
    qc = vq.codebook[ref_idx]
    expect = 0.25 * ((flat - qc) ** 2).mean()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-7)


def test_straight_through_and_commitment_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 9, commitment_weight=0.7)
    x = _x(4, 7, 6).requires_grad_()
    q, idx, loss = vq(x)
    g = _x(4, 7, 6, seed=1)
    (q * g).sum().backward(retain_graph=False)
    torch.testing.assert_close(x.grad, g)
    x.grad = None
    vq2 = VectorQuantizer(6, 9, commitment_weight=0.7)
    vq2.load_state_dict(vq.state_dict())  # (state after vq's first step does not matter here)
    q, idx, loss = vq2(x)
    loss.backward()
    codes = q.detach()
    torch.testing.assert_close(x.grad, 0.7 * 2 * (x.detach() - codes) / x.numel(), rtol=1e-5, atol=1e-8)


def test_ema_step_matches_reference_update():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, decay=0.9, eps=1e-4)
    cb, cs, es = vq.codebook.clone(), vq.cluster_size.clone(), vq.embed_sum.clone()
    x = _x(5, 11, 8)
    _, idx, _ = vq(x)
    flat = x.reshape(-1, 8)
    ref_idx, _ = reference.nearest_code(flat, cb, "l2")
    assert torch.equal(idx.reshape(-1), ref_idx)
    reference.ema_update_(cb, cs, es, flat, ref_idx, 0.9, 1e-4)
    torch.testing.assert_close(vq.cluster_size, cs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vq.embed_sum, es, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.codebook, cb, rtol=1e-5, atol=1e-6)
    # the codebook stays consistent with its EMA state
    torch.testing.assert_close(
        vq.codebook, vq.embed_sum / _smoothed(vq.cluster_size, 1e-4).unsqueeze(1), rtol=1e-5, atol=1e-6
    )


def test_eval_forward_changes_no_state():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, threshold_ema_dead_code=5.0, kmeans_init=False)
    vq(_x(2, 9, 8))  # one training step
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    perp, usage = vq.perplexity.clone(), vq.codebook_usage
    vq.eval()
    vq(_x(2, 9, 8, seed=3))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(vq.perplexity, perp) and vq.codebook_usage == usage


def test_learnable_codebook_losses_and_grads():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 10, learnable_codebook=True, commitment_weight=0.3)
    assert isinstance(vq.codebook, torch.nn.Parameter)
    x = _x(3, 8, 6).requires_grad_()
    q, idx, loss = vq(x)
    loss.backward()
    # same numbers in plain autograd
    cb = vq.codebook.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    qq = cb[idx]
    ref_loss = 0.3 * ((x2 - qq.detach()) ** 2).mean() + ((x2.detach() - qq) ** 2).mean()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vq.codebook.grad, cb.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-7)
    # learnable + l2_normalize: the lookup uses normalized codes, the gradient reaches the Parameter
    vqn = VectorQuantizer(6, 10, learnable_codebook=True, l2_normalize=True)
    _, _, loss = vqn(_x(3, 8, 6))
    loss.backward()
    assert vqn.codebook.grad is not None and vqn.codebook.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ mask


@pytest.mark.parametrize("learnable", [False, True], ids=["ema", "learnable"])
def test_mask_excludes_rows_from_ema_and_loss(learnable):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 12, learnable_codebook=learnable, decay=0.8)
    vq_valid = copy.deepcopy(vq)
    x = _x(2, 10, 8)
    mask = torch.rand(2, 10, generator=_gen(5)) > 0.4
    x_pad = x.clone()
    x_pad[~mask] = 1e3  # padding garbage far away: would dominate the EMA if it leaked in
    cb0 = vq.codebook.detach().clone()
    q, idx, loss = vq(x_pad, mask=mask)
    q_v, idx_v, loss_v = vq_valid(x[mask].unsqueeze(0))
    assert torch.equal(idx[mask], idx_v[0])
    torch.testing.assert_close(loss, loss_v, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vq.cluster_size, vq_valid.cluster_size)
    torch.testing.assert_close(vq.codebook, vq_valid.codebook)
    # masked positions still get their nearest code
    ref_idx, _ = reference.nearest_code(x_pad[~mask], cb0, "l2")
    assert torch.equal(idx[~mask], ref_idx)
    if learnable:
        loss.backward()
        loss_v.backward()
        torch.testing.assert_close(vq.codebook.grad, vq_valid.codebook.grad, rtol=1e-5, atol=1e-7)


def test_mask_all_false_gives_zero_loss_and_no_update():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 6, decay=0.5)
    cs = vq.cluster_size.clone()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    _, idx, loss = vq(_x(2, 3, 4), mask=mask)
    assert float(loss) == 0.0
    torch.testing.assert_close(vq.cluster_size, cs * 0.5)  # decayed, no counts added
    assert float(vq.perplexity) == 1.0 and vq.codebook_usage == 0.0


# ------------------------------------------------------------------------------ k-means


def _clustered(k: int, per: int, d: int, seed: int = 0):
    g = _gen(seed)
    centers = torch.randn(k, d, generator=g) * 10
    pts = centers.repeat_interleave(per, 0) + 0.01 * torch.randn(k * per, d, generator=g)
    return centers, pts[torch.randperm(k * per, generator=g)]


@pytest.mark.parametrize("seeding", ["kmeans++", "random"])
def test_kmeans_init_finds_clusters(seeding):
    k, d = 8, 5
    centers, pts = _clustered(k, 40, d)
    vq = VectorQuantizer(d, k, kmeans_init=True, kmeans_seeding=seeding, kmeans_iters=20)
    assert not bool(vq.initted)
    torch.manual_seed(1)
    vq(pts.unsqueeze(0))
    assert bool(vq.initted)
    assert float(vq.cluster_size.sum()) == pts.shape[0]

    def inertia(codes):
        return float(((pts[:, None] - codes[None]) ** 2).sum(-1).min(dim=1).values.mean())

    if seeding == "kmeans++":
        # on well-separated clusters k-means++ puts a code on every true center
        assert torch.all(torch.cdist(centers, vq.codebook).min(dim=1).values < 0.5)
    else:
        # random seeding can put two seeds in one cluster (Lloyd cannot split merged clusters);
        # Lloyd steps never increase the objective: compare with the seeds themselves
        torch.manual_seed(1)
        seeds = pts[torch.randperm(pts.shape[0])[:k]]
        assert inertia(vq.codebook) <= inertia(seeds) + 1e-6
    # a Lloyd fixed point: each used code is the mean of the points it wins (up to the points on
    # near-tie boundaries inside one tight cluster that a split cluster may trade)
    assign = torch.cdist(pts, vq.codebook).argmin(dim=1)
    for c in assign.unique():
        torch.testing.assert_close(vq.codebook[c], pts[assign == c].mean(0), rtol=0, atol=1e-2)
    # a second training step does not re-run k-means: used codes stay where they are (an unused
    # duplicate seed decays with its EMA state, as in every EMA codebook)
    cb = vq.codebook.clone()
    used = vq.cluster_size >= 1
    vq(pts.unsqueeze(0))
    assert torch.allclose(cb[used], vq.codebook[used], atol=0.05)


def test_batched_kmeanspp_seeding_beats_random_on_many_clusters():
    # K > 128: k-means++ draws its centers in rounds (see VectorQuantizer._seed); it must still
    # cover the clusters far better than random seeding (random: ~63% coverage by chance)
    k = 256
    centers, pts = _clustered(k, 4, 8)
    found = {}
    for seeding in ("kmeans++", "random"):
        torch.manual_seed(0)
        vq = VectorQuantizer(8, k, kmeans_init=True, kmeans_seeding=seeding)
        vq.init_codebook_(pts.unsqueeze(0))
        found[seeding] = int((torch.cdist(centers, vq.codebook).min(dim=1).values < 0.5).sum())
    assert found["kmeans++"] >= 0.95 * k
    assert found["kmeans++"] > found["random"] + 0.2 * k


def test_kmeans_init_ignores_masked_rows():
    torch.manual_seed(0)
    k, d = 4, 3
    _, pts = _clustered(k, 10, d)
    junk = torch.full((20, d), 1e4)
    x = torch.cat([pts, junk]).unsqueeze(0)
    mask = torch.cat([torch.ones(40, dtype=torch.bool), torch.zeros(20, dtype=torch.bool)])[None]
    vq = VectorQuantizer(d, k, kmeans_init=True)
    vq(x, mask=mask)
    assert vq.codebook.abs().max() < 100


def test_kmeans_state_reload_marks_initted():
    vq = VectorQuantizer(3, 4, kmeans_init=True)
    vq(_x(1, 20, 3))
    vq2 = VectorQuantizer(3, 4, kmeans_init=True)
    vq2.load_state_dict(vq.state_dict())
    assert vq2._initted_py and torch.equal(vq2.codebook, vq.codebook)


# ------------------------------------------------------------------------------ restarts


@pytest.mark.parametrize("learnable", [False, True], ids=["ema", "learnable"])
def test_dead_codes_are_restarted_from_valid_rows(learnable):
    torch.manual_seed(0)
    d, k = 4, 10
    vq = VectorQuantizer(d, k, threshold_ema_dead_code=0.5, decay=0.9, learnable_codebook=learnable)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(k, d) + 100.0)  # far from the data: nobody picks them...
        vq.codebook[0] = 0.0  # ...except code 0
        if not learnable:
            vq.embed_sum.copy_(vq.codebook)  # consistent EMA state (cluster_size starts at 1)
    x = _x(1, 30, d)
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, 20:] = False
    x[0, 20:] = -55.0  # masked rows must never become codes
    for _ in range(6):  # unused codes decay: cluster_size 0.9^6 = 0.53 >= 0.5, not dead yet
        vq(x, mask=mask)
    assert torch.all(vq.codebook[1:] > 50)
    vq(x, mask=mask)  # 0.9^7 = 0.48 < 0.5: restarted in this step
    valid_rows = x[0, :20]
    restarted = vq.codebook[1:]
    # every restarted code is one of the valid rows, all distinct
    dmin = torch.cdist(restarted, valid_rows).min(dim=1).values
    assert torch.all(dmin < 1e-5)
    assert torch.unique(restarted, dim=0).shape[0] == k - 1
    assert torch.all(vq.cluster_size[1:] == 0.5)
    if not learnable:
        torch.testing.assert_close(vq.embed_sum[1:], restarted * 0.5)


# ------------------------------------------------------------------------------ l2 normalize


def test_l2_normalize_keeps_codes_on_the_sphere():
    torch.manual_seed(0)
    vq = VectorQuantizer(10, 16, codebook_dim=6, l2_normalize=True, metric="cosine")
    for s in range(3):
        vq(_x(2, 12, 10, seed=s, scale=5.0))
    torch.testing.assert_close(vq.codebook.norm(dim=1), torch.ones(16))
    vq.eval()
    x = _x(2, 12, 10, seed=9)
    _, idx, loss = vq(x)
    h = F.normalize(vq.project_in(x).reshape(-1, 6), dim=-1).detach()
    ref_idx, _ = reference.nearest_code(h, vq.codebook, "cosine")
    assert torch.equal(idx.reshape(-1), ref_idx)
    torch.testing.assert_close(loss, 0.25 * ((h - vq.codebook[ref_idx]) ** 2).mean(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ statistics


def test_perplexity_and_usage_window():
    vq = VectorQuantizer(2, 4, usage_window=2, decay=0.5)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    assert vq.codebook_usage == 0.0
    # batch 1 uses codes 0 and 1 equally -> perplexity 2
    vq(torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.1, 0.0], [9.9, 0.0]]]))
    torch.testing.assert_close(vq.perplexity, torch.tensor(2.0))
    assert vq.codebook_usage == 0.5
    # batch 2 uses code 2 only -> perplexity 1, window {0,1,2} -> 3/4
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    vq(torch.tensor([[[0.0, 10.0], [0.1, 9.9]]]))
    torch.testing.assert_close(vq.perplexity, torch.tensor(1.0))
    assert vq.codebook_usage == 0.75
    # batch 3 (code 2 again) pushes batch 1 out of the 2-batch window -> 1/4
    vq(torch.tensor([[[0.0, 10.0]]]))
    assert vq.codebook_usage == 0.25


# ------------------------------------------------------------------------------ residual


def test_residual_vq_stages_and_gradient():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(3, 8, 16, commitment_weight=0.0).eval()
    x = _x(2, 5, 8).requires_grad_()
    q, idx, loss = rvq(x)
    assert q.shape == x.shape and idx.shape == (2, 5, 3) and loss.shape == ()
    # stage i quantizes the residual left by stages < i
    r = x.detach().reshape(-1, 8)
    total = torch.zeros_like(r)
    for i, layer in enumerate(rvq.layers):
        ref_idx, _ = reference.nearest_code(r, layer.codebook, "l2")
        assert torch.equal(idx[..., i].reshape(-1), ref_idx)
        r = r - layer.codebook[ref_idx]
        total = total + layer.codebook[ref_idx]
    torch.testing.assert_close(q.detach().reshape(-1, 8), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rvq.get_codes_from_indices(idx), q.detach(), rtol=1e-5, atol=1e-5)
    # the summed output passes its gradient to x exactly once
    g = _x(2, 5, 8, seed=4)
    (q * g).sum().backward()
    torch.testing.assert_close(x.grad, g)


def test_residual_vq_projection_channel_first_and_training():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(2, 6, 8, codebook_dim=3, channel_dim=1, threshold_ema_dead_code=0.1)
    x = _x(2, 6, 3, 3)
    q, idx, loss = rvq(x)
    assert q.shape == x.shape and idx.shape == (2, 3, 3, 2)
    assert rvq.perplexity.shape == (2,) and len(rvq.codebook_usage) == 2
    assert rvq.codebooks.shape == (2, 8, 3)
    with pytest.raises(ValueError, match="num_quantizers"):
        rvq.get_codes_from_indices(idx[..., :1])
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVectorQuantizer(0, 6, 8)


# ------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_keeps_state_fp32_and_matches_fp32(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    vq = VectorQuantizer(8, 32)
    vq32 = copy.deepcopy(vq)
    x = _x(4, 6, 8)
    with torch.autocast("cpu", dtype=dtype):
        h = lin(x)
        q, idx, loss = vq(h)
    assert h.dtype == dtype and q.dtype == dtype and loss.dtype == torch.float32
    for t in (vq.codebook, vq.cluster_size, vq.embed_sum):
        assert t.dtype == torch.float32
    # same indices as an fp32 run on the same (rounded) values
    _, idx32, _ = vq32(h.float())
    assert torch.equal(idx, idx32)
    torch.testing.assert_close(vq.codebook, vq32.codebook)


def test_large_norm_half_inputs_do_not_overflow():
    # ‖x‖² ≈ 64·300² ≈ 5.8e6 and x·c overflow fp16 (max 65504) if computed in half precision
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 16)
    with torch.no_grad():
        vq.codebook.mul_(300.0)
        vq.embed_sum.mul_(300.0)
    x = (_x(2, 10, 64) * 300.0).half()
    cb0 = vq.codebook.clone()
    q, idx, loss = vq(x)
    assert torch.isfinite(q).all() and torch.isfinite(loss) and torch.isfinite(vq.codebook).all()
    ref_idx, _ = reference.nearest_code(x.float().reshape(-1, 64), cb0, "l2")
    assert torch.equal(idx.reshape(-1), ref_idx)
    assert float(loss) > 0


# ------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_named_errors():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="dim=8"):
        vq(torch.randn(2, 3, 7))
    with pytest.raises(TypeError, match="float32"):
        vq(torch.ones(2, 3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        vq(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        vq(torch.randn(2, 3, 8), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        vq(torch.full((2, 3, 8), float("nan")))
    learn = VectorQuantizer(8, 4, learnable_codebook=True)
    with torch.no_grad():
        learn.codebook[1, 2] = float("inf")  # e.g. after a diverged optimizer step
    with pytest.raises(ValueError, match="codebook contains 1 NaN/Inf"):
        learn(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="channel_dim"):
        VectorQuantizer(8, 4, channel_dim=5)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="indices"):
        vq.get_codes_from_indices(torch.tensor([4]))
    with pytest.raises(TypeError, match="indices"):
        vq.get_codes_from_indices(torch.tensor([0.0]))


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(codebook_size=0), ValueError, "codebook_size"),
        (dict(codebook_size=2.5), TypeError, "codebook_size"),
        (dict(dim=0), ValueError, "dim"),
        (dict(codebook_dim=0), ValueError, "codebook_dim"),
        (dict(metric="dot"), ValueError, "metric"),
        (dict(kmeans_seeding="farthest"), ValueError, "kmeans_seeding"),
        (dict(decay=1.5), ValueError, "decay"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(commitment_weight=-1.0), ValueError, "commitment_weight"),
        (dict(threshold_ema_dead_code=-1.0), ValueError, "threshold_ema_dead_code"),
        (dict(usage_window=0), ValueError, "usage_window"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(sync_distributed="yes"), TypeError, "sync_distributed"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_constructor_arguments(kwargs, exc, name):
    args = dict(dim=8, codebook_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        VectorQuantizer(args.pop("dim"), args.pop("codebook_size"), **args)


def test_forced_sync_without_process_group_raises():
    vq = VectorQuantizer(4, 4, sync_distributed=True)
    with pytest.raises(RuntimeError, match="sync_distributed"):
        vq(torch.randn(1, 3, 4))


def test_state_dict_roundtrip_and_repr():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, codebook_dim=4, threshold_ema_dead_code=1.0)
    vq(_x(2, 9, 8))
    sd = vq.state_dict()
    assert set(sd) == {
        "codebook", "cluster_size", "embed_sum", "initted",
        "project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias",
    }
    vq2 = VectorQuantizer(8, 16, codebook_dim=4)
    vq2.load_state_dict(sd)
    vq.eval(), vq2.eval()
    x = _x(2, 9, 8, seed=2)
    assert torch.equal(vq(x)[1], vq2(x)[1])
    text = repr(vq)
    assert "backend='auto' ->" in text and "codebook_size=16" in text and "ema(decay=0.99" in text
    assert math.isfinite(float(vq.perplexity))
