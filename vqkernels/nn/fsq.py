"""Finite scalar quantization (FSQ, Mentzer et al. 2023) as one elementwise step.

FSQ bounds every dimension of ``z`` to a few levels and rounds with a straight-through gradient.
Written as upstream writes it (vector-quantize-pytorch), the step is ~8 elementwise kernels in the
forward (add shift, tanh, scale, offset, round, subtract, detach-add, divide), each output kept for
the backward.  :func:`fsq_quantize` computes the code value in one pass under ``no_grad`` and keeps
only the input; the backward is the derivative of the bound (``tanh'`` times the level scale),
because rounding passes the gradient straight through.

Two bounds (``L`` = levels of a dimension, ``h = L // 2``):

* default: ``round(tanh(z + s)·(L−1)(1+ε)/2 − o) / h`` with ``o = 0.5`` for even ``L`` (else 0)
  and ``s = atanh(o / ((L−1)(1+ε)/2))`` so even level counts stay centred; ``ε = 1e-3``;
* symmetry-preserving (Zhang et al. 2024, §3.2): ``2/(L−1)·floor((L−1)(tanh z + 1)/2 + 0.5) − 1``.

``hard_clamp`` replaces ``tanh`` by ``clamp(·, −1, 1)`` (and the shift by ``o/((L−1)(1+ε)/2)``
itself, as upstream drops the ``atanh``).  Numerics: the value is computed in the dtype of ``z``
(the callers pass fp32); codes are exact multiples of ``1/h`` (or ``2/(L−1)``) up to one rounding of
the final division, which is what upstream's ``z + (round(z) − z).detach()`` also gives to an ulp.
"""

from __future__ import annotations

import torch

__all__ = ["fsq_quantize", "bound_constants", "codes_to_indices", "indices_to_level_indices", "level_indices_to_codes"]


def bound_constants(levels: torch.Tensor, hard_clamp: bool, dtype: torch.dtype, eps: float = 1e-3):
    """``(half_l, offset, shift, half_width, lm1)`` as ``[d]`` tensors of ``dtype`` (computed in
    fp32 as upstream, then cast): callers cache them, they only depend on the levels."""
    levels_f = levels.to(torch.float32)
    half_l = (levels_f - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(levels.device)
    shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
    half_width = (levels // 2).to(torch.float32)
    lm1 = levels_f - 1
    return tuple(c.to(dtype) for c in (half_l, offset, shift, half_width, lm1))


class _FSQStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, consts, preserve_symmetry, hard_clamp):
        half_l, offset, shift, half_width, lm1 = consts
        u = z if preserve_symmetry else z + shift
        t = u.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(u)
        if preserve_symmetry:
            codes = (2.0 / lm1) * torch.floor(lm1 * (t + 1) / 2.0 + 0.5) - 1.0
            scale = None
        else:
            codes = torch.round(t * half_l - offset) / half_width
            scale = half_l / half_width
        # the backward needs tanh'(u) = 1 − t² (or the clamp's 0/1 mask): keep t, not z
        ctx.save_for_backward(u if hard_clamp else t)
        ctx.scale = scale
        ctx.hard_clamp = hard_clamp
        return codes

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        if ctx.hard_clamp:
            # clamp's gradient is 1 inside [−1, 1] (both ends included, as torch.clamp's)
            dt = ((saved >= -1.0) & (saved <= 1.0)).to(grad.dtype)
        else:
            dt = 1.0 - saved * saved
        # symmetry-preserving: d/dz [2/(L−1)·((L−1)(t+1)/2 + 0.5) − 1] = t'; default: t'·half_l/h
        g = grad * dt
        if ctx.scale is not None:
            g = g * ctx.scale
        return g, None, None, None


def fsq_quantize(z: torch.Tensor, levels: torch.Tensor, preserve_symmetry: bool = False,
                 hard_clamp: bool = False, consts=None) -> torch.Tensor:
    """Bound and round ``z`` to the FSQ grid with a straight-through gradient.

    Args:
        z: ``[..., d]`` float.
        levels: ``[d]`` int (number of levels per dimension, each >= 2).
        consts: ``bound_constants(levels, hard_clamp, z.dtype)`` if the caller caches them.
    Returns:
        ``codes: [..., d]`` (dtype of ``z``) in ``[−1, 1]``; gradient ``∂bound/∂z`` elementwise.
    """
    if consts is None:
        consts = bound_constants(levels, hard_clamp, z.dtype)
    return _FSQStep.apply(z, consts, bool(preserve_symmetry), bool(hard_clamp))


def codes_to_indices(codes: torch.Tensor, levels: torch.Tensor, basis: torch.Tensor,
                     preserve_symmetry: bool = False) -> torch.Tensor:
    """``[..., d]`` codes on the grid -> ``[...] int32`` mixed-radix index (first dim = least
    significant digit, as upstream)."""
    if preserve_symmetry:
        digits = (codes + 1.0) / (2.0 / (levels - 1))
    else:
        half_width = levels // 2
        digits = codes * half_width + half_width
    return (digits * basis).sum(dim=-1).round().to(torch.int32)


def indices_to_level_indices(indices: torch.Tensor, levels: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``[...]`` int -> ``[..., d]`` per-dimension level index."""
    return (indices[..., None] // basis) % levels


def level_indices_to_codes(level_indices: torch.Tensor, levels: torch.Tensor,
                           preserve_symmetry: bool = False) -> torch.Tensor:
    """``[..., d]`` level index -> code value in ``[−1, 1]`` (float32 unless given floats)."""
    if preserve_symmetry:
        return level_indices * (2.0 / (levels - 1)) - 1.0
    half_width = levels // 2
    return (level_indices - half_width) / half_width
