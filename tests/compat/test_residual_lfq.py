"""vqkernels.compat.ResidualLFQ / GroupedResidualLFQ against vector-quantize-pytorch 1.32: outputs,
indices (quantize dropout under the same seed), per-stage losses, all codes, decoded outputs and
input gradients; strict checkpoints both ways."""

from __future__ import annotations

import pytest
import torch
from lr_compare import assert_same, strict_pair, twin_inputs

from vqkernels.compat.vector_quantize_pytorch.residual_lfq import GroupedResidualLFQ, ResidualLFQ

vqp = pytest.importorskip("vector_quantize_pytorch")

CASES = {
    "rlfq-proj": ("ResidualLFQ", dict(dim=16, codebook_size=2**8, num_quantizers=3, commitment_loss_weight=0.25),
                  (2, 7, 16), {}),
    "rlfq-dropout-mask": ("ResidualLFQ", dict(dim=6, codebook_size=2**6, num_quantizers=4, quantize_dropout=True,
                                              soft_clamp_input_value=2.0), (3, 5, 6), dict(mask=True)),
    "grouped": ("GroupedResidualLFQ", dict(dim=8, groups=2, codebook_size=2**4, num_quantizers=2,
                                           quantize_dropout=True), (2, 7, 8), {}),
}
OURS = {"ResidualLFQ": ResidualLFQ, "GroupedResidualLFQ": GroupedResidualLFQ}


@pytest.mark.parametrize("name", list(CASES))
def test_residual_lfq_matches_upstream(name):
    cls, kwargs, shape, fkw = CASES[name]
    up, ours = strict_pair(getattr(vqp, cls), OURS[cls], **kwargs)
    for step, training in enumerate((True, True, True, False)):
        up.train(training)
        ours.train(training)
        x_up, x_ours = twin_inputs(*shape, seed=step, scale=0.3)
        call = dict(fkw, return_all_codes=True)
        if call.get("mask"):
            call["mask"] = torch.rand(shape[:2], generator=torch.Generator().manual_seed(step)) > 0.3
        torch.manual_seed(20 + step)
        r_up = up(x_up, **call)
        torch.manual_seed(20 + step)
        r_ours = ours(x_ours, **call)
        assert_same(r_up, r_ours, name, rtol=1e-5, atol=1e-5)
        if training:
            grad = torch.randn_like(r_up[0])
            ((r_up[0] * grad).sum() + r_up[2].sum()).backward()
            ((r_ours[0] * grad).sum() + r_ours[2].sum()).backward()
            assert_same(x_up.grad, x_ours.grad, "x.grad", rtol=1e-4, atol=1e-5)
        assert_same(up.get_output_from_indices(r_up[1]), ours.get_output_from_indices(r_ours[1]), "from indices")
    assert_same(up.codebooks, ours.codebooks, "codebooks")
