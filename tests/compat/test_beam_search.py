"""Top-k codes (``VectorQuantize.forward(topk=)``) and residual beam search (``ResidualVQ(beam_size=,
eval_beam_size=, beam_score_quantizer_weights=)``) against the installed vector-quantize-pytorch
1.32 (LR), same weights and the same torch RNG state on both sides.

Compared exactly (indices) or to fp32 ulps (TOL): outputs, per-candidate / per-depth losses, input
and learnable-codebook gradients, eval with ``eval_beam_size``, masks, quantize dropout, Gumbel
sampling, score weights, GroupedResidualVQ.

One LR bug is NOT reproduced (see ``_beam``): after a training beam search LR updates only depth
0's codebook (``all_residuals[..., 0, :]`` picks depth 0, not beam 0), with the input.  We update
every depth from the residual it quantized on the chosen path — what LR's loop is written to do.
Depth 0's buffers are compared with LR's; the deeper depths with LR's own ``update_indices`` fed
the chosen path's residuals (:func:`_intended_update`).
"""

from __future__ import annotations

import copy

import pytest
import torch

from vqkernels.compat import GroupedResidualVQ, ResidualVQ, VectorQuantize
from vqkernels.compat.vector_quantize_pytorch import _streamed

vqp = pytest.importorskip("vector_quantize_pytorch")

TOL = dict(rtol=2e-5, atol=2e-5)


def _pair(up_cls, cls, **kw):
    torch.manual_seed(0)
    up = up_cls(**kw)
    torch.manual_seed(0)
    ours = cls(**kw)
    ours.load_state_dict(up.state_dict())
    up.load_state_dict(ours.state_dict())
    return up, ours


