"""vqkernels.compat.ResidualSimVQ against vector-quantize-pytorch 1.32: outputs, indices (quantize
dropout under the same seed), per-stage losses, all codes, decoded outputs, input and codebook
transform gradients; strict checkpoints both ways."""

from __future__ import annotations

import pytest
import torch
from lr_compare import assert_same, strict_pair, twin_inputs

from vqkernels.compat.vector_quantize_pytorch.residual_sim_vq import ResidualSimVQ

vqp = pytest.importorskip("vector_quantize_pytorch")

CASES = {
    "rotation": (dict(dim=8, codebook_size=32, num_quantizers=3), (2, 9, 8)),
    "dropout-ste": (dict(dim=6, codebook_size=16, num_quantizers=4, quantize_dropout=True, rotation_trick=False),
                    (3, 5, 6)),
    "image-channel-first-dropout": (dict(dim=4, codebook_size=16, num_quantizers=3, channel_first=True,
                                         quantize_dropout=True), (2, 4, 3, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_residual_sim_vq_matches_upstream(name):
    kwargs, shape = CASES[name]
    up, ours = strict_pair(vqp.ResidualSimVQ, ResidualSimVQ, **kwargs)
    for step, training in enumerate((True, True, True, False)):
        up.train(training)
        ours.train(training)
        up.zero_grad()
        ours.zero_grad()
        x_up, x_ours = twin_inputs(*shape, seed=step)
        torch.manual_seed(30 + step)
        r_up = up(x_up, return_all_codes=True)
        torch.manual_seed(30 + step)
        r_ours = ours(x_ours, return_all_codes=True)
        assert_same(r_up, r_ours, name, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(r_up[0])
        ((r_up[0] * grad).sum() + r_up[2].sum()).backward()
        ((r_ours[0] * grad).sum() + r_ours[2].sum()).backward()
        assert_same(x_up.grad, x_ours.grad, "x.grad", rtol=1e-4, atol=1e-5)
        for (pname, p_up), (_, p_ours) in zip(up.named_parameters(), ours.named_parameters()):
            assert_same(p_up.grad, p_ours.grad, pname, rtol=1e-4, atol=1e-6)
        assert_same(up.get_output_from_indices(r_up[1]), ours.get_output_from_indices(r_ours[1]), "from indices")
    assert_same(up.codebooks, ours.codebooks, "codebooks")
