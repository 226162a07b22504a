"""Drop-in for vector-quantize-pytorch's ``residual_fsq.py`` (``ResidualFSQ``, ``GroupedResidualFSQ``).

Stages of :class:`FSQ` (symmetry-preserving bound) that quantize the scaled residual of the
previous ones, stage ``i`` at scale ``levels^-i``; quantize dropout draws its seed from the global
torch RNG (``randint(0, 10000)``) and the stage from ``random.Random(seed)`` exactly as upstream, so
the same seed drops the same stages.  ``state_dict`` keys as upstream (``project_in.*``,
``project_out.*``, ``layers.{i}.*``; ``rvqs.{g}.…`` for the grouped one).
"""

from __future__ import annotations

import random
from math import ceil

import torch
import torch.nn.functional as F
from torch import nn

from ...nn._linear import linear
from .finite_scalar_quantization import FSQ, channel_first_from_rows, channel_last_rows

__all__ = ["ResidualFSQ", "GroupedResidualFSQ"]


def draw_dropout_seed(device, max_size: int = 10_000) -> int:
    """Upstream's quantize-dropout seed: one ``randint`` from the global RNG (all-reduced when
    distributed, so every rank drops the same stages)."""
    seed = torch.randint(0, max_size, (), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(seed)
    return int(seed.item())


def dropout_stage(seed: int, cutoff: int, num_quantizers: int, multiple_of: int) -> int:
    """Index of the last stage kept under quantize dropout (upstream's draw)."""
    index = random.Random(seed).randrange(cutoff, num_quantizers)
    if multiple_of != 1:
        index = ceil((index + 1) / multiple_of) * multiple_of - 1
    return index


def gather_stage_codes(codebooks: torch.Tensor, indices: torch.Tensor, num_quantizers: int,
                       quantize_dropout: bool) -> torch.Tensor:
    """``codebooks [Q, K, d]``, ``indices [B, *S, q]`` (``-1`` = dropped) -> ``[Q, B, *S, d]``
    (zeros for dropped stages; ``q < Q`` is padded with dropped stages)."""
    lead = indices.shape[:-1]
    flat = indices.reshape(indices.shape[0], -1, indices.shape[-1])
    q = flat.shape[-1]
    if q < num_quantizers:
        if not quantize_dropout:
            raise ValueError("quantize dropout must be on to reconstruct from fewer stages than num_quantizers")
        flat = F.pad(flat, (0, num_quantizers - q), value=-1)
    dropped = flat == -1
    flat = flat.masked_fill(dropped, 0).long()
    stage = torch.arange(num_quantizers, device=flat.device)
    codes = codebooks[stage[:, None, None], flat.permute(2, 0, 1)]  # [Q, B, P, d]
    codes = codes.masked_fill(dropped.permute(2, 0, 1)[..., None], 0.0)
    return codes.reshape(num_quantizers, *lead, codebooks.shape[-1])


class ResidualFSQ(nn.Module):
    """vector-quantize-pytorch's ``ResidualFSQ``.

    ``forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)`` ->
    ``(quantized, indices [..., Q])`` (``+ all_codes [Q, ..., d]`` with ``return_all_codes``).
    """

    def __init__(
        self,
        *,
        levels,
        num_quantizers,
        dim=None,
        is_channel_first=False,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        soft_clamp_input_value=None,
        bound_hard_clamp=True,
        **kwargs,
    ):
        super().__init__()
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.is_channel_first = is_channel_first
        self.num_quantizers = num_quantizers
        self.levels = levels
        levels_tensor = torch.tensor(levels)
        if not bool((levels_tensor > 1).all()):
            raise ValueError(f"levels must all be > 1, got {levels!r}")
        self.layers = nn.ModuleList(
            FSQ(levels=levels, dim=codebook_dim, preserve_symmetry=True, bound_hard_clamp=bound_hard_clamp, **kwargs)
            for _ in range(num_quantizers)
        )
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualFSQ stages must not project (their dim is len(levels))")
        self.codebook_size = self.layers[0].codebook_size
        scales = torch.stack([levels_tensor.float() ** -i for i in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        if quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0")
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError("soft_clamp_input_value cannot be combined with bound_hard_clamp=True")
            soft_clamp_input_value = 1 + (1 / (levels_tensor - 1))
        if isinstance(soft_clamp_input_value, (list, float)):
            soft_clamp_input_value = torch.tensor(soft_clamp_input_value)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = gather_stage_codes(self.codebooks, indices, self.num_quantizers, self.quantize_dropout)
        scales = self.scales.reshape(self.num_quantizers, *([1] * (codes.ndim - 2)), -1)
        return codes * scales

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        spatial = None
        if self.is_channel_first:
            x, spatial = channel_last_rows(x)
        x = linear(self.project_in, x)
        if self.soft_clamp_input_value is not None:
            clamp_value = self.soft_clamp_input_value
            x = (x / clamp_value).tanh() * clamp_value
        quantized_out = 0.0
        residual = x
        all_indices = []
        dropout = self.training and self.quantize_dropout and torch.is_grad_enabled()
        if dropout:
            seed = rand_quantize_dropout_fixed_seed
            if seed is None:
                seed = draw_dropout_seed(x.device)
            last_kept = dropout_stage(seed, self.quantize_dropout_cutoff_index, self.num_quantizers,
                                      self.quantize_dropout_multiple_of)
            null_indices = torch.full(x.shape[:2], -1, device=x.device, dtype=torch.long)
        with torch.autocast("cuda", enabled=False):
            for i, (layer, scale) in enumerate(zip(self.layers, self.scales)):
                if dropout and i > last_kept:
                    all_indices.append(null_indices)
                    continue
                quantized, indices = layer(residual / scale)
                quantized = quantized * scale
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
        quantized_out = linear(self.project_out, quantized_out)
        all_indices = torch.stack(all_indices, dim=-1)
        if self.is_channel_first:
            quantized_out = channel_first_from_rows(quantized_out, spatial)
            all_indices = channel_first_from_rows(all_indices, spatial)
        if not return_all_codes:
            return quantized_out, all_indices
        return quantized_out, all_indices, self.get_codes_from_indices(all_indices)


class GroupedResidualFSQ(nn.Module):
    """vector-quantize-pytorch's ``GroupedResidualFSQ``: ``groups`` independent :class:`ResidualFSQ`
    on equal slices of the feature dim.  ``forward(x, return_all_codes=False)`` ->
    ``(quantized, indices [G, ..., Q][, all_codes [G, Q, ..., d]])``."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualFSQ(dim=dim // groups, **kwargs) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices):
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices):
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)], dim=self.split_dim)

    def forward(self, x, return_all_codes=False):
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"GroupedResidualFSQ: expected {self.dim} features in dim {self.split_dim}, "
                             f"got shape {tuple(x.shape)}")
        chunks = x.chunk(self.groups, dim=self.split_dim)
        seed = draw_dropout_seed(x.device) if self.training else None
        outs = [rvq(c, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
                for rvq, c in zip(self.rvqs, chunks)]
        quantized, all_indices, *maybe_codes = zip(*outs)
        # as upstream: the per-group all_codes come back as a tuple (not stacked)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), *maybe_codes)
