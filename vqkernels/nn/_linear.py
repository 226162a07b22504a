"""``F.linear`` whose weight gradient is formed in the fast GEMM layout for skinny projections.

Autograd's ``AddmmBackward`` forms a Linear's weight gradient from a ``[wide, N] @ [N, narrow]``
product (a transposed, long left operand and a skinny result) for the projections into and out of
a low-dimensional quantizer (FSQ's 256 → 4 → 256, LFQ's 256 → 16 → 256).  The CPU BLAS path runs
that ~30x slower than the same numbers as ``[narrow, N] @ [N, wide]`` (measured, torch 2.13,
1 thread, N = 8192, 256 x 4: 12-15 ms vs 0.4 ms -- most of an FSQ training step).  Here the left
operand is always the narrow side (the result transposed as a view when needed).  Same sums of
products, only the operand order of the GEMM differs, so results agree to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear"]


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            # weight: [out, in]; put the narrow side on the left of the long-N product
            if weight.shape[0] <= weight.shape[1]:
                grad_w = g2.t() @ x2
            else:
                grad_w = (x2.t() @ g2).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an ``nn.Linear`` (through :class:`_Linear` when gradients are needed); any
    other module (``nn.Identity``, a custom projection) is simply called."""
    if (
        type(module) is torch.nn.Linear
        and torch.is_grad_enabled()
        and (module.weight.requires_grad or x.requires_grad)
    ):
        return _Linear.apply(x, module.weight, module.bias)
    return module(x)
