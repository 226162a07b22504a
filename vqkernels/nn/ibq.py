"""``IndexBackpropQuantizer``: index backpropagation quantization (IBQ, Shi et al. 2024).

IBQ writes the quantized vector as ``z_q = (hard − sg(soft) + soft) · E`` with
``soft = softmax(z·Eᵀ / τ)`` and ``hard = one_hot(argmax_k z·e_k)``: the forward value is the hard
code, and the gradient flows through the soft assignment to *every* code (not only the chosen
one), which keeps large codebooks (IBQ trains 2^18 codes) fully used.  Public implementations
build ``soft`` as an N x K matrix (and several copies for autograd); here it is the streamed
``soft_quantize`` op (attention with keys = values = codebook, FlashAttention-style recompute in
the backward), which also returns the argmax from the same pass, so nothing of size N x K exists.

Equivalence with the paper's formula (tested against it in ``tests/layers/test_ibq.py``):
``z_q = E[idx] + (S − sg(S))`` with ``S = soft_quantize(z, keys=E, values=sg(E))``.  Its value is
exactly ``E[idx]``; the gradient of ``z`` and of the keys ``E`` is the one through ``soft``, and
``E`` gets ``hardᵀ·∂L/∂z_q`` through the gather, exactly as the one-hot product does.

Losses (``loss: [] float32``): ``commitment_weight·mean((z − sg(E[idx]))²) +
codebook_weight·mean((sg(z) − E[idx])²)`` and, with ``entropy_loss_weight > 0``, the entropy loss
``sample_weight·mean H(p_i) − batch_weight·H(mean p)`` (:func:`codebook_entropy_loss`, logits
``z·e/τ_entropy``), all over the unmasked rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import dispatch
from .. import functional as vqf
from ._common import _ChannelView, _is_compiling, _require_float, _require_int
from ._entropy import codebook_entropy_loss

__all__ = ["IndexBackpropQuantizer"]


class IndexBackpropQuantizer(nn.Module):
    """Index backpropagation quantizer (learnable codebook; dot-product logits as in IBQ).

    Args:
        dim: feature size D (the channel dim of the input).
        codebook_size: number of codes K.
        temperature: τ of the soft assignment ``softmax(z·Eᵀ/τ)`` (IBQ: 1.0).
        commitment_weight: β of ``mean((z − sg(q))²)``.
        codebook_weight: weight of ``mean((sg(z) − q)²)``.
        entropy_loss_weight: weight of the entropy loss (0 disables it; it is computed only in
            training).  entropy_temperature: its τ (0.01 as in LlamaGen / IBQ).
        entropy_sample_weight, entropy_batch_weight: its two terms' weights.
        channel_dim: the channel dim of ``x`` (``-1`` for ``[B, ..., D]``, ``1`` for NCHW).
        backend: op backend.  check_inputs: validate values (NaN/Inf) in eager mode.

    Forward: ``quantized, indices, loss = ibq(x, mask=None)`` with ``x: [B, ..., D]`` (or channel
    first), ``mask`` optional bool of x's shape without the channel dim (``False`` = padding, left
    out of every loss), ``quantized`` of x's shape and dtype, ``indices`` int64 of x's shape
    without the channel dim, ``loss`` ``[] float32``.  The codebook is an fp32 ``nn.Parameter``
    ``[K, D]`` initialized uniformly in ``[−1/K, 1/K]`` (as IBQ).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        temperature: float = 1.0,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        entropy_loss_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        entropy_sample_weight: float = 1.0,
        entropy_batch_weight: float = 1.0,
        channel_dim: int = -1,
        backend: str = "auto",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.dim = _require_int("dim", dim, 1)
        self.codebook_size = _require_int("codebook_size", codebook_size, 1)
        self.temperature = _require_float("temperature", temperature, 0.0, lo_open=True)
        self.commitment_weight = _require_float("commitment_weight", commitment_weight, 0.0)
        self.codebook_weight = _require_float("codebook_weight", codebook_weight, 0.0)
        self.entropy_loss_weight = _require_float("entropy_loss_weight", entropy_loss_weight, 0.0)
        self.entropy_temperature = _require_float(
            "entropy_temperature", entropy_temperature, 0.0, lo_open=True
        )
        self.entropy_sample_weight = _require_float("entropy_sample_weight", entropy_sample_weight)
        self.entropy_batch_weight = _require_float("entropy_batch_weight", entropy_batch_weight)
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
            raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
        self.channel_dim = channel_dim
        self.backend = dispatch.validate_backend(backend)
        self.check_inputs = bool(check_inputs)
        k = self.codebook_size
        self.codebook = nn.Parameter(torch.empty(k, self.dim).uniform_(-1.0 / k, 1.0 / k))

    def extra_repr(self) -> str:
        parts = [
            f"dim={self.dim}",
            f"codebook_size={self.codebook_size}",
            f"temperature={self.temperature}",
            f"commitment_weight={self.commitment_weight}",
            f"codebook_weight={self.codebook_weight}",
        ]
        if self.entropy_loss_weight > 0:
            parts.append(
                f"entropy_loss_weight={self.entropy_loss_weight} "
                f"(tau={self.entropy_temperature}, sample={self.entropy_sample_weight}, "
                f"batch={self.entropy_batch_weight})"
            )
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        view = _ChannelView(self.dim, self.channel_dim)
        x_cl = view.to_channel_last(x)
        lead = x_cl.shape[:-1]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool torch.Tensor")
            if tuple(mask.shape) != tuple(lead):
                raise ValueError(
                    f"mask must have x's shape without the channel dim {list(lead)}, "
                    f"got {list(mask.shape)}"
                )
            if mask.device != x.device:
                raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        check = self.check_inputs and not _is_compiling()
        with torch.autocast(x.device.type, enabled=False):
            flat = x_cl.reshape(-1, self.dim).float()
            cb = self.codebook
            # Values detached: the codebook's value gradient comes from the hard gather below
            # (hardᵀ·g, as the one-hot product of the paper), its assignment gradient from keys.
            soft, idx = vqf.soft_quantize(
                flat, cb, self.temperature, "dot", values=cb.detach(), return_indices=True,
                backend=self.backend, check_inputs=check,
            )  # fmt: skip
            hard = torch.index_select(cb, 0, idx)
            # Value exactly hard (soft − soft is 0 exactly); gradient of soft to x and the keys.
            q = hard + (soft - soft.detach())
            loss = self._losses(flat, hard, mask, check)
        q = view.from_channel_last(q.reshape(x_cl.shape).to(x.dtype))
        return q, idx.reshape(lead), loss

    def _losses(self, flat, hard, mask, check) -> torch.Tensor:
        sq_commit = (flat - hard.detach()) ** 2
        sq_codebook = (flat.detach() - hard) ** 2
        if mask is None:
            denom = max(flat.numel(), 1)
            commit, cbl = sq_commit.sum() / denom, sq_codebook.sum() / denom
        else:
            w = mask.reshape(-1, 1).to(torch.float32)
            denom = (w.sum() * self.dim).clamp_min(1.0)
            commit, cbl = (sq_commit * w).sum() / denom, (sq_codebook * w).sum() / denom
        loss = self.commitment_weight * commit + self.codebook_weight * cbl
        if self.training and self.entropy_loss_weight > 0:
            ent = codebook_entropy_loss(
                flat, self.codebook, self.entropy_temperature, "dot",
                None if mask is None else mask.reshape(-1),
                sample_weight=self.entropy_sample_weight, batch_weight=self.entropy_batch_weight,
                backend=self.backend, check_inputs=False,
            )  # fmt: skip
            loss = loss + self.entropy_loss_weight * ent
        return loss
