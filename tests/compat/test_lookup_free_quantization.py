"""vqkernels.compat.LFQ against vector-quantize-pytorch 1.32's LFQ: same weights -> same outputs,
indices, entropy aux loss and its breakdown, input gradients (through the entropy loss) and decoded
codes; checkpoints strict both ways.  Our entropy never builds the N x 2^d matrix upstream builds;
the numbers agree to fp32 rounding (rtol 1e-5 on the losses, 1e-4 on the gradients, whose largest
terms come from logits of size 2·τ·|x| ~ 10..100 in both)."""

from __future__ import annotations

import pytest
import torch
from lr_compare import assert_same, strict_pair, twin_inputs

from vqkernels.compat.vector_quantize_pytorch.lookup_free_quantization import LFQ

vqp = pytest.importorskip("vector_quantize_pytorch")

LOSS_TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "2^16": (dict(dim=16, codebook_size=65536), (2, 48, 16), {}),
    "defaults-d8": (dict(dim=8), (2, 9, 8), dict(return_loss_breakdown=True)),
    "two-codebooks-proj-commit": (dict(dim=12, codebook_size=2**5, num_codebooks=2, commitment_loss_weight=0.25),
                                  (2, 9, 12), dict(return_loss_breakdown=True)),
    "spherical-image": (dict(dim=6, codebook_size=2**6, spherical=True, codebook_scale=0.5), (2, 6, 3, 4),
                        dict(return_loss_breakdown=True)),
    "cosine-proj-softclamp-rotation-softplus": (
        dict(dim=6, codebook_size=2**5, cosine_sim_project_in=True, soft_clamp_input_value=2.0,
             orthogonal_rotation=True, experimental_softplus_entropy_loss=True),
        (3, 5, 6), dict(return_loss_breakdown=True, inv_temperature=3.0)),
    "frac-per-sample": (dict(dim=5, frac_per_sample_entropy=0.5, commitment_loss_weight=1.0), (3, 7, 5),
                        dict(return_loss_breakdown=True)),
    "mask": (dict(dim=5, commitment_loss_weight=1.0, diversity_gamma=0.5), (3, 7, 5),
             dict(return_loss_breakdown=True, mask=True)),
    "mask-two-codebooks-frac": (dict(dim=10, codebook_size=32, num_codebooks=2, frac_per_sample_entropy=0.5,
                                     commitment_loss_weight=0.5), (3, 7, 10), dict(return_loss_breakdown=True, mask=True)),
    "video-channel-first": (dict(dim=4, channel_first=True), (2, 4, 3, 2, 2), dict(return_loss_breakdown=True)),
    "straight-through-activation": (dict(dim=6, straight_through_activation=torch.nn.Tanh()), (2, 5, 6), {}),
}


def _split(ret):
    return ret[0] if isinstance(ret[0], tuple) else ret


@pytest.mark.parametrize("name", list(CASES))
def test_lfq_matches_upstream(name):
    kwargs, shape, fkw = CASES[name]
    up, ours = strict_pair(vqp.LFQ, LFQ, **kwargs)
    for step, training in enumerate((True, True, False)):
        up.train(training)
        ours.train(training)
        x_up, x_ours = twin_inputs(*shape, seed=step, scale=0.05)
        call = dict(fkw)
        if call.get("mask"):
            call["mask"] = torch.rand(shape[:2], generator=torch.Generator().manual_seed(step)) > 0.4
        torch.manual_seed(4)
        r_up = up(x_up, **call)
        torch.manual_seed(4)
        r_ours = ours(x_ours, **call)
        assert type(r_ours).__name__ == type(r_up).__name__
        assert_same(r_up, r_ours, name, **LOSS_TOL)
        out_up, out_ours = _split(r_up), _split(r_ours)
        if training:
            grad = torch.randn_like(out_up.quantized)
            ((out_up.quantized * grad).sum() + out_up.entropy_aux_loss).backward()
            ((out_ours.quantized * grad).sum() + out_ours.entropy_aux_loss).backward()
            assert_same(x_up.grad, x_ours.grad, "x.grad", rtol=1e-4, atol=1e-5)
            for (pname, p_up), (_, p_ours) in zip(up.named_parameters(), ours.named_parameters()):
                assert_same(p_up.grad, p_ours.grad, pname + ".grad", rtol=1e-4, atol=1e-5)
                p_up.grad = p_ours.grad = None
        assert_same(up.indices_to_codes(out_up.indices), ours.indices_to_codes(out_ours.indices), "indices_to_codes")
    assert_same(up.codebook, ours.codebook, "codebook")


def test_lfq_entropy_is_not_trivially_zero():
    # the comparison above must see a real loss: uncertain bits at a low temperature
    ours = LFQ(dim=10)
    _, breakdown = ours(torch.randn(2, 30, 10) * 0.05, return_loss_breakdown=True)
    assert breakdown.per_sample_entropy > 0.1 and breakdown.batch_entropy > 1.0


def test_lfq_bad_inputs():
    with pytest.raises(TypeError):
        LFQ(dim=4, unknown_option=1)
    with pytest.raises(ValueError, match="power of 2"):
        LFQ(codebook_size=100)
    lfq = LFQ(dim=6)
    with pytest.raises(ValueError, match="feature dim 5"):
        lfq(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="mask"):
        lfq(torch.randn(2, 3, 6), mask=torch.ones(2, 4, dtype=torch.bool))


def test_lfq_bf16_module_quantizes_in_fp32_like_upstream():
    up, ours = strict_pair(vqp.LFQ, LFQ, dim=12, codebook_size=2**6)
    up.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    x = (torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0)) * 0.1).to(torch.bfloat16)
    assert_same(up(x, return_loss_breakdown=True), ours(x, return_loss_breakdown=True), "bf16",
                rtol=1e-2, atol=1e-2)
