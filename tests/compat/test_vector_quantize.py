"""vqkernels.compat.VectorQuantize against the installed vector-quantize-pytorch 1.32 (LR).

Each case builds LR's layer and ours from the same seed, loads LR's state_dict into ours (strict)
and ours back into LR (strict), then runs training steps with the *same torch RNG state* on both
sides: our k-means seeding, dead-code replacement, Gumbel noise (one chunk at these sizes) and
directional-reparam noise call the generator like LR, so even the random options match exactly.
Compared: indices (exactly), outputs, losses, input and codebook gradients, every state_dict
entry after each step, and the eval forward.

Tolerances: LR builds outputs with a one-hot matmul and its rotation trick with a few fp32
products (its output equals the code up to rounding; ours is the code); EMA sums run in a
different order.  All fp32: rtol=atol=2e-5 covers these ulp-level differences.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqkernels.compat import VectorQuantize
from vqkernels.compat.vector_quantize_pytorch import _streamed

vqp = pytest.importorskip("vector_quantize_pytorch")

TOL = dict(rtol=2e-5, atol=2e-5)


def _assert_state_equal(up, ours):
    a, b = up.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k].float(), a[k].float(), **TOL, msg=k)


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    up = vqp.VectorQuantize(**kw)
    torch.manual_seed(seed)
    ours = VectorQuantize(**kw)
    ours.load_state_dict(up.state_dict())  # strict, LR -> ours
    up.load_state_dict(ours.state_dict())  # strict, ours -> LR
    return up, ours


def _input(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _compare_steps(up, ours, shape, steps=3, cb_grad=False, check_grad=True, **fkw):
    for step in range(steps):
        x = _input(shape, step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        torch.manual_seed(100 + step)
        qa, ia, la, ba = up(x, return_loss_breakdown=True, **fkw)
        torch.manual_seed(100 + step)
        qb, ib, lb, bb = ours(x2, return_loss_breakdown=True, **fkw)
        assert qa.shape == qb.shape and ia.shape == ib.shape
        assert torch.equal(ia, ib), f"step {step}"
        torch.testing.assert_close(qb, qa, **TOL)
        torch.testing.assert_close(lb, la, **TOL)
        for name in ba._fields:
            torch.testing.assert_close(getattr(bb, name).float(), getattr(ba, name).float(), **TOL, msg=name)
        g = torch.randn(qa.shape, generator=torch.Generator().manual_seed(10 + step))
        ((qa * g).sum() + la).backward()
        ((qb * g).sum() + lb).backward()
        if check_grad:
            torch.testing.assert_close(x2.grad, x.grad, **TOL)
        if cb_grad and check_grad:
            ga, gb = up._codebook.embed.grad, ours._codebook.embed.grad
            assert (ga is None) == (gb is None)
            if ga is not None:
                torch.testing.assert_close(gb, ga, **TOL)
                up._codebook.embed.grad = ours._codebook.embed.grad = None
        _assert_state_equal(up, ours)
    up.eval(), ours.eval()
    x = _input(shape, 99)
    qa, ia, la = up(x)
    qb, ib, lb = ours(x)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(qb, qa, **TOL)
    assert float(la.detach()) == float(lb.detach()) == 0.0
    _assert_state_equal(up, ours)


SEQ = (3, 17, 12)
CASES = {
    # LR's defaults: rotation trick on (dim > 1), EMA, decay 0.8, commitment 1
    "defaults": (dict(dim=12, codebook_size=40), SEQ),
    "ste": (dict(dim=12, codebook_size=40, rotation_trick=False, commitment_weight=0.3), SEQ),
    "cosine-codebook_dim": (dict(dim=12, codebook_size=40, use_cosine_sim=True, codebook_dim=5), SEQ),
    "heads-separate": (dict(dim=12, codebook_size=24, heads=3, separate_codebook_per_head=True,
                            codebook_dim=4), SEQ),
    "heads-shared": (dict(dim=12, codebook_size=24, heads=2), SEQ),
    "heads-separate-proj": (dict(dim=12, codebook_size=24, heads=2, separate_codebook_per_head=True,
                                 codebook_dim=8, layernorm_after_project_in=True), SEQ),
    "learnable": (dict(dim=12, codebook_size=40, learnable_codebook=True, ema_update=False), SEQ),
    "learnable-inplace-sgd": (dict(dim=12, codebook_size=40, learnable_codebook=True, ema_update=False,
                                   in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5)), SEQ),
    "kmeans-dead-codes": (dict(dim=12, codebook_size=40, kmeans_init=True, kmeans_iters=4,
                               threshold_ema_dead_code=2), SEQ),
    "cosine-kmeans-dead": (dict(dim=12, codebook_size=40, use_cosine_sim=True, kmeans_init=True,
                                threshold_ema_dead_code=1.5), SEQ),
    "orthogonal": (dict(dim=12, codebook_size=40, orthogonal_reg_weight=0.5,
                        orthogonal_reg_max_codes=16), SEQ),
    "orthogonal-active": (dict(dim=12, codebook_size=40, orthogonal_reg_weight=0.5,
                               orthogonal_reg_active_codes_only=True), SEQ),
    "diversity": (dict(dim=12, codebook_size=40, codebook_diversity_loss_weight=0.3,
                       codebook_diversity_temperature=5.0), SEQ),
    "diversity-heads-separate": (dict(dim=12, codebook_size=24, heads=3, separate_codebook_per_head=True,
                                      codebook_dim=4, codebook_diversity_loss_weight=0.5), SEQ),
    "diversity-heads-shared-cosine": (dict(dim=12, codebook_size=24, heads=2, use_cosine_sim=True,
                                           codebook_diversity_loss_weight=0.5,
                                           codebook_diversity_temperature=10.0), SEQ),
    # no EMA: exact gradients (LR's codes are not overwritten before backward)
    "diversity-learnable": (dict(dim=12, codebook_size=40, learnable_codebook=True, ema_update=False,
                                 codebook_diversity_loss_weight=0.3), SEQ),
    "diversity-image": (dict(dim=6, codebook_size=20, accept_image_fmap=True,
                             codebook_diversity_loss_weight=0.3), (2, 6, 5, 4)),
    "commit-ce": (dict(dim=12, codebook_size=40, commitment_use_cross_entropy_loss=True), SEQ),
    "commit-ce-heads": (dict(dim=12, codebook_size=24, heads=3, separate_codebook_per_head=True,
                             codebook_dim=4, commitment_use_cross_entropy_loss=True), SEQ),
    "commit-ce-heads-shared": (dict(dim=12, codebook_size=24, heads=2, commitment_use_cross_entropy_loss=True),
                               SEQ),
    "commit-ce-cosine": (dict(dim=12, codebook_size=40, use_cosine_sim=True, codebook_dim=5,
                              commitment_use_cross_entropy_loss=True), SEQ),
    # no EMA: LR's codes are not overwritten before backward, so the gradients compare exactly
    "commit-ce-learnable": (dict(dim=12, codebook_size=40, learnable_codebook=True, ema_update=False,
                                 commitment_use_cross_entropy_loss=True, commitment_weight=0.7), SEQ),
    "stochastic": (dict(dim=12, codebook_size=40, stochastic_sample_codes=True,
                        sample_codebook_temp=0.7), SEQ),
    "gumbel-straight-through": (dict(dim=12, codebook_size=40, stochastic_sample_codes=True,
                                     straight_through=True, rotation_trick=False), SEQ),
    "affine": (dict(dim=12, codebook_size=40, affine_param=True), SEQ),
    "directional-reparam": (dict(dim=12, codebook_size=40, directional_reparam=True,
                                 threshold_ema_dead_code=1), SEQ),
    "sync-update-v": (dict(dim=12, codebook_size=40, learnable_codebook=True, ema_update=False,
                           sync_update_v=0.5), SEQ),
    "no-route-to-input": (dict(dim=12, codebook_size=40, route_gradients_to_input=False), SEQ),
    "image-fmap": (dict(dim=6, codebook_size=20, accept_image_fmap=True), (2, 6, 5, 4)),
    "3d-fmap": (dict(dim=4, codebook_size=10, accept_3d_fmap=True), (2, 4, 3, 2, 2)),
    "channel-first-seq": (dict(dim=6, codebook_size=20, channel_last=False), (3, 6, 9)),
    "two-dim-input": (dict(dim=8, codebook_size=16), (5, 8)),
    "image-heads": (dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True,
                         accept_image_fmap=True), (2, 8, 3, 4)),
}


# LR quirk: its distance matrix keeps a reference to the codebook buffer, which the EMA update then
# overwrites in place (`embed.data.copy_`) before backward, so the gradient of its distance-based
# losses (diversity, cross-entropy commitment) is taken at the *updated* codes.  Ours is the
# gradient at the codes the forward used.  Values and EMA state are compared on training steps;
# gradients exactly on steps with a frozen codebook (where LR's buffer is not overwritten).
STALE_CODE_GRADIENT = {"diversity", "diversity-heads-separate", "diversity-heads-shared-cosine",
                       "diversity-image", "commit-ce", "commit-ce-heads", "commit-ce-heads-shared", "commit-ce-cosine"}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_lr_training_steps_and_eval(name):
    kw, shape = CASES[name]
    up, ours = _pair(**kw)
    stale = name in STALE_CODE_GRADIENT
    _compare_steps(up, ours, shape, cb_grad=True, check_grad=not stale)
    if stale:
        up.train(), ours.train()
        _compare_steps(up, ours, shape, steps=2, cb_grad=True, freeze_codebook=True)


def test_vq_bridge_matches():
    kw = dict(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False)
    torch.manual_seed(0)
    bridge = nn.Linear(8, 8)
    up, ours = _pair(vq_bridge=bridge, **kw)  # the same bridge module in both
    _compare_steps(up, ours, (2, 9, 8), cb_grad=True)


@pytest.mark.parametrize("how", ["mask", "lens"])
@pytest.mark.parametrize("case", ["defaults", "ste-input-padding", "cosine", "heads", "commit-ce"])
def test_masked_sequences_match(case, how):
    kw = {
        "defaults": dict(),
        "ste-input-padding": dict(rotation_trick=False, return_zeros_for_masked_padding=False),
        "cosine": dict(use_cosine_sim=True, kmeans_init=True, threshold_ema_dead_code=1),
        "heads": dict(heads=2, separate_codebook_per_head=True),
        "commit-ce": dict(commitment_use_cross_entropy_loss=True),
    }[case]
    up, ours = _pair(dim=8, codebook_size=16, **kw)
    lens = torch.tensor([11, 6, 2])
    fkw = {"lens": lens} if how == "lens" else {"mask": torch.arange(11)[None] < lens[:, None]}
    _compare_steps(up, ours, (3, 11, 8), steps=2, check_grad=case != "commit-ce", **fkw)


@pytest.mark.parametrize("case", ["heads-separate", "heads-shared", "cosine", "learnable", "image"])
@pytest.mark.parametrize("training", [False, True])
def test_indices_cross_entropy_loss_matches(case, training):
    """``forward(indices=...)``: LR's ``(quantized, F.cross_entropy(dist, indices, ignore_index=-1))``,
    its value and its gradients to the input and (learnable) codebook; ``-1`` indices ignored."""
    kw, shape, idx_shape = {
        "heads-separate": (dict(heads=2, separate_codebook_per_head=True, codebook_dim=4), (2, 7, 8), (2, 7, 2)),
        "heads-shared": (dict(heads=2), (2, 7, 8), (2, 7, 2)),
        "cosine": (dict(use_cosine_sim=True, codebook_dim=3), (2, 7, 8), (2, 7)),
        "learnable": (dict(learnable_codebook=True, ema_update=False), (2, 7, 8), (2, 7)),
        "image": (dict(accept_image_fmap=True), (2, 8, 3, 4), (2, 12)),  # LR wants [b, (h w)]
    }[case]
    up, ours = _pair(dim=8, codebook_size=16, **kw)
    up.train(training), ours.train(training)
    x = _input(shape, 0).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    codes = torch.randint(-1, 16, idx_shape, generator=torch.Generator().manual_seed(1))
    if training and up.ema_update:
        # an EMA step: same values and buffers (LR's gradient would see the updated codes, see
        # STALE_CODE_GRADIENT); the gradients are compared below on a frozen-codebook call
        qa, la = up(x.detach(), indices=codes)
        qb, lb = ours(x2.detach(), indices=codes)
        torch.testing.assert_close(lb, la, **TOL)
        _assert_state_equal(up, ours)
    fkw = dict(freeze_codebook=True) if training else {}
    torch.manual_seed(3)
    qa, la = up(x, indices=codes, **fkw)
    torch.manual_seed(3)
    qb, lb = ours(x2, indices=codes, **fkw)
    torch.testing.assert_close(qb, qa, **TOL)
    torch.testing.assert_close(lb, la, **TOL)
    (qa.sum() + 3 * la).backward()
    (qb.sum() + 3 * lb).backward()
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    ga, gb = up._codebook.embed.grad, ours._codebook.embed.grad
    assert (ga is None) == (gb is None)
    if ga is not None:
        torch.testing.assert_close(gb, ga, **TOL)


def test_manual_and_accumulated_ema_and_weights():
    up, ours = _pair(dim=8, codebook_size=16, manual_ema_update=True)
    x = _input((2, 9, 8), 0)
    for m in (up, ours):
        m(x)
        m(x, accum_ema_update=True)  # accumulates into .grad of the EMA buffers
        m(x, ema_update_weight=torch.rand(1, 16, generator=torch.Generator().manual_seed(3)))
        m._codebook.update_ema()
    _assert_state_equal(up, ours)


def test_freeze_codebook_and_update_indices():
    up, ours = _pair(dim=8, codebook_size=16, freeze_codebook=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    _compare_steps(up, ours, (2, 9, 8), steps=1)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    up.train(), ours.train()
    x = _input((2, 9, 8), 5)
    idx = torch.randint(-1, 16, (2, 9), generator=torch.Generator().manual_seed(2))
    up.update_indices(x, idx)
    ours.update_indices(x, idx)
    _assert_state_equal(up, ours)


def test_codes_helpers_and_codebook_setter():
    up, ours = _pair(dim=12, codebook_size=16, heads=3, separate_codebook_per_head=True,
                     codebook_dim=4, channel_last=False)
    idx = torch.randint(0, 16, (2, 5, 3))
    torch.testing.assert_close(ours.get_codes_from_indices(idx), up.get_codes_from_indices(idx))
    single_up, single = _pair(dim=8, codebook_size=16, codebook_dim=4)
    idx = torch.randint(0, 16, (2, 5))
    torch.testing.assert_close(single.get_output_from_indices(idx), single_up.get_output_from_indices(idx))
    new = torch.randn(16, 4)
    single.codebook = new
    assert torch.equal(single.codebook, new) and single.codebook.shape == single_up.codebook.shape


def test_kmeans_checkpoint_before_init_loads_and_initializes():
    up, ours = _pair(dim=8, codebook_size=16, kmeans_init=True)
    assert not bool(ours._codebook.initted)
    ours(torch.randn(2, 30, 8))
    assert bool(ours.state_dict()["_codebook.initted"]) and ours.codebook.abs().sum() > 0
    up.load_state_dict(ours.state_dict())


def test_signature_errors_and_refusals():
    with pytest.raises(TypeError):
        VectorQuantize(8, 16, not_an_lr_option=True)
    with pytest.raises(ValueError, match="rotation_trick"):
        VectorQuantize(8, 16, straight_through=True)  # LR's default rotation trick conflicts
    with pytest.raises(ValueError, match="learnable_codebook"):
        VectorQuantize(8, 16, learnable_codebook=True)  # LR: needs ema_update=False
    vq = VectorQuantize(8, 16)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="topk"):
        VectorQuantize(8, 16, heads=2)(x, topk=2)  # LR: single-head codebooks only
    with pytest.raises(ValueError, match="dim=8"):
        vq(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="mask"):
        vq(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantize(8, 0)


def test_separate_codebook_heads_search_and_stats_in_one_op_call(monkeypatch):
    # heads=3 with separate codebooks: one [H, K, d] nearest_code and one cluster_stats per step
    # (not a loop over heads), and still LR's indices, outputs and EMA state
    from vqkernels.compat.vector_quantize_pytorch import _codebook

    calls = {"nearest_code": [], "cluster_stats": []}
    for name in calls:
        real = getattr(_codebook.vqf, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name].append(a[1].dim() if _name == "nearest_code" else k.get("heads"))
            return _real(*a, **k)

        monkeypatch.setattr(_codebook.vqf, name, spy)
    up, ours = _pair(dim=12, codebook_size=24, heads=3, separate_codebook_per_head=True,
                     rotation_trick=False)
    _compare_steps(up, ours, SEQ, steps=2)
    assert calls["nearest_code"] and set(calls["nearest_code"]) == {3}
    assert calls["cluster_stats"] and set(calls["cluster_stats"]) == {3}


@pytest.mark.parametrize("kw", [dict(), dict(use_cosine_sim=True),
                                dict(heads=2, separate_codebook_per_head=True)])
def test_rotation_trick_runs_on_the_fused_quantize_op(monkeypatch, kw):
    # LR's default estimator: one quantize(estimator="rotation") call per step (search, codes and
    # the O(d) backward in the op; no separate search), still LR's indices, values and gradients
    from vqkernels.compat.vector_quantize_pytorch import _codebook

    calls = []
    for name in ("quantize", "nearest_code"):
        real = getattr(_codebook.vqf, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append((_name, k.get("estimator")))
            return _real(*a, **k)

        monkeypatch.setattr(_codebook.vqf, name, spy)
    up, ours = _pair(dim=12, codebook_size=24, **kw)
    _compare_steps(up, ours, SEQ, steps=2)
    # two training steps on the op, then the eval forward's plain search
    assert calls == [("quantize", "rotation")] * 2 + [("nearest_code", None)]


def test_fused_rotation_ties_and_zero_rows_follow_lr():
    # the fused op picks the exact nearest code and returns exactly it; LR ties every code within
    # 1e-4 (its clamped cdist; lowest index wins) and scales its value towards 0 where ‖x‖ < 1e-6:
    # rows 0 (a tie the op decides the other way) and 1 (a zero input) must follow LR anyway
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist as lr_cdist
    from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to as lr_rotate_to

    from vqkernels.compat.vector_quantize_pytorch._codebook import Codebook

    x = torch.tensor([[0.01, 0.02, 0.03, 0.04], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, 2.0, 1.0]])
    codes = torch.stack([x[0] + torch.tensor([5e-5, 0, 0, 0]), x[0], torch.tensor([0.3, -0.2, 0.1, 0.5])])
    cb = Codebook(dim=4, codebook_size=3, threshold_ema_dead_code=0)
    flat = x.clone()[None].requires_grad_()
    q, idx = cb.rotation_quantize(flat, codes[None])
    ours = _streamed.patch_rotation_value(flat, q)[0]
    lr_idx = (-lr_cdist(x[None], codes[None])[0]).argmax(-1)
    assert idx[0].tolist() == lr_idx.tolist() == [0, 1, 2]
    xl = x.clone().requires_grad_()
    lr = lr_rotate_to(xl, codes[lr_idx])
    torch.testing.assert_close(ours, lr, **TOL)
    assert torch.equal(ours[0], codes[0])  # the code itself (LR's equals it up to rounding)
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    (ours * g).sum().backward()
    (lr * g).sum().backward()
    torch.testing.assert_close(flat.grad[0], xl.grad, **TOL)


@pytest.mark.parametrize("cosine", [False, True])
def test_fused_sampling_follows_lr_distribution(cosine):
    # fused_sampling=True: the Gumbel-max of nearest_code (2 heads, one call); each head's code
    # frequencies over many copies of one row must match softmax(LR's logits / τ) — LR's
    # -cdist (non-squared) for euclidean codebooks, the cosine similarity for cosine ones
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist as lr_cdist

    from vqkernels.compat.vector_quantize_pytorch._codebook import Codebook

    g = torch.Generator().manual_seed(0)
    n, k, temp = 6000, 5, 0.7
    rows = torch.randn(2, 1, 4, generator=g)
    codes = torch.randn(2, k, 4, generator=g)
    if cosine:
        rows, codes = F.normalize(rows, dim=-1), F.normalize(codes, dim=-1)
    cb = Codebook(dim=4, codebook_size=k, num_codebooks=2, stochastic_sample_codes=True,
                  use_cosine_sim=cosine, fused_sampling=True)
    torch.manual_seed(1)
    idx = cb.search(rows.expand(2, n, 4), codes, temp, True, True)
    logits = (rows @ codes.transpose(1, 2)) if cosine else -lr_cdist(rows, codes)
    want = (logits[:, 0] / temp).softmax(-1)
    got = torch.stack([torch.bincount(idx[h], minlength=k) for h in range(2)]).float() / n
    assert (got - want).abs().max() < 0.03  # > 4 sigma at n = 6000
    assert not torch.equal(idx[0], idx[1])  # the heads draw independently
    vq = VectorQuantize(dim=8, codebook_size=16, stochastic_sample_codes=True, fused_sampling=True)
    q, ind, loss = vq(torch.randn(2, 9, 8, requires_grad=True))
    assert ind.shape == (2, 9) and q.shape == (2, 9, 8) and loss.requires_grad


def test_package_exports_and_one_line_switch():
    import vqkernels
    from vqkernels.compat import GroupedResidualVQ, ResidualVQ, VectorQuantize  # noqa: F401

    assert vqkernels.VectorQuantizer is vqkernels.nn.VectorQuantizer
    assert vqkernels.ResidualVectorQuantizer is vqkernels.nn.ResidualVectorQuantizer


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_fused_soft_losses_agree_across_backends(backend):
    # the CE commitment, diversity loss and Gumbel straight-through codes of one layer run on the
    # codebook-softmax ops of the chosen backend: same loss and gradients as the reference
    import vqkernels

    if backend not in vqkernels.dispatch.available_backends("cpu"):
        pytest.skip(f"{backend} backend not available")
    kw = dict(dim=8, codebook_size=24, heads=2, separate_codebook_per_head=True, codebook_dim=4,
              commitment_use_cross_entropy_loss=True, codebook_diversity_loss_weight=0.4,
              stochastic_sample_codes=True, straight_through=True, rotation_trick=False,
              freeze_codebook=True)
    out = []
    for b in ("reference", backend):
        torch.manual_seed(0)
        vq = VectorQuantize(**kw, backend=b)
        x = _input((2, 9, 8), 0).requires_grad_()
        torch.manual_seed(1)
        q, idx, loss = vq(x)
        (q.square().sum() + loss).backward()
        out.append((idx, loss.detach(), x.grad))
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][2], out[0][2], rtol=1e-4, atol=1e-5)
