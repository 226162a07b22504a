"""vqkernels.nn._linear.linear: same values and gradients as ``nn.Linear`` (the weight gradient
is only formed with the GEMM operands in the other order)."""

from __future__ import annotations

import pytest
import torch

from vqkernels.nn._linear import linear


@pytest.mark.parametrize("d_in,d_out,bias,shape", [(4, 256, True, (3, 50)), (256, 4, True, (70,)),
                                                    (16, 9, False, (2, 3, 5)), (7, 7, True, (0,))])
def test_linear_matches_nn_linear(d_in, d_out, bias, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(d_in, d_out, bias=bias)
    x = torch.randn(*shape, d_in, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = linear(layer, x), layer(x_ref)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x_ref, *layer.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_linear_passes_other_modules_through():
    ident = torch.nn.Identity()
    x = torch.randn(3, 4)
    assert linear(ident, x) is x
