"""Drop-in for vector-quantize-pytorch's ``residual_lfq.py`` (``ResidualLFQ``, ``GroupedResidualLFQ``).

Stages of :class:`LFQ` at code scale ``2^-i`` (and soft clamp halved per stage) that quantize the
residual of the previous ones; quantize dropout as upstream (seed from the global RNG,
``random.Random(seed)`` picks the last kept stage).  Each stage's entropy loss is the streamed one
of :mod:`vqkernels.nn.lfq`.  ``state_dict`` keys as upstream.
"""

from __future__ import annotations

from math import log2

import torch
from torch import nn

from ...nn._linear import linear
from .lookup_free_quantization import LFQ
from .residual_fsq import draw_dropout_seed, dropout_stage, gather_stage_codes

__all__ = ["ResidualLFQ", "GroupedResidualLFQ"]


class ResidualLFQ(nn.Module):
    """vector-quantize-pytorch's ``ResidualLFQ``.  ``forward(x, mask=None, return_all_codes=False,
    rand_quantize_dropout_fixed_seed=None)`` -> ``(quantized, indices [..., Q], losses [Q])``
    (``+ all_codes [Q, ..., d]``)."""

    def __init__(
        self,
        *,
        dim,
        num_quantizers,
        codebook_size,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        soft_clamp_input_value=None,
        **kwargs,
    ):
        super().__init__()
        codebook_dim = int(log2(codebook_size))
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.num_quantizers = num_quantizers
        layers = []
        for i in range(num_quantizers):
            layers.append(LFQ(dim=codebook_dim, codebook_scale=2.0**-i, soft_clamp_input_value=soft_clamp_input_value,
                              **kwargs))
            if soft_clamp_input_value is not None:
                soft_clamp_input_value *= 0.5
        self.layers = nn.ModuleList(layers)
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualLFQ stages must not project (their dim is log2(codebook_size))")
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        if quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0")
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices):
        return gather_stage_codes(self.codebooks, indices, self.num_quantizers, self.quantize_dropout)

    def get_output_from_indices(self, indices):
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def forward(self, x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        x = linear(self.project_in, x)
        quantized_out = 0.0
        residual = x
        all_losses, all_indices = [], []
        dropout = self.training and self.quantize_dropout and torch.is_grad_enabled()
        if dropout:
            seed = rand_quantize_dropout_fixed_seed
            if seed is None:
                seed = draw_dropout_seed(x.device)
            last_kept = dropout_stage(seed, self.quantize_dropout_cutoff_index, self.num_quantizers,
                                      self.quantize_dropout_multiple_of)
            null_indices = torch.full(x.shape[:2], -1, device=x.device, dtype=torch.long)
            null_loss = torch.tensor(0.0, device=x.device, dtype=x.dtype)
        with torch.autocast("cuda", enabled=False):
            for i, layer in enumerate(self.layers):
                if dropout and i > last_kept:
                    all_indices.append(null_indices)
                    all_losses.append(null_loss)
                    continue
                quantized, indices, loss = layer(residual, mask=mask)
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
                all_losses.append(loss)
        quantized_out = linear(self.project_out, quantized_out)
        ret = (quantized_out, torch.stack(all_indices, dim=-1), torch.stack(all_losses, dim=-1))
        if not return_all_codes:
            return ret
        return (*ret, self.get_codes_from_indices(ret[1]))


class GroupedResidualLFQ(nn.Module):
    """vector-quantize-pytorch's ``GroupedResidualLFQ``: ``groups`` :class:`ResidualLFQ` on equal
    slices of the feature dim -> ``(quantized, indices [G, ...], losses [G, Q][, all_codes])``."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualLFQ(dim=dim // groups, **kwargs) for _ in range(groups))

    @property
    def codebooks(self):
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self):
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices):
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices):
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)], dim=self.split_dim)

    def forward(self, x, mask=None, return_all_codes=False):
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"GroupedResidualLFQ: expected {self.dim} features in dim {self.split_dim}, "
                             f"got shape {tuple(x.shape)}")
        chunks = x.chunk(self.groups, dim=self.split_dim)
        seed = draw_dropout_seed(x.device) if self.training else None
        outs = [rvq(c, mask=mask, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
                for rvq, c in zip(self.rvqs, chunks)]
        quantized, all_indices, losses, *maybe_codes = zip(*outs)
        # as upstream: the per-group all_codes come back as a tuple (not stacked)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), torch.stack(losses), *maybe_codes)
