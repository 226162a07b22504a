"""Drop-in for vector-quantize-pytorch's ``residual_sim_vq.py`` (``ResidualSimVQ``).

Stages of :class:`SimVQ` quantizing the residual of the previous ones (each: its implicit codebook
computed once per forward, then one fused :func:`vqkernels.quantize`); quantize dropout as upstream
(seed from the global RNG, ``random.Random(seed)`` picks the last kept stage).  ``state_dict`` keys
as upstream (``layers.{i}.frozen_codebook``, ``layers.{i}.code_transform.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from .residual_fsq import draw_dropout_seed, dropout_stage, gather_stage_codes
from .sim_vq import SimVQ

__all__ = ["ResidualSimVQ"]


class ResidualSimVQ(nn.Module):
    """vector-quantize-pytorch's ``ResidualSimVQ``.  ``forward(x, return_all_codes=False,
    rand_quantize_dropout_fixed_seed=None)`` -> ``(quantized, indices [..., Q], losses [Q])``
    (``+ all_codes [Q, B, ..., dim]``, channel first with ``channel_first``)."""

    def __init__(
        self,
        *,
        dim,
        num_quantizers,
        codebook_size,
        heads=1,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        channel_first=False,
        rotation_trick=True,
        **sim_vq_kwargs,
    ):
        super().__init__()
        if heads != 1:
            raise ValueError("ResidualSimVQ: heads must be 1 (residual VQ is not compatible with multi-headed codes)")
        self.channel_first = channel_first
        self.num_quantizers = num_quantizers
        self.layers = nn.ModuleList(
            SimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick, channel_first=channel_first,
                  **sim_vq_kwargs)
            for _ in range(num_quantizers)
        )
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        if quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0")
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    @property
    def codebook_size(self):
        return self.layers[0].codebook_size

    @property
    def codebook_dim(self):
        return self.layers[0].codebook_dim

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices):
        codes = gather_stage_codes(self.codebooks, indices, self.num_quantizers, self.quantize_dropout)
        if self.channel_first:
            codes = codes.movedim(-1, 2)
        return codes

    def get_output_from_indices(self, indices):
        return self.get_codes_from_indices(indices).sum(0)

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        quantized_out = 0.0
        residual = x
        all_losses, all_indices = [], []
        dropout = self.training and self.quantize_dropout
        if dropout:
            seed = rand_quantize_dropout_fixed_seed
            if seed is None:
                seed = draw_dropout_seed(x.device)
            last_kept = dropout_stage(seed, self.quantize_dropout_cutoff_index, self.num_quantizers,
                                      self.quantize_dropout_multiple_of)
            null_shape = (x.shape[0], *x.shape[2:]) if self.channel_first else tuple(x.shape[:2])
            null_indices = torch.full(null_shape, -1, device=x.device, dtype=torch.long)
            null_loss = torch.zeros((), device=x.device, dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            if dropout and i > last_kept:
                all_indices.append(null_indices)
                all_losses.append(null_loss)
                continue
            quantized, indices, loss = layer(residual)
            residual = residual - quantized.detach()
            quantized_out = quantized_out + quantized
            all_indices.append(indices)
            all_losses.append(loss)
        ret = (quantized_out, torch.stack(all_indices, dim=-1), torch.stack(all_losses, dim=-1))
        if not return_all_codes:
            return ret
        return (*ret, self.get_codes_from_indices(ret[1]))
