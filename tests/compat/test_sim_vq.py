"""vqkernels.compat.SimVQ against vector-quantize-pytorch 1.32's SimVQ: same weights -> same
outputs, indices, commitment loss, gradients to the input (rotation trick and straight-through) and
to the codebook transform, decoded codes; checkpoints strict both ways."""

from __future__ import annotations

import pytest
import torch
from lr_compare import assert_same, strict_pair, twin_inputs

from vqkernels.compat.vector_quantize_pytorch.sim_vq import SimVQ

vqp = pytest.importorskip("vector_quantize_pytorch")

CASES = {
    "defaults-rotation": (dict(dim=8, codebook_size=64), (2, 9, 8)),
    "ste-weighted": (dict(dim=8, codebook_size=64, rotation_trick=False, commitment_weight=0.5,
                          input_to_quantize_commit_loss_weight=0.1), (2, 9, 8)),
    "image-channel-first-frozen-dim": (dict(dim=6, codebook_size=33, channel_first=True, frozen_codebook_dim=4),
                                       (2, 6, 3, 5)),
    "2d-input-K1": (dict(dim=5, codebook_size=1), (7, 5)),
}


def assert_simvq_step_matches(up, ours, shape, seed=1):
    x_up, x_ours = twin_inputs(*shape, seed=seed)
    r_up, r_ours = up(x_up), ours(x_ours)
    assert_same(r_up, r_ours, "forward", rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(r_up[0])
    ((r_up[0] * grad).sum() + r_up[-1].sum()).backward()
    ((r_ours[0] * grad).sum() + r_ours[-1].sum()).backward()
    assert_same(x_up.grad, x_ours.grad, "x.grad", rtol=1e-4, atol=1e-5)
    for (name, p_up), (_, p_ours) in zip(up.named_parameters(), ours.named_parameters()):
        assert_same(p_up.grad, p_ours.grad, name + ".grad", rtol=1e-4, atol=1e-6)
    return r_up, r_ours


@pytest.mark.parametrize("name", list(CASES))
def test_sim_vq_matches_upstream(name):
    kwargs, shape = CASES[name]
    up, ours = strict_pair(vqp.SimVQ, SimVQ, **kwargs)
    r_up, r_ours = assert_simvq_step_matches(up, ours, shape)
    assert_same(up.indices_to_codes(r_up[1]), ours.indices_to_codes(r_ours[1]), "indices_to_codes")
    assert_same(up.codebook, ours.codebook, "codebook")


def test_sim_vq_custom_transform_trains_like_upstream():
    def transform():
        return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))

    torch.manual_seed(0)
    up = vqp.SimVQ(dim=6, codebook_size=40, codebook_transform=transform())
    ours = SimVQ(dim=6, codebook_size=40, codebook_transform=transform())
    ours.load_state_dict(up.state_dict(), strict=True)
    opt_up = torch.optim.SGD(up.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    for step in range(3):
        opt_up.zero_grad()
        opt_ours.zero_grad()
        assert_simvq_step_matches(up, ours, (3, 11, 6), seed=step)
        opt_up.step()
        opt_ours.step()
    assert_same(up.codebook, ours.codebook, "codebook after 3 SGD steps", rtol=1e-4, atol=1e-5)


def test_sim_vq_bad_inputs():
    with pytest.raises(TypeError):
        SimVQ(dim=4, codebook_size=8, heads=2)
    simvq = SimVQ(dim=4, codebook_size=8)
    with pytest.raises(ValueError, match=r"\[B, ..., 4\]"):
        simvq(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="float"):
        simvq(torch.ones(2, 3, 4, dtype=torch.long))


def test_rotation_fallback_equals_the_ops_rotation_estimator():
    # SimVQ applies its O(D) rotation backward on the fused STE op while the fused backends lack
    # estimator="rotation"; it must equal the op's own (reference) estimator
    import vqkernels
    from vqkernels.compat.vector_quantize_pytorch import sim_vq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 6, generator=g)
    codebook = torch.randn(11, 6, generator=g)
    upstream_grad = torch.randn(37, 6, generator=g)
    results = []
    for fallback in (True, False):
        xi = x.clone().requires_grad_()
        ci = codebook.clone().requires_grad_()
        if fallback:
            q, idx, loss = vqkernels.quantize(xi, ci, 0.25, codebook_loss=True)
            q = sim_vq._RotationTrick.apply(xi, q.detach())
        else:
            q, idx, loss = vqkernels.quantize(xi, ci, 0.25, estimator="rotation", codebook_loss=True,
                                              backend="reference")
        ((q * upstream_grad).sum() + loss).backward()
        results.append((q, idx, loss, xi.grad, ci.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sim_vq_train_step_never_materializes_n_by_k():
    # upstream's cdist is N x K; the drop-in's largest tensor is the implicit codebook (K x D)
    from vqkernels.testing import LargestAtenOutput

    n, k, d = 600, 2048, 8
    simvq = SimVQ(dim=d, codebook_size=k)
    x = torch.randn(2, n // 2, d, requires_grad=True)
    with LargestAtenOutput() as sizes:
        q, _, loss = simvq(x)
        (q.sum() + loss).backward()
    assert sizes.largest <= max(k * d, n * d) < n * k // 16
