"""vqkernels.compat.ResidualFSQ / GroupedResidualFSQ against vector-quantize-pytorch 1.32: same
weights -> same outputs, indices (incl. quantize dropout under the same seed), all codes, decoded
outputs and input gradients; strict checkpoints both ways."""

from __future__ import annotations

import pytest
import torch
from lr_compare import assert_same, strict_pair, twin_inputs

from vqkernels.compat import GroupedResidualFSQ, ResidualFSQ

vqp = pytest.importorskip("vector_quantize_pytorch")

CASES = {
    "rfsq-proj": ("ResidualFSQ", dict(levels=[8, 5, 5, 5], num_quantizers=3, dim=16), (2, 7, 16)),
    "rfsq-dropout-image": ("ResidualFSQ", dict(levels=[5, 4], num_quantizers=4, dim=6, quantize_dropout=True,
                                               is_channel_first=True), (2, 6, 3, 4)),
    "rfsq-soft": ("ResidualFSQ", dict(levels=[5, 4, 3], num_quantizers=2, bound_hard_clamp=False), (2, 7, 3)),
    "rfsq-dropout-multiple": ("ResidualFSQ", dict(levels=[5, 3], num_quantizers=6, dim=4, quantize_dropout=True,
                                                  quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2),
                              (3, 5, 4)),
    "grouped": ("GroupedResidualFSQ", dict(levels=[5, 4, 3], num_quantizers=2, dim=12, groups=2,
                                           quantize_dropout=True), (2, 7, 12)),
}

OURS = {"ResidualFSQ": ResidualFSQ, "GroupedResidualFSQ": GroupedResidualFSQ}


@pytest.mark.parametrize("name", list(CASES))
def test_residual_fsq_matches_upstream(name):
    cls, kwargs, shape = CASES[name]
    up, ours = strict_pair(getattr(vqp, cls), OURS[cls], **kwargs)
    saw_dropout = False
    for step, training in enumerate((True, True, True, False)):
        up.train(training)
        ours.train(training)
        x_up, x_ours = twin_inputs(*shape, seed=step)
        torch.manual_seed(10 + step)
        out_up = up(x_up, return_all_codes=True)
        torch.manual_seed(10 + step)
        out_ours = ours(x_ours, return_all_codes=True)
        assert_same(out_up, out_ours, name)
        saw_dropout |= bool((out_ours[1] == -1).any())
        grad = torch.randn_like(out_up[0])
        out_up[0].backward(grad)
        out_ours[0].backward(grad)
        assert_same(x_up.grad, x_ours.grad, "x.grad")
        assert_same(up.get_output_from_indices(out_up[1]), ours.get_output_from_indices(out_ours[1]),
                     "get_output_from_indices")
    assert_same(up.codebooks, ours.codebooks, "codebooks")
    if kwargs.get("quantize_dropout") and cls == "ResidualFSQ":
        assert saw_dropout


def test_residual_fsq_coarse_indices_need_dropout():
    rfsq = ResidualFSQ(levels=[5, 4], num_quantizers=3)
    with pytest.raises(ValueError, match="quantize dropout"):
        rfsq.get_codes_from_indices(torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        ResidualFSQ(levels=[5, 4], num_quantizers=3, bogus=True)
