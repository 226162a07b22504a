"""LR's ``affine_param`` statistics of the VQ drop-in's :class:`._codebook.Codebook` (a mixin: the
methods and buffer names are LR's ``Codebook`` ones, so checkpoints keep their keys).

EMA of the codebook's and the batch's per-dim mean and (biased) variance; the searched codes are
``(embed − codebook_mean)·(batch_std / codebook_std) + batch_mean`` (stds clamped at √1e-5, as LR).
With ``sync_affine_param`` the batch statistics are summed over ranks before the update.
"""

from __future__ import annotations

from functools import partial

import torch

from ... import distributed as vqdist


class AffineParams:
    """``update_with_decay`` / ``update_affine`` / ``_affine_stds`` for a module holding LR's
    ``codebook_mean``, ``codebook_variance``, ``batch_mean``, ``batch_variance`` buffers and the
    ``affine_param_*_decay`` / ``sync_affine_param`` attributes."""

    def update_with_decay(self, buffer_name, new_value, decay):
        old_value = getattr(self, buffer_name)
        needs_init = getattr(self, buffer_name + "_needs_init", False)
        if needs_init:
            self.register_buffer(buffer_name + "_needs_init", torch.tensor(False))
        if old_value is None or bool(needs_init):
            self.register_buffer(buffer_name, new_value.detach())
            return
        self.register_buffer(buffer_name, old_value * decay + new_value.detach() * (1 - decay))

    def update_affine(self, data, embed, mask=None):
        var_fn = partial(torch.var, unbiased=False)
        embed = embed.reshape(embed.shape[0], -1, embed.shape[-1])
        if self.training:
            self.update_with_decay("codebook_mean", embed.mean(1, keepdim=True), self.affine_param_codebook_decay)
            self.update_with_decay("codebook_variance", var_fn(embed, dim=1, keepdim=True),
                                   self.affine_param_codebook_decay)
        data = data.reshape(data.shape[0], -1, data.shape[-1])
        if mask is not None:
            c = data.shape[0]
            data = data[mask].reshape(c, -1, data.shape[-1])
        if not self.sync_affine_param:
            self.update_with_decay("batch_mean", data.mean(1, keepdim=True), self.affine_param_batch_decay)
            self.update_with_decay("batch_variance", var_fn(data, dim=1, keepdim=True),
                                   self.affine_param_batch_decay)
            return
        num = torch.tensor(data.shape[-2], device=data.device, dtype=data.dtype)
        vqdist.all_reduce_sum_(num)
        batch_sum = data.sum(1, keepdim=True)
        vqdist.all_reduce_sum_(batch_sum)
        batch_mean = batch_sum / num
        self.update_with_decay("batch_mean", batch_mean, self.affine_param_batch_decay)
        numer = ((data - batch_mean) ** 2).sum(1, keepdim=True)
        vqdist.all_reduce_sum_(numer)
        self.update_with_decay("batch_variance", numer / num, self.affine_param_batch_decay)

    def _affine_stds(self):
        return self.codebook_variance.clamp(min=1e-5).sqrt(), self.batch_variance.clamp(min=1e-5).sqrt()