def _twins(shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.clone().requires_grad_(), x.clone().requires_grad_()


def _run_both(up, ours, x_up, x_ours, seed=1, **fkw):
    torch.manual_seed(seed)
    a = up(x_up, **fkw)
    torch.manual_seed(seed)
    b = ours(x_ours, **fkw)
    return a, b


def _assert_outputs(a, b):
    assert torch.equal(a[1], b[1]), f"{int((a[1] != b[1]).sum())} indices differ"
    torch.testing.assert_close(b[0], a[0], **TOL)
    torch.testing.assert_close(b[2], a[2], **TOL)


def _backward_both(a, b, x_up, x_ours, seed=5):
    g = torch.randn(a[0].shape, generator=torch.Generator().manual_seed(seed))
    ((a[0] * g).sum() + a[2].sum()).backward()
    ((b[0] * g).sum() + b[2].sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_up.grad, **TOL)


# ---------------------------------------------------------------------------- VectorQuantize(topk=)

TOPK_CASES = {
    "defaults": dict(),
    "ste": dict(rotation_trick=False, commitment_weight=0.3),
    "cosine-codebook_dim": dict(use_cosine_sim=True, codebook_dim=4),
    # topk does no EMA step, so LR's diversity gradient is exact here
    "diversity-orthogonal": dict(codebook_diversity_loss_weight=0.2, codebook_diversity_temperature=3.0,
                                 orthogonal_reg_weight=0.1, orthogonal_reg_active_codes_only=True),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "stochastic": dict(stochastic_sample_codes=True, sample_codebook_temp=0.7),
    "directional": dict(directional_reparam=True, threshold_ema_dead_code=1),
    "no-commitment": dict(commitment_weight=0.0),
    "input-padding": dict(return_zeros_for_masked_padding=False, codebook_dim=4),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(TOPK_CASES))
def test_vq_topk_matches_lr(name, masked, training):
    up, ours = _pair(vqp.VectorQuantize, VectorQuantize, dim=8, codebook_size=16, **TOPK_CASES[name])
    up.train(training), ours.train(training)
    x_up, x_ours = _twins((2, 9, 8), 0)
    mask = (torch.arange(9)[None] < torch.tensor([9, 4])[:, None]) if masked else None
    a, b = _run_both(up, ours, x_up, x_ours, topk=3, mask=mask, return_loss_breakdown=True)
    assert b[0].shape == (2, 9, 3, 8) and b[1].shape == (2, 9, 3)
    _assert_outputs(a, b)
    for field in a[3]._fields:
        torch.testing.assert_close(getattr(b[3], field).float(), getattr(a[3], field).float(), **TOL, msg=field)
    if a[0].requires_grad:
        _backward_both(a, b, x_up, x_ours)
        ga, gb = up._codebook.embed.grad, ours._codebook.embed.grad
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(gb, ga, **TOL)
    for k, v in up.state_dict().items():  # top-k never updates the codebook (LR)
        torch.testing.assert_close(ours.state_dict()[k].float(), v.float(), **TOL, msg=k)


@pytest.mark.parametrize("layout", ["two-dim", "channel-first", "image-fmap"])
def test_vq_topk_layouts_match_lr(layout):
    kw, shape = {
        "two-dim": (dict(), (5, 8)),
        "channel-first": (dict(channel_last=False), (2, 8, 7)),
        "image-fmap": (dict(accept_image_fmap=True), (2, 8, 3, 4)),
    }[layout]
    up, ours = _pair(vqp.VectorQuantize, VectorQuantize, dim=8, codebook_size=16, **kw)
    for training in (True, False):
        up.train(training), ours.train(training)
        x_up, x_ours = _twins(shape, 3)
        a, b = _run_both(up, ours, x_up, x_ours, topk=4)
        assert a[0].shape == b[0].shape and a[2].shape == b[2].shape
        _assert_outputs(a, b)
        if training:
            _backward_both(a, b, x_up, x_ours)


@pytest.mark.parametrize("training", [True, False])
def test_vq_topk_with_indices_returns_candidates_and_cross_entropy(training):
    # LR's early return: (the k candidates before project_out, cross-entropy of the given codes)
    up, ours = _pair(vqp.VectorQuantize, VectorQuantize, dim=8, codebook_size=16, codebook_dim=4,
                     learnable_codebook=True, ema_update=False)
    up.train(training), ours.train(training)
    x_up, x_ours = _twins((2, 9, 8), 4)
    codes = torch.randint(-1, 16, (2, 9), generator=torch.Generator().manual_seed(0))
    (qa, la), (qb, lb) = _run_both(up, ours, x_up, x_ours, topk=3, indices=codes)
    assert qb.shape == qa.shape == (2, 9, 3, 4)
    torch.testing.assert_close(qb, qa, **TOL)
    torch.testing.assert_close(lb, la, **TOL)
    (qa.sum() + la).backward()
    (qb.sum() + lb).backward()
    torch.testing.assert_close(x_ours.grad, x_up.grad, **TOL)
    torch.testing.assert_close(ours._codebook.embed.grad, up._codebook.embed.grad, **TOL)


def test_vq_topk_refusals_and_clamp():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="single-head"):
        VectorQuantize(8, 16, heads=2)(x, topk=2)
    with pytest.raises(ValueError, match="cross entropy"):
        VectorQuantize(8, 16, commitment_use_cross_entropy_loss=True)(x, topk=2)
    with pytest.raises(ValueError, match="affine_param"):
        VectorQuantize(8, 16, affine_param=True)(x, topk=2)
    vq = VectorQuantize(8, 4).eval()
    q, idx, loss = vq(x, topk=10)  # clamped to the codebook size, as LR
    assert idx.shape == (2, 5, 4) and torch.equal(idx.sort(-1).values, torch.arange(4).expand(2, 5, 4))


def test_topk_codes_chunks_equal_one_full_search(monkeypatch):
    # the row-chunked top-k (never N x K) equals LR's topk of the full logits, also with noise:
    # the chunks draw the Gumbel noise in LR's order
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist

    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(37, 6, generator=g), torch.randn(11, 6, generator=g)
    assert torch.equal(_streamed.topk_codes(x, e, 4, "neg_cdist", 1.0, False),
                       (-cdist(x[None], e[None]))[0].topk(4, dim=-1).indices)
    for kind, stochastic in (("neg_cdist", False), ("dot", False), ("neg_cdist", True)):
        torch.manual_seed(3)
        full = _streamed.topk_codes(x, e, 4, kind, 0.5, stochastic)
        monkeypatch.setattr(_streamed, "_CHUNK_ELEMS", 30)  # 2 rows per chunk
        torch.manual_seed(3)
        chunked = _streamed.topk_codes(x, e, 4, kind, 0.5, stochastic)
        monkeypatch.undo()
        assert torch.equal(full, chunked)


# ---------------------------------------------------------------------------- ResidualVQ(beam_size=)

RVQ = dict(dim=8, num_quantizers=3, codebook_size=16)
BEAM_CASES = {
    "defaults": dict(),
    "ste": dict(rotation_trick=False),
    "cosine": dict(use_cosine_sim=True),
    "score-weights": dict(beam_score_quantizer_weights=[1.0, 0.5, 0.25]),
    "projection": dict(codebook_dim=4),
    "quant-grad-frac": dict(quant_grad_frac=0.3),
    "dead-codes": dict(threshold_ema_dead_code=2),
    "stochastic": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "shared-codebook": dict(shared_codebook=True),
    "dropout": dict(quantize_dropout=True, quantize_dropout_cutoff_index=1),
}


