"""Drop-in for vector-quantize-pytorch's ``finite_scalar_quantization.py`` (``FSQ``).

Same constructor (every keyword, same defaults), forward layouts (``(B, N, D)``, channel-first
images/videos ``(B, D, ...)`` or ``channel_first=True``), return value ``(out, indices)`` and
non-persistent buffers, so ``state_dict`` keys (``project_in.*``, ``project_out.*``,
``orthogonal_rot``) load strictly both ways.  The bound-and-round step is one
:func:`vqkernels.nn.fsq.fsq_quantize` (value in one pass, elementwise backward); upstream's
``noise_dropout`` draws from the global torch RNG in the same order, so a seed gives the same noise.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ...nn._linear import linear
from ...nn.fsq import (
    bound_constants,
    codes_to_indices,
    fsq_quantize,
    indices_to_level_indices,
    level_indices_to_codes,
)

__all__ = ["FSQ"]


def channel_last_rows(z: torch.Tensor):
    """``[B, D, *S]`` -> (``[B, prod(S), D]``, S)."""
    spatial = z.shape[2:]
    return z.movedim(1, -1).reshape(z.shape[0], -1, z.shape[1]), spatial


def channel_first_from_rows(t: torch.Tensor, spatial) -> torch.Tensor:
    """``[B, prod(S), *F]`` -> ``[B, *F..., *S]`` with the last feature dim moved to dim 1."""
    t = t.reshape(t.shape[0], *spatial, *t.shape[2:])
    return t.movedim(-1, 1)


class FSQ(nn.Module):
    """vector-quantize-pytorch's ``FSQ``.  ``forward(z) -> (out, indices)``.

    * ``z``: ``[B, N, dim]``; ``[B, dim, *S]`` for images/videos (``ndim >= 4``) or with
      ``channel_first=True``.
    * ``out``: like ``z``; ``indices``: ``[B, N]`` (``[B, *S]``) int32, or ``[..., num_codebooks]``
      when ``keep_num_codebooks_dim``; ``None`` with ``return_indices=False``.
    """

    def __init__(
        self,
        levels,
        dim=None,
        num_codebooks=1,
        keep_num_codebooks_dim=None,
        scale=None,
        allowed_dtypes=(torch.float32, torch.float64),
        channel_first=False,
        projection_has_bias=True,
        return_indices=True,
        force_quantization_f32=True,
        preserve_symmetry=False,
        noise_dropout=0.0,
        bound_hard_clamp=False,
        orthogonal_rotation=False,
    ):
        super().__init__()
        levels = list(levels)
        if not levels or any((not isinstance(v, int)) or v < 2 for v in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        if any(v == 2 for v in levels) and not preserve_symmetry:
            raise ValueError("levels == 2 needs preserve_symmetry=True (or use a greater level)")
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True")
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0, dtype=torch.int32)
        self.register_buffer("_basis", basis, persistent=False)
        self.scale = scale
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = dim if dim is not None else self.effective_codebook_dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.return_indices = return_indices
        if return_indices:
            self.codebook_size = int(torch.tensor(levels).prod().item())
            codebook = self._indices_to_codes(torch.arange(self.codebook_size))
            self.register_buffer("implicit_codebook", codebook, persistent=False)
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = force_quantization_f32
        self.bound_hard_clamp = bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rot = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)

    # ----------------------------------------------------------------------- the quantizer

    def _consts(self, z: torch.Tensor, hard_clamp: bool, eps: float = 1e-3):
        # the bound's per-level constants, cached per (dtype, device, clamp): recomputing them is
        # five tiny kernels per call, as much as the step itself at typical sizes
        key = (z.dtype, z.device, hard_clamp, eps)
        cache = self.__dict__.setdefault("_consts_cache", {})
        if key not in cache:
            cache[key] = bound_constants(self._levels, hard_clamp, z.dtype, eps)
        return cache[key]

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Bound and round ``z [..., codebook_dim]`` to the grid (straight-through gradient)."""
        return self.bound(z, hard_clamp=self.bound_hard_clamp) if not self.preserve_symmetry \
            else self.symmetry_preserving_bound(z, hard_clamp=self.bound_hard_clamp)

    def bound(self, z, eps=1e-3, hard_clamp=False):
        return fsq_quantize(z, self._levels, False, hard_clamp, self._consts(z, hard_clamp, eps))

    def symmetry_preserving_bound(self, z, hard_clamp=False):
        return fsq_quantize(z, self._levels, True, hard_clamp, self._consts(z, hard_clamp))

    def maybe_apply_noise(self, bounded_z: torch.Tensor) -> torch.Tensor:
        if not self.training or self.noise_dropout == 0.0:
            return bounded_z
        # same draws in the same order as upstream (bernoulli mask, then uniform offsets)
        offset_mask = torch.full_like(bounded_z, self.noise_dropout).bernoulli_().bool()
        offset = torch.rand_like(bounded_z) - 0.5
        return torch.where(offset_mask, bounded_z + offset, bounded_z).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------- index <-> code

    def _indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return level_indices_to_codes(self.indices_to_level_indices(indices), self._levels, self.preserve_symmetry)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return indices_to_level_indices(indices, self._levels, self._basis)

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes_to_indices: expected last dim {self.codebook_dim}, got {tuple(zhat.shape)}")
        return codes_to_indices(zhat, self._levels, self._basis, self.preserve_symmetry)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        if indices is None:
            raise ValueError("indices_to_codes: indices must be a tensor")
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        codes = self._indices_to_codes(indices)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        codes = self.project_out(codes)
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    # ----------------------------------------------------------------------- forward

    def forward(self, z: torch.Tensor):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"FSQ: z must be a tensor, got {type(z).__name__}")
        channel_first = z.ndim >= 4 or self.channel_first
        if z.ndim < 3 and not (z.ndim == 2 and not channel_first):
            raise ValueError(f"FSQ: expected z of shape [B, N, {self.dim}] or [B, {self.dim}, ...], "
                             f"got {tuple(z.shape)}")
        spatial = None
        if channel_first:
            z, spatial = channel_last_rows(z)
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ: expected dimension of {self.dim} but found dimension of {z.shape[-1]}")
        z = linear(self.project_in, z)
        z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot
        force_f32 = self.force_quantization_f32
        with torch.autocast("cuda", enabled=False) if force_f32 else nullcontext():
            orig_dtype = z.dtype
            if force_f32 and orig_dtype not in self.allowed_dtypes:
                z = z.float()
            codes = self.quantize(z)
            indices = self.codes_to_indices(codes) if self.return_indices else None
            codes = self.maybe_apply_noise(codes)
            if self.orthogonal_rotation:
                codes = codes @ self.orthogonal_rot.t()
            codes = codes.flatten(-2).to(orig_dtype)
        out = linear(self.project_out, codes)
        if channel_first:
            out = channel_first_from_rows(out, spatial)
            if indices is not None:
                indices = indices.reshape(indices.shape[0], *spatial, indices.shape[-1])
        if not self.keep_num_codebooks_dim and indices is not None:
            indices = indices.squeeze(-1)
        return out, indices
