"""Drop-in for vector-quantize-pytorch's ``sim_vq.py`` (``SimVQ``).

SimVQ (Zhu et al. 2024) searches an *implicit* codebook ``C = T(F)``: a frozen random codebook
``F [K, d_f]`` through a learned transform ``T`` (a bias-free Linear by default).  Per forward,
``C`` is computed once (``K`` rows through ``T``), then one fused :func:`vqkernels.quantize` call
does the nearest-code search (no ``N x K`` distance matrix; upstream runs ``torch.cdist``), the
gather, the estimator and both commitment terms: ``loss = commitment_weight·(mse(sg x, q) +
input_to_quantize_commit_loss_weight·mse(x, sg q))`` -- exactly the op's
``mean((sg x − q)²) + β·mean((x − sg q)²)`` with ``β`` = that weight.  The codebook loss gradient
flows from the op into ``C`` and on into ``T`` by autograd.

Estimator: the rotation trick (upstream's default ``rotation_trick=True``; the output's value is
the chosen code, the gradient to ``x`` is ``rotate_to``'s) or straight-through; neither sends a
gradient to the codebook through the output, as upstream.  Indices: the search compares squared
distances; upstream's ``cdist`` compares their square roots, the same order except for fp32
near-ties.  ``state_dict``: ``frozen_codebook`` and ``code_transform.*`` as upstream.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import dispatch
from ... import functional as vqf

__all__ = ["SimVQ"]


def _identity(t):
    return t


def _rotation_frame(x: torch.Tensor, q: torch.Tensor, eps: float = 1e-6):
    # upstream's safe_div clamps both norms at 1e-6; w = normalize(u + q̂) (F.normalize, eps 1e-12)
    x_norm = x.norm(dim=-1, keepdim=True)
    q_norm = q.norm(dim=-1, keepdim=True)
    u = x / x_norm.clamp(min=eps)
    q_hat = q / q_norm.clamp(min=eps)
    w = torch.nn.functional.normalize(u + q_hat, dim=-1)
    s = q_norm / x_norm.clamp(min=eps)
    return u, q_hat, w, s


class _RotationTrick(torch.autograd.Function):
    """Value ``q``; ``grad_x = s·(g − 2w(w·g) + 2u(q̂·g))`` (the transpose of upstream's
    ``rotate_to(x, q)`` Jacobian), O(D) per row, on top of the fused straight-through op while the
    fused backends do not implement ``estimator="rotation"`` (only ``reference`` does so far, and it
    builds the N x K score matrix)."""

    @staticmethod
    def forward(ctx, x, q):
        ctx.save_for_backward(x, q)
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        x, q = ctx.saved_tensors
        u, q_hat, w, s = _rotation_frame(x.float(), q.float())
        g32 = g.float()
        gx = s * (g32 - 2 * w * (w * g32).sum(-1, keepdim=True) + 2 * u * (q_hat * g32).sum(-1, keepdim=True))
        return gx.to(g.dtype), None


def _fused_rotation_available(device: torch.device) -> bool:
    # the op's own rotation estimator when the backend "auto" picks for this device implements it
    plain = dispatch.resolve("auto", device, "quantize")
    return dispatch.resolve("auto", device, "quantize", ("rotation",)) == plain


def quantize_with_estimator(x: torch.Tensor, codebook: torch.Tensor, beta: float, rotation: bool):
    """``vqkernels.quantize`` with the codebook loss always on and the chosen estimator."""
    if not rotation or _fused_rotation_available(x.device):
        estimator = "rotation" if rotation else "ste"
        return vqf.quantize(x, codebook, beta, estimator=estimator, codebook_loss=True)
    q, indices, loss = vqf.quantize(x, codebook, beta, codebook_loss=True)
    if rotation:
        q = _RotationTrick.apply(x, q.detach())
    return q, indices, loss


class SimVQ(nn.Module):
    """vector-quantize-pytorch's ``SimVQ``.  ``forward(x) -> (quantized, indices, commit_loss)``.

    * ``x``: ``[B, *N, dim]`` (``[B, dim, *S]`` with ``channel_first``), float;
    * ``quantized`` like ``x``; ``indices`` ``[B, *N]`` int64; ``commit_loss`` ``[]`` float32.
    """

    def __init__(
        self,
        dim,
        codebook_size,
        codebook_transform=None,
        init_fn=_identity,
        channel_first=False,
        rotation_trick=True,
        input_to_quantize_commit_loss_weight=0.25,
        commitment_weight=1.0,
        frozen_codebook_dim=None,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.channel_first = channel_first
        self.dim = dim
        frozen_codebook_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        codebook = torch.randn(codebook_size, frozen_codebook_dim) * (frozen_codebook_dim**-0.5)
        codebook = init_fn(codebook)
        if codebook_transform is None:
            codebook_transform = nn.Linear(frozen_codebook_dim, dim, bias=False)
        self.code_transform = codebook_transform
        self.register_buffer("frozen_codebook", codebook)
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight

    @property
    def codebook_dim(self) -> int:
        return self.dim

    @property
    def codebook(self) -> torch.Tensor:
        """The implicit codebook ``code_transform(frozen_codebook)``: ``[K, dim]``."""
        return self.code_transform(self.frozen_codebook)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        quantized = self.code_transform(self.frozen_codebook[indices])
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        return quantized

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"SimVQ: x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if self.channel_first:
            x = x.movedim(1, -1)
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"SimVQ: expected x of shape [B, ..., {self.dim}] "
                             f"({'channel first' if self.channel_first else 'channel last'}), got {tuple(x.shape)}")
        implicit_codebook = self.codebook
        quantized, indices, loss = quantize_with_estimator(
            x, implicit_codebook.to(x.dtype), self.input_to_quantize_commit_loss_weight, self.rotation_trick
        )
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        return quantized, indices, loss * self.commitment_weight