def _intended_update(up_before, x, idx, mask):
    """LR's own ``update_indices`` on a pre-step copy of LR's stack, fed each depth's residual on
    the chosen path (``x − Σ earlier codes``, the pre-step codes), then the shared codebook's step."""
    residual = x.detach()
    up_before.train()
    torch.manual_seed(1)  # the dead-code draws: our forward (seed 1) draws nothing before them
    inputs = []
    for i, layer in enumerate(up_before.layers):
        if bool((idx[..., i] < 0).all()):  # dropped depth
            break
        inputs.append(residual)
        residual = residual - layer.codebook[idx[..., i].clamp_min(0)]
    for layer, inp, i in zip(up_before.layers, inputs, range(len(inputs))):
        layer.update_indices(inp, idx[..., i], mask=mask)
    if up_before.shared_codebook:
        shared = up_before.layers[0]
        shared._codebook.update_ema()
        stacked = torch.stack(inputs, dim=-2)
        shared.expire_codes_(stacked.reshape(stacked.shape[0], -1, stacked.shape[-1]))
    return up_before


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(BEAM_CASES))
def test_rvq_beam_search_matches_lr(name, masked):
    up, ours = _pair(vqp.ResidualVQ, ResidualVQ, beam_size=3, eval_beam_size=2, **RVQ, **BEAM_CASES[name])
    mask = (torch.arange(24)[None] < torch.tensor([24, 15])[:, None]) if masked else None
    # a training step: the search, outputs, losses and gradients are LR's
    before = copy.deepcopy(up)
    x_up, x_ours = _twins((2, 24, 8), 0)
    # (dropout seed 1: depth 1 is the last one kept, so beam 1 there and depth 2 padded with -1)
    a, b = _run_both(up, ours, x_up, x_ours, mask=mask, rand_quantize_dropout_fixed_seed=1)
    _assert_outputs(a, b)
    if ours.quantize_dropout:
        assert bool((b[1][..., 2] == -1).all()) and bool((b[1][..., 1] >= 0).any())
    _backward_both(a, b, x_up, x_ours)
    # codebooks: depth 0 as LR; every depth as LR's update_indices on the chosen path
    want = _intended_update(before, ours.project_in(x_ours.detach()), b[1], mask)
    for k, v in want.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k].float(), v.float(), **TOL, msg=k)
    for k, v in up.state_dict().items():
        if k.startswith("layers.0.") and not ours.shared_codebook:
            torch.testing.assert_close(ours.state_dict()[k].float(), v.float(), **TOL, msg=k)
    # eval with eval_beam_size (same weights on both sides again)
    up.load_state_dict(ours.state_dict())
    up.eval(), ours.eval()
    x_up, x_ours = _twins((2, 24, 8), 1)
    a, b = _run_both(up, ours, x_up, x_ours, mask=mask, return_all_codes=True)
    _assert_outputs(a, b)
    torch.testing.assert_close(b[3], a[3], **TOL)


@pytest.mark.parametrize("case", ["learnable", "learnable-diversity"])
def test_rvq_beam_search_learnable_codebooks_match_lr_over_steps(case):
    # no EMA: LR's codebooks are only changed by the optimizer, so several steps compare exactly
    # (codebook gradients too; the diversity loss is summed into every candidate's loss)
    extra = dict(codebook_diversity_loss_weight=0.1, orthogonal_reg_weight=0.1) if case != "learnable" else {}
    up, ours = _pair(vqp.ResidualVQ, ResidualVQ, beam_size=2, learnable_codebook=True, ema_update=False,
                     **RVQ, **extra)
    opt_up = torch.optim.SGD(up.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    for step in range(3):
        x_up, x_ours = _twins((2, 24, 8), step)
        a, b = _run_both(up, ours, x_up, x_ours)
        _assert_outputs(a, b)
        _backward_both(a, b, x_up, x_ours)
        for (k, pa), pb in zip(up.named_parameters(), ours.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, **TOL, msg=k)
        opt_up.step(), opt_ours.step()
        opt_up.zero_grad(), opt_ours.zero_grad()


def test_rvq_forward_beam_size_override_and_beam_one():
    up, ours = _pair(vqp.ResidualVQ, ResidualVQ, **RVQ)
    up.eval(), ours.eval()
    x = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(4))
    _assert_outputs(up(x, beam_size=4), ours(x, beam_size=4))
    _assert_outputs(up(x, beam_size=1), ours(x, beam_size=1))  # 1 = the greedy path
    # the layer's own beam sizes: beam_size in training, eval_beam_size in eval
    up, ours = _pair(vqp.ResidualVQ, ResidualVQ, beam_size=4, eval_beam_size=3, **RVQ)
    up.eval(), ours.eval()
    _assert_outputs(up(x), ours(x))
    _assert_outputs(up(x, beam_size=3), ours(x))


