"""Index and mask layouts of the ``VectorQuantize`` drop-in: between LR's user-facing layouts
(indices ``[b, ...]`` or ``[b, ..., heads]``) and the codebook module's rows (``[H, b, n]`` for
separate codebooks per head, ``[1, (b h), n]`` for heads sharing one codebook, ``[1, b, n]`` for
one head), as LR's einops patterns lay them out.  Pure reshapes/permutes, no arithmetic."""

from __future__ import annotations

import torch


def sequence_mask(x: torch.Tensor, mask, lens):
    """LR's ``mask=``/``lens=`` and 2-D input rules, shared by the layer and its top-k path:
    ``lens`` becomes the ``[B, N]`` mask ``arange(N) < lens``; a ``[B, D]`` input becomes
    ``[B, 1, D]`` (and takes no mask).  Returns ``(x, mask, only_one)``."""
    if mask is not None and lens is not None:
        raise ValueError("pass either mask or lens, not both")
    if lens is not None:
        mask = torch.arange(x.shape[1], device=x.device) < lens.to(x.device)[:, None]
    only_one = x.ndim == 2
    if only_one:
        if mask is not None:
            raise ValueError("mask/lens need a sequence dim; x has shape [B, D]")
        x = x.unsqueeze(1)
    return x, mask, only_one


def head_mask(mask: torch.Tensor, like: torch.Tensor, heads: int, separate: bool) -> torch.Tensor:
    """LR's loss mask: ``[b, n]`` bool -> the element layout of ``like`` (``[b, n, d]``,
    ``[h, b, n, d]`` or ``[1, (b h), n, d]``), broadcast over d."""
    if like.ndim == 3:
        m = mask
    elif separate:
        m = mask.unsqueeze(0).expand(like.shape[0], *mask.shape)
    else:
        m = mask.repeat_interleave(heads, dim=0).unsqueeze(0)
    return m.unsqueeze(-1).expand(like.shape)


def indices_from_internal(embed_ind: torch.Tensor, spatial, only_one: bool, heads: int,
                          separate: bool) -> torch.Tensor:
    """The codebook's ``[H, b, n]`` / ``[1, (b h), n]`` / ``[b, n]`` indices -> LR's output layout
    (``[b, n(, h)]``, spatial dims restored, the token dim dropped for 2-D inputs)."""
    if heads > 1:
        if separate:
            embed_ind = embed_ind.permute(1, 2, 0)  # h b n -> b n h
        else:
            bh, n = embed_ind.shape[-2:]
            embed_ind = embed_ind.reshape(bh // heads, heads, n).permute(0, 2, 1)
    if spatial is not None:
        embed_ind = embed_ind.reshape(embed_ind.shape[0], *spatial, *embed_ind.shape[2:])
    if only_one:
        embed_ind = embed_ind.squeeze(1)
    return embed_ind


def indices_to_internal(indices: torch.Tensor, spatial, only_one: bool, heads: int) -> torch.Tensor:
    """LR-layout indices (``[b, ...]`` or ``[b, ..., h]``) -> ``[b, n]`` / ``[b, n, h]``."""
    if only_one:
        indices = indices.unsqueeze(1)
    if spatial is not None:
        keep = 1 if heads > 1 else 0
        indices = indices.reshape(indices.shape[0], -1, *indices.shape[indices.ndim - keep:])
    return indices


def codes_to_flat(codes: torch.Tensor, num_codebooks: int, heads: int, separate: bool) -> torch.Tensor:
    """``[b, n]`` / ``[b, n, h]`` -> ``[num_codebooks, N]`` in the codebook module's row order."""
    if heads == 1:
        return codes.reshape(1, -1)
    if separate:
        return codes.permute(2, 0, 1).reshape(num_codebooks, -1)  # h (b n)
    return codes.permute(0, 2, 1).reshape(1, -1)  # 1 (b h n)
