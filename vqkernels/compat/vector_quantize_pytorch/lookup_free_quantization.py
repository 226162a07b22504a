"""Drop-in for vector-quantize-pytorch's ``lookup_free_quantization.py`` (``LFQ``).

Same constructor (every keyword, same defaults), forward ``(x, inv_temperature=100.,
return_loss_breakdown=False, mask=None)``, return ``Return(quantized, indices, entropy_aux_loss)``
(``+ LossBreakdown(per_sample_entropy, batch_entropy, commitment)``), buffers (``mask`` persistent,
``codebook``/``zero`` not) and parameters, so checkpoints load strictly both ways.

The entropy aux loss -- upstream builds an ``N x 2^d`` distance matrix, its softmax and the entropy
terms (several GiB at 2^16 codes) -- is computed by :func:`vqkernels.nn.lfq.lfq_entropy_terms` in
``O(N·2^(d/2))`` memory with the same numbers (upstream's ``log(max(p, 1e-5))`` clamp included);
see that module for the derivation.  Upstream quirks reproduced on purpose: with ``mask`` the
"batch" entropy is averaged per row (so it equals the per-sample entropy), and
``frac_per_sample_entropy < 1`` samples rows with ``torch.randn(num_tokens).argsort()`` from the
global CPU RNG (same seed -> same rows).  One deliberate difference: under torch.distributed,
upstream means to average the ``[C, 2^d]`` mean distribution over ranks but drops the result of the
out-of-place ``dist_nn.all_reduce`` (it uses its local mean divided by the world size); the drop-in
uses the all-rank mean (tests/layers/test_lfq_distributed.py).
"""

from __future__ import annotations

from collections import namedtuple
from contextlib import nullcontext
from math import ceil, log2

import torch
import torch.nn.functional as F
from torch import nn

from ...nn._linear import linear
from ...nn.lfq import bits_to_codes, lfq_entropy_terms
from .finite_scalar_quantization import channel_first_from_rows, channel_last_rows

__all__ = ["LFQ", "Return", "LossBreakdown", "CosineSimLinear"]

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

# upstream's default activation: one shared Identity instance (it has no state)
_IDENTITY = nn.Identity()