def test_grouped_residual_vq_passes_beam_options():
    kw = dict(dim=8, groups=2, num_quantizers=2, codebook_size=16, beam_size=3, eval_beam_size=2,
              beam_score_quantizer_weights=[1.0, 0.5])
    up, ours = _pair(vqp.GroupedResidualVQ, GroupedResidualVQ, **kw)
    assert all(r.beam_size == 3 and r.eval_beam_size == 2 for r in ours.rvqs)
    for training in (False, True):
        up.train(training), ours.train(training)
        x_up, x_ours = _twins((2, 24, 8), 2)
        a, b = _run_both(up, ours, x_up, x_ours)
        _assert_outputs(a, b)


def test_rvq_beam_refusals():
    x = torch.randn(2, 6, 8)
    for kw, match in ((dict(implicit_neural_codebook=True), "implicit_neural_codebook"),
                      (dict(commitment_weight=0.0), "commitment"),
                      (dict(affine_param=True), "affine_param")):
        with pytest.raises(ValueError, match=match):
            ResidualVQ(beam_size=2, **RVQ, **kw)(x)
    with pytest.raises(ValueError, match="indices"):
        ResidualVQ(beam_size=2, **RVQ).eval()(x, indices=torch.zeros(2, 6, 3, dtype=torch.long))


def test_rvq_beam_search_kmeans_init_from_every_row():
    # LR 1.32 fails here for batch > 1 (its codebook takes the batch dim for codebooks); we
    # initialize each depth from all rows of its first input, as a plain forward would
    rvq = ResidualVQ(beam_size=2, kmeans_init=True, kmeans_iters=2, **RVQ)
    q, idx, losses = rvq(torch.randn(3, 20, 8))
    assert all(bool(layer._codebook.initted) for layer in rvq.layers)
    assert idx.shape == (3, 20, 3) and torch.isfinite(losses).all()
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        rvq(torch.randn(3, 8))


@pytest.mark.parametrize("training", [True, False])
def test_rvq_beam_wider_than_a_depths_codebook_matches_lr(training):
    # per-depth codebook sizes; beam 5 > 4 codes at depth 1 (LR clamps that depth's top-k to 4)
    up, ours = _pair(vqp.ResidualVQ, ResidualVQ, dim=6, num_quantizers=3, codebook_size=(16, 4, 32), beam_size=5)
    up.train(training), ours.train(training)
    x_up, x_ours = _twins((3, 20, 6), 0)
    a, b = _run_both(up, ours, x_up, x_ours)
    _assert_outputs(a, b)
    _backward_both(a, b, x_up, x_ours)


@pytest.mark.parametrize("name", ["defaults", "dead-codes", "shared-codebook"])
def test_rvq_beam_search_ema_over_training_steps(name):
    # several EMA steps: each step's search, outputs, losses and gradients are LR's, starting from
    # the codebooks LR's own update_indices gives on the chosen path (_intended_update; LR itself
    # updates depth 0 only, see the module docs)
    up, ours = _pair(vqp.ResidualVQ, ResidualVQ, beam_size=3, **RVQ, **BEAM_CASES[name])
    for step in range(3):
        before = copy.deepcopy(up)
        x_up, x_ours = _twins((2, 24, 8), 10 + step)
        a, b = _run_both(up, ours, x_up, x_ours)
        _assert_outputs(a, b)
        _backward_both(a, b, x_up, x_ours)
        up = _intended_update(before, x_ours.detach(), b[1], None)
        for k, v in up.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k].float(), v.float(), **TOL, msg=f"step {step}: {k}")


def test_streamed_logits_in_place_path_is_bit_identical_to_lr_cdist():
    # the searches' in-place -cdist (no autograd) does LR's float ops in LR's order: bit for bit
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist

    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    x[3] = e[7]  # a zero distance: LR's clamp
    with torch.no_grad():
        fast = _streamed.logits(x, e, "neg_cdist")
    slow = _streamed.logits(x.clone().requires_grad_(), e, "neg_cdist").detach()
    assert torch.equal(fast, slow)
    assert torch.equal(fast, -cdist(x[None], e[None])[0])
