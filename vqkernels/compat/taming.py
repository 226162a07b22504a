"""Drop-in for taming-transformers' ``VectorQuantizer2`` (``taming/modules/vqvae/quantize.py``),
on vqkernels' fused ``quantize``: ``VectorQuantizer2(n_e, e_dim, beta, remap=None,
unknown_index="random", sane_index_shape=False, legacy=True)`` returning
``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as vqf
from ..nn._common import _counts_from_indices

__all__ = ["VectorQuantizer2"]


class VectorQuantizer2(nn.Module):
    """taming-transformers' ``VectorQuantizer2`` (the VQGAN quantizer) on the fused ``quantize``.

    Args:
        n_e: number of codes K.  e_dim: code size D.  beta: commitment weight.
        remap, unknown_index: index remapping to a used subset; ``remap`` is not supported
            (``NotImplementedError``).
        sane_index_shape: return indices as ``[B, H, W]`` instead of flat ``[B·H·W]``.
        legacy: ``True`` reproduces the original β placement
            ``loss = mean((sg(z_q) − z)²) + β·mean((z_q − sg(z))²)``; ``False`` gives
            ``β·mean((sg(z_q) − z)²) + mean((z_q − sg(z))²)``.
        return_min_encodings: build the ``[B·H·W, K]`` one-hot ``min_encodings`` (upstream returns
            ``None`` here; kept off by default because it is an N x K matrix).

    ``forward(z)`` with ``z: [B, D, H, W]`` returns ``(z_q, loss, (perplexity, min_encodings,
    min_encoding_indices))``: ``z_q`` like ``z`` (straight-through), ``loss: [] float32``,
    ``perplexity: [] float32`` (``exp(−Σ p log(p + 1e-10))`` of the batch's code frequencies;
    upstream returns ``None``), ``min_encodings`` ``None`` (see above), indices int64.
    Everything is computed in fp32; ``z_q`` is returned in ``z``'s dtype.
    """

    def __init__(
        self,
        n_e,
        e_dim,
        beta,
        remap=None,
        unknown_index="random",
        sane_index_shape=False,
        legacy=True,
        *,
        return_min_encodings: bool = False,
        backend: str = "auto",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        if remap is not None:
            raise NotImplementedError(
                "vqkernels.compat.VectorQuantizer2 does not support remap (index remapping)"
            )
        del unknown_index  # only meaningful with remap
        if not isinstance(n_e, int) or isinstance(n_e, bool) or n_e < 1:
            raise ValueError(f"n_e (codebook size) must be an int >= 1, got {n_e!r}")
        if not isinstance(e_dim, int) or isinstance(e_dim, bool) or e_dim < 1:
            raise ValueError(f"e_dim must be an int >= 1, got {e_dim!r}")
        if not isinstance(beta, (int, float)) or float(beta) < 0:
            raise ValueError(f"beta must be a float >= 0, got {beta!r}")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = float(beta)
        self.legacy = bool(legacy)
        self.remap = None
        self.sane_index_shape = bool(sane_index_shape)
        self.return_min_encodings = bool(return_min_encodings)
        self.backend = backend
        self.check_inputs = bool(check_inputs)
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        if temp not in (None, 1.0):
            raise ValueError("temp is only for API compatibility and must be None or 1.0")
        if rescale_logits:
            raise ValueError("rescale_logits is only for API compatibility and must be False")
        if return_logits:
            raise ValueError("return_logits is only for API compatibility and must be False")
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"z must be float32, bfloat16 or float16, got {z.dtype}")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"z must have shape [B, {self.e_dim}, H, W], got {tuple(z.shape)}")
        z_cl = z.movedim(1, -1)
        w = self.embedding.weight
        check = self.check_inputs and not torch.compiler.is_compiling()
        with torch.autocast(z.device.type, enabled=False):
            flat = z_cl.reshape(-1, self.e_dim).float()
            w32 = w.float()
            if self.legacy and self.beta > 0:
                # legacy: commit + β·codebook == β·((1/β)·commit + codebook): same value, and the
                # gradients are (1/β)·β·∂commit for z and β·∂codebook for the codes.
                q, idx, loss = vqf.quantize(
                    flat, w32, 1.0 / self.beta, "l2", codebook_loss=True,
                    backend=self.backend, check_inputs=check,
                )
                loss = self.beta * loss
            elif self.legacy:  # β = 0: commitment only, the codes get no gradient
                q, idx, loss = vqf.quantize(
                    flat, w32.detach(), 1.0, "l2", codebook_loss=False,
                    backend=self.backend, check_inputs=check,
                )
            else:
                q, idx, loss = vqf.quantize(
                    flat, w32, self.beta, "l2", codebook_loss=True,
                    backend=self.backend, check_inputs=check,
                )
            counts = _counts_from_indices(idx, self.n_e)
            p = counts / max(idx.numel(), 1)
            perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        z_q = q.reshape(z_cl.shape).to(z.dtype).movedim(-1, 1)
        min_encodings = None
        if self.return_min_encodings:
            min_encodings = F.one_hot(idx, self.n_e).to(z.dtype)
        if self.sane_index_shape:
            idx = idx.reshape(z.shape[0], z.shape[2], z.shape[3])
        return z_q, loss, (perplexity, min_encodings, idx)

    def get_codebook_entry(self, indices, shape):
        """``indices`` (any shape with B·H·W entries) -> codes; with ``shape = (B, H, W, D)`` the
        result is ``[B, D, H, W]`` as upstream, else ``[..., D]``."""
        z_q = self.embedding(indices.reshape(-1).long())
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