def _distributed_mean(t: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    from torch.distributed import nn as dist_nn

    return dist_nn.all_reduce(t) / dist.get_world_size()


class CosineSimLinear(nn.Module):
    """``normalize(x) @ normalize(W, dim=0) · scale`` with ``W: [dim_in, dim_out]`` (upstream's)."""

    def __init__(self, dim_in, dim_out, scale=1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x):
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


class LFQ(nn.Module):
    """vector-quantize-pytorch's ``LFQ``.

    * ``x``: ``[B, N, dim]``, or ``[B, dim, *S]`` for images/videos (``ndim >= 4``) or with
      ``channel_first=True``; ``mask``: ``[B, N]`` bool (tokens used by the losses).
    * returns ``quantized`` like ``x``; ``indices`` ``[B, N]`` (``[B, *S]``) int64, or
      ``[..., num_codebooks]``; ``entropy_aux_loss`` ``[]`` =
      ``entropy_loss_weight·(H_sample − γ·H_batch) + commitment_loss_weight·mse`` in training, 0 in eval.
    """

    def __init__(
        self,
        *,
        dim=None,
        codebook_size=None,
        entropy_loss_weight=0.1,
        commitment_loss_weight=0.0,
        diversity_gamma=1.0,
        straight_through_activation=_IDENTITY,
        num_codebooks=1,
        keep_num_codebooks_dim=None,
        codebook_scale=1.0,
        frac_per_sample_entropy=1.0,
        has_projections=None,
        projection_has_bias=True,
        soft_clamp_input_value=None,
        cosine_sim_project_in=False,
        cosine_sim_project_in_scale=None,
        channel_first=None,
        experimental_softplus_entropy_loss=False,
        entropy_loss_offset=5.0,
        spherical=False,
        force_quantization_f32=True,
        orthogonal_rotation=False,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ: either dim or codebook_size must be given")
        if codebook_size is not None and not log2(codebook_size).is_integer():
            raise ValueError(f"LFQ: codebook_size must be a power of 2 (suggested {2 ** ceil(log2(codebook_size))})")
        codebook_size = codebook_size if codebook_size is not None else 2**dim
        self.codebook_size = codebook_size
        codebook_dim = int(log2(codebook_size))
        codebook_dims = codebook_dim * num_codebooks
        dim = dim if dim is not None else codebook_dims
        has_projections = dim != codebook_dims if has_projections is None else has_projections
        if has_projections:
            if cosine_sim_project_in:
                scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
                self.project_in = CosineSimLinear(dim, codebook_dims, scale=scale)
            else:
                self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.has_projections = has_projections
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("LFQ: num_codebooks > 1 needs keep_num_codebooks_dim=True")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.activation = straight_through_activation
        self.spherical = spherical
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rot = torch.empty(codebook_dim, codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)
        if not 0 < frac_per_sample_entropy <= 1.0:
            raise ValueError(f"LFQ: frac_per_sample_entropy must be in (0, 1], got {frac_per_sample_entropy}")
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.codebook_scale = codebook_scale
        self.commitment_loss_weight = commitment_loss_weight
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError("LFQ: soft_clamp_input_value must be >= codebook_scale")
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = entropy_loss_offset
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        # bit weights, most significant first (a persistent buffer upstream, so in checkpoints)
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.force_quantization_f32 = force_quantization_f32
        # the explicit [2^d, d] codebook is only a convenience buffer (upstream's ``.codebook``);
        # the forward never touches it
        bits = ((torch.arange(codebook_size)[..., None].int() & self.mask) != 0).float()
        self.register_buffer("codebook", self.bits_to_codes(bits).float(), persistent=False)

    def bits_to_codes(self, bits):
        return bits_to_codes(bits, self.codebook_scale)

    @property
    def dtype(self):
        return self.codebook.dtype

    def maybe_l2norm(self, t):
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    @property
    def code_value(self) -> float:
        """Magnitude of every code coordinate: ``codebook_scale`` (``/√d`` when spherical)."""
        return self.codebook_scale / self.codebook_dim**0.5 if self.spherical else self.codebook_scale

    def indices_to_codes(self, indices, project_out=True):
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        bits = ((indices[..., None].int() & self.mask) != 0).to(self.dtype)
        codes = self.maybe_l2norm(self.bits_to_codes(bits))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        if transpose:
            codes = codes.movedim(-1, 1)
        return codes

    def _entropy_rows(self, x: torch.Tensor, mask) -> tuple[torch.Tensor, bool]:
        """The rows the entropy loss sees, as ``[rows, C, d]``, and whether the batch entropy is
        per row (upstream with a mask flattens the codebook dim into the rows, so its "mean over
        rows" is over single rows)."""
        if mask is not None:
            rows = x[mask].reshape(-1, 1, self.codebook_dim)
            per_row = True
        else:
            rows = x.reshape(-1, self.num_codebooks, self.codebook_dim)
            per_row = False
        if self.frac_per_sample_entropy < 1.0:
            num_tokens = rows.shape[0]
            num_sampled = int(num_tokens * self.frac_per_sample_entropy)
            keep = torch.randn(num_tokens).argsort(dim=-1) < num_sampled  # upstream's draw, CPU RNG
            rows = rows[keep.to(rows.device)]
        return rows, per_row

    def forward(self, x, inv_temperature=100.0, return_loss_breakdown=False, mask=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LFQ: x must be a tensor, got {type(x).__name__}")
        transpose = x.ndim >= 4 if self.channel_first is None else self.channel_first
        spatial = None
        if transpose:
            x, spatial = channel_last_rows(x)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"LFQ: expected x of shape [B, N, {self.dim}] (or [B, {self.dim}, ...] channel "
                             f"first), got feature dim {x.shape[-1]} in shape {tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
            raise ValueError(f"LFQ: mask must be a bool tensor of shape {tuple(x.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        x = linear(self.project_in, x)
        if self.soft_clamp_input_value is not None:
            c = self.soft_clamp_input_value
            x = (x / c).tanh() * c
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        x = self.maybe_l2norm(x)
        force_f32 = self.force_quantization_f32
        with torch.autocast("cuda", enabled=False) if force_f32 else nullcontext():
            orig_dtype = x.dtype
            if force_f32:
                x = x.float()
            original_input = x
            positive = x > 0
            quantized = torch.where(positive, self.codebook_scale, -self.codebook_scale).to(x.dtype)
            indices = (positive.int() * self.mask.int()).sum(-1)
            quantized = self.maybe_l2norm(quantized)
            if self.training:
                x = self.activation(x)
                x = x + (quantized - x).detach()
            else:
                x = quantized
            if self.training:
                rows, per_row = self._entropy_rows(original_input, mask)
                per_sample_entropy, codebook_entropy = lfq_entropy_terms(
                    rows, self.code_value, inv_temperature, per_row_batch_entropy=per_row,
                    reduce_mean_probs=_distributed_mean,
                )
                entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
            else:
                entropy_aux_loss = per_sample_entropy = codebook_entropy = self.zero
            if self.training and self.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
            if self.training and self.commitment_loss_weight > 0.0:
                commit_loss = F.mse_loss(original_input, quantized.detach(), reduction="none")
                if mask is not None:
                    commit_loss = commit_loss[mask]
                commit_loss = commit_loss.mean()
            else:
                commit_loss = self.zero
            if force_f32:
                x = x.type(orig_dtype)
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot.t()
        x = linear(self.project_out, x.flatten(-2))
        if transpose:
            x = channel_first_from_rows(x, spatial)
            indices = indices.reshape(indices.shape[0], *spatial, indices.shape[-1])
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        ret = Return(x, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)
