"""Residual VQ on the native layer: stage ``i`` quantizes what stages ``< i`` left over."""

from __future__ import annotations

import torch
from torch import nn

from ._common import _ChannelView, _require_int
from .vector_quantizer import VectorQuantizer

__all__ = ["ResidualVectorQuantizer"]


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ: stage ``i`` quantizes what stages ``< i`` left over.

    Args:
        num_quantizers: number of stages (>= 1).
        dim, codebook_size: as for :class:`VectorQuantizer`.
        codebook_dim: when it differs from ``dim``, one ``project_in``/``project_out`` pair wraps the
            whole residual stack (the stages work in ``codebook_dim``).
        channel_dim: channel dim of ``x`` (handled once, the stages are channel-last).
        **kwargs: every other :class:`VectorQuantizer` keyword, given to each stage.

    Forward: ``quantized, indices, loss = rvq(x, mask=None)``: ``quantized`` like ``x`` (sum of
    the stages' codes, straight-through gradient of ``x``), ``indices: [..., num_quantizers] int64``
    (``x``'s shape without the channel dim, plus the stage dim last), ``loss: [] float32`` the
    sum of the stages' losses.  Each stage's residual is ``r_{i+1} = r_i − q_i`` with ``q_i`` the
    straight-through output, so the gradient of the sum reaches ``x`` exactly once.
    """

    def __init__(
        self,
        num_quantizers: int,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        channel_dim: int = -1,
        **kwargs,
    ) -> None:
        super().__init__()
        self.num_quantizers = _require_int("num_quantizers", num_quantizers, 1)
        self.dim = _require_int("dim", dim, 1)
        cd = self.dim if codebook_dim is None else _require_int("codebook_dim", codebook_dim, 1)
        self.codebook_dim = cd
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
            raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
        self.channel_dim = channel_dim
        self.layers = nn.ModuleList(
            VectorQuantizer(cd, codebook_size, **kwargs) for _ in range(self.num_quantizers)
        )
        if cd != self.dim:
            self.project_in = nn.Linear(self.dim, cd)
            self.project_out = nn.Linear(cd, self.dim)
        else:
            self.project_in = None
            self.project_out = None

    @property
    def codebooks(self) -> torch.Tensor:
        """``[num_quantizers, K, codebook_dim] float32`` (a stacked copy)."""
        return torch.stack([layer.codebook.detach() for layer in self.layers])

    @property
    def perplexity(self) -> torch.Tensor:
        """``[num_quantizers] float32``: each stage's perplexity on the last training batch."""
        return torch.stack([layer.perplexity for layer in self.layers])

    @property
    def codebook_usage(self) -> list[float]:
        return [layer.codebook_usage for layer in self.layers]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        view = _ChannelView(self.dim, self.channel_dim)
        x_cl = view.to_channel_last(x)
        h = self.project_in(x_cl) if self.project_in is not None else x_cl
        residual = h
        out = torch.zeros_like(h)
        all_idx = []
        total = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            q, idx, loss = layer(residual, mask)
            # residual - q (not detached): q's straight-through gradient w.r.t. residual is the
            # identity, so d r_{i+1}/d r_i = 0 and the summed output passes the gradient to x once.
            residual = residual - q
            out = out + q
            all_idx.append(idx)
            total = total + loss
        if self.project_out is not None:
            out = self.project_out(out)
        out = view.from_channel_last(out.to(x.dtype))
        return out, torch.stack(all_idx, dim=-1), total

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices: [..., num_quantizers] int64`` -> ``[..., dim]`` reconstruction (sum of the
        stages' codes, after ``project_out``), channel-last."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dim() < 1 or indices.shape[-1] != self.num_quantizers:
            raise ValueError(
                f"indices must have shape [..., num_quantizers={self.num_quantizers}], "
                f"got {tuple(indices.shape)}"
            )
        codes = None
        for i, layer in enumerate(self.layers):
            c = layer.get_codes_from_indices(indices[..., i])
            codes = c if codes is None else codes + c
        if self.project_out is not None:
            codes = self.project_out(codes)
        return codes
