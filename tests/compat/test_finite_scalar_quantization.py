"""vqkernels.compat.FSQ against vector-quantize-pytorch 1.32's FSQ: same weights -> same outputs,
indices, input gradients and decoded codes; checkpoints load strictly both ways."""

from __future__ import annotations

import pytest
import torch
from lr_compare import assert_same, strict_pair, twin_inputs

from vqkernels.compat import FSQ

vqp = pytest.importorskip("vector_quantize_pytorch")

CASES = {
    "levels8555": (dict(levels=[8, 5, 5, 5]), (2, 7, 4)),
    "proj": (dict(levels=[8, 5, 5, 5], dim=12), (2, 7, 12)),
    "proj-nobias": (dict(levels=[7, 5, 3], dim=10, projection_has_bias=False), (3, 5, 10)),
    "multi-codebook-image": (dict(levels=[4, 3, 2], preserve_symmetry=True, dim=6, num_codebooks=2), (2, 6, 3, 3)),
    "hard-clamp-channel-first": (dict(levels=[7, 4], bound_hard_clamp=True, channel_first=True, dim=5), (2, 5, 9)),
    "rotation-video": (dict(levels=[5, 5], orthogonal_rotation=True), (2, 2, 3, 4, 5)),
    "image-proj": (dict(levels=[8, 6, 5], dim=3), (3, 3, 4, 4)),
    "no-indices": (dict(levels=[6, 5], return_indices=False), (2, 4, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fsq_matches_upstream(name):
    kwargs, shape = CASES[name]
    up, ours = strict_pair(vqp.FSQ, FSQ, **kwargs)
    for training in (True, False):
        up.train(training)
        ours.train(training)
        x_up, x_ours = twin_inputs(*shape, scale=2.0)
        out_up, out_ours = up(x_up), ours(x_ours)
        assert_same(out_up, out_ours, name)
        grad = torch.randn_like(out_up[0])
        out_up[0].backward(grad)
        out_ours[0].backward(grad)
        assert_same(x_up.grad, x_ours.grad, "x.grad", rtol=1e-5, atol=1e-6)
        for (pname, p_up), (_, p_ours) in zip(up.named_parameters(), ours.named_parameters()):
            assert_same(p_up.grad, p_ours.grad, pname + ".grad", rtol=1e-5, atol=1e-5)
            p_up.grad = p_ours.grad = None
        if out_up[1] is not None:
            assert_same(up.indices_to_codes(out_up[1]), ours.indices_to_codes(out_ours[1]), "indices_to_codes")
    if kwargs.get("return_indices", True):
        assert_same(up.implicit_codebook, ours.implicit_codebook, "implicit_codebook")


def test_fsq_noise_dropout_same_draws_for_the_same_seed():
    kwargs = dict(levels=[5, 4, 3], preserve_symmetry=True, noise_dropout=0.5)
    up, ours = strict_pair(vqp.FSQ, FSQ, **kwargs)
    x_up, x_ours = twin_inputs(2, 9, 3)
    torch.manual_seed(3)
    a = up(x_up)
    torch.manual_seed(3)
    b = ours(x_ours)
    assert_same(a, b)
    assert not torch.equal(b[0], ours.eval()(x_ours)[0])  # the noise did something


def test_fsq_half_precision_input_quantized_in_fp32():
    up, ours = strict_pair(vqp.FSQ, FSQ, levels=[8, 5, 5, 5])
    x = torch.randn(2, 6, 4).to(torch.bfloat16)
    assert_same(up(x), ours(x))


def test_fsq_bad_inputs():
    with pytest.raises(TypeError):
        FSQ(levels=[8, 5], not_an_option=1)
    with pytest.raises(ValueError, match="preserve_symmetry"):
        FSQ(levels=[2, 5])
    fsq = FSQ(levels=[8, 5], dim=6)
    with pytest.raises(ValueError, match="dimension of 6"):
        fsq(torch.randn(2, 3, 5))
    with pytest.raises(TypeError):
        fsq([1.0, 2.0])
