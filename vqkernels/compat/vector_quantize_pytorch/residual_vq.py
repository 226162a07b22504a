"""Drop-ins for vector-quantize-pytorch 1.32's ``residual_vq.py``: ``ResidualVQ`` and
``GroupedResidualVQ`` (LR below), stacked on the fused :class:`.vector_quantize.VectorQuantize`.

Same signatures and defaults (every keyword; the rest go to each ``VectorQuantize`` as in LR), same
return tuples ``(quantized, indices [..., Q], losses [Q][, all_codes [Q, ...]])`` (grouped: indices
``[G, ..., Q]``, losses ``[G, Q]``), same module tree so the ``state_dict`` keys are LR's
(``layers.{i}._codebook.*``, ``project_in/out``, ``rvqs.{g}.*``, ``mlps.*``) and checkpoints load
strictly both ways.  Implemented with LR's semantics: per-depth ``codebook_size`` tuples,
``codebook_dim`` projections, ``shared_codebook`` (one ``Codebook`` module, EMA + dead-code expiry
once per step over every depth's residuals), ``quantize_dropout`` (+ cutoff index, ``multiple_of``,
``rand_quantize_dropout_fixed_seed``; the seed is drawn with LR's generator calls, so a seed drops
the same depths), ``quant_grad_frac``, ``diveq``, masks, ``return_all_codes``,
``sample_codebook_temp``, ``freeze_codebook``, ``implicit_neural_codebook`` (QINCo: LR's ``MLP``
evaluated on every code for every row, plain PyTorch as LR — the per-row codebooks are
``N x K x d`` by construction), and the layer options of ``VectorQuantize`` (rotation trick by
default, k-means, dead codes, cosine, ...).

Beam search (``beam_size``, ``eval_beam_size``, ``beam_score_quantizer_weights``,
``forward(beam_size=)``): LR's search, scores, losses and indices of the best path, on a row-chunked
top-k (see :mod:`._beam`); after a training beam search every depth's codebook is updated from the
residual it quantized on the chosen path (LR 1.32 updates depth 0 only: a bug, not reproduced).
Where LR 1.32 itself fails we do what it evidently intends:
``forward(indices=...)`` (LR unpacks a 2-tuple into 3 names) returns ``(quantized, Σ per-depth
cross-entropy)``; ``accept_image_fmap`` (LR's index bookkeeping only works when C == H == W)
returns indices ``[B, H, W, Q]`` (equal to LR's where LR works).
"""

from __future__ import annotations

import random
from functools import partial
from math import ceil

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed as vqdist
from . import _beam, _streamed
from ._beam import frac_gradient as _frac_gradient
from .vector_quantize import VectorQuantize

__all__ = ["ResidualVQ", "GroupedResidualVQ"]


def _cast_tuple(t, length=1):
    return t if isinstance(t, tuple) else ((t,) * length)


def _get_maybe_sync_seed(device, max_size=10_000):
    # LR's get_maybe_sync_seed: one randint from the torch generator (summed across ranks)
    rand_int = torch.randint(0, max_size, (), device=device)
    if vqdist.world_size() > 1:
        torch.distributed.all_reduce(rand_int)
    return rand_int.item()


def _directional_reparam(src, tgt, noise_variance=5e-3):
    err = tgt - src
    err_norm = err.norm(dim=-1, keepdim=True)
    noised = err + noise_variance**0.5 * torch.randn_like(err)
    return src + F.normalize(noised, p=2, dim=-1, eps=1e-6).detach() * err_norm


class MLP(nn.Module):
    """LR's implicit-neural-codebook MLP (QINCo, Huijben et al. 2024), same parameter names:
    ``codes [h, K, d]`` (or ``[K, d]``) conditioned on ``condition [b, n, d]`` (the partial
    reconstruction) -> per-row codes ``[h, b, n, K, d]`` (or ``[b, n, K, d]``)."""

    def __init__(self, dim, dim_hidden=None, depth=4, l2norm_output=False):
        super().__init__()
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList([
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim)) for _ in range(depth)
        ])
        self.l2norm_output = l2norm_output

    def forward(self, codes, *, condition):
        one_headed = codes.ndim == 2
        if condition.ndim == 2:
            condition = condition.unsqueeze(1)
        if one_headed:
            codes = codes.unsqueeze(0)
        h, k, d = codes.shape
        b, n = condition.shape[0], condition.shape[-2]
        codes = codes[:, None, None].expand(h, b, n, k, d)
        condition = condition[None, :, :, None].expand(h, b, n, k, condition.shape[-1])
        x = self.proj_in(torch.cat((condition, codes), dim=-1))
        for layer in self.layers:
            x = layer(x) + x
        if self.l2norm_output:
            x = F.normalize(x, dim=-1)
        return x[0] if one_headed else x


class ResidualVQ(nn.Module):
    """LR's ``ResidualVQ`` (Algorithm 1 of SoundStream) on fused kernels; see the module docs.

    Forward: ``quantized, indices, losses[, all_codes] = rvq(x, mask=None, indices=None,
    return_all_codes=False, sample_codebook_temp=None, freeze_codebook=False, beam_size=None,
    rand_quantize_dropout_fixed_seed=None)``; ``x: [B, N, D]`` (``[B, D, H, W]`` with
    ``accept_image_fmap``); ``indices: [B, N, Q] int64`` (``-1`` for dropped-out depths);
    ``losses: [Q] float32``; ``all_codes: [Q, B, N, codebook_dim]``.
    """

    def __init__(
        self,
        *,
        dim,
        num_quantizers=None,
        codebook_size,
        codebook_dim=None,
        shared_codebook=False,
        diveq=False,
        heads=1,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        accept_image_fmap=False,
        implicit_neural_codebook=False,
        mlp_kwargs: dict | None = None,
        beam_size=None,
        eval_beam_size=None,
        beam_score_quantizer_weights=None,
        quant_grad_frac=0.0,
        return_zeros_for_masked_padding=True,
        **vq_kwargs,
    ):
        super().__init__()
        if heads != 1:
            raise ValueError("residual vq is not compatible with multi-headed codes (heads must be 1)")
        if num_quantizers is None and not isinstance(codebook_size, tuple):
            raise ValueError("pass num_quantizers, or codebook_size as a tuple (one size per depth)")
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size (as LR)")
        mlp_kwargs = {} if mlp_kwargs is None else mlp_kwargs
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        requires_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        vq_kwargs.update(return_zeros_for_masked_padding=return_zeros_for_masked_padding)
        self.implicit_neural_codebook = implicit_neural_codebook
        if implicit_neural_codebook:
            vq_kwargs.update(learnable_codebook=True, ema_update=False)
        if shared_codebook:
            vq_kwargs.update(manual_ema_update=True, manual_in_place_optimizer_update=True)
        self.diveq = diveq
        if diveq:
            vq_kwargs.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                             commitment_weight=0.0)
        codebook_sizes = _cast_tuple(codebook_size, num_quantizers)
        num_quantizers = len(codebook_sizes) if num_quantizers is None else num_quantizers
        if len(codebook_sizes) != num_quantizers:
            raise ValueError(f"codebook_size has {len(codebook_sizes)} entries for {num_quantizers} quantizers")
        self.num_quantizers = num_quantizers
        self.codebook_sizes = codebook_sizes
        self.uniform_codebook_size = len(set(codebook_sizes)) == 1
        self.layers = nn.ModuleList([
            VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim,
                           accept_image_fmap=accept_image_fmap, **vq_kwargs)
            for size in codebook_sizes
        ])
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        if quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0")
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        if self.vq_is_ema_updating and diveq:
            raise ValueError("only one of ema_update or diveq may update the codebook")
        self.quant_grad_frac = quant_grad_frac if not diveq else 1.0
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        weights = [1.0] * num_quantizers if beam_score_quantizer_weights is None else beam_score_quantizer_weights
        if len(weights) != num_quantizers:
            raise ValueError("beam_score_quantizer_weights needs one weight per quantizer")
        self.register_buffer("beam_score_weights", torch.tensor(weights), persistent=False)
        if implicit_neural_codebook:
            self.mlps = nn.ModuleList([
                MLP(dim=codebook_dim, l2norm_output=self.layers[0].use_cosine_sim, **mlp_kwargs)
                for _ in range(num_quantizers - 1)
            ])
        else:
            self.mlps = (None,) * (num_quantizers - 1)
        self.shared_codebook = shared_codebook
        if not shared_codebook:
            return
        if not self.uniform_codebook_size:
            raise ValueError("shared_codebook needs the same codebook_size at every depth")
        codebook = self.layers[0]._codebook
        for vq in self.layers[1:]:
            vq._codebook = codebook

    @property
    def codebook_size(self):
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        codebooks = tuple(layer._codebook.embed[0] for layer in self.layers)
        if not self.uniform_codebook_size:
            return codebooks
        return torch.stack(codebooks)

    def get_codes_from_indices(self, indices):
        """``indices: [B, ..., q]`` (``q <= Q`` with quantize dropout; ``-1`` = dropped) ->
        ``[Q, B, ..., codebook_dim]`` (dropped codes are 0), as LR."""
        b, q = indices.shape[0], indices.shape[-1]
        lead = indices.shape[1:-1]
        indices = indices.reshape(b, -1, q)
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("quantize dropout must be enabled to reconstruct from fewer quantizers")
            indices = F.pad(indices, (0, self.num_quantizers - q), value=-1)
        mask = indices == -1
        indices = indices.masked_fill(mask, 0)
        if not self.implicit_neural_codebook:
            all_codes = torch.stack([cb[indices[..., i]] for i, cb in enumerate(self.codebooks)])  # q b n d
        else:  # codes depend on the reconstruction so far: depth by depth (LR)
            out, quantized_out = [], 0.0
            for i, (cb, mlp) in enumerate(zip(self.codebooks, (None, *self.mlps))):
                if mlp is not None:
                    codes = mlp(cb, condition=quantized_out if torch.is_tensor(quantized_out)
                                else torch.zeros(*indices.shape[:2], cb.shape[-1], device=cb.device))
                    layer_codes = codes.gather(-2, indices[..., i, None, None].expand(
                        *indices.shape[:2], 1, codes.shape[-1])).squeeze(-2)
                else:
                    layer_codes = cb[indices[..., i]]
                out.append(layer_codes)
                quantized_out = quantized_out + layer_codes
            all_codes = torch.stack(out)
        all_codes = all_codes.masked_fill(mask.permute(2, 0, 1).unsqueeze(-1), 0.0)
        return all_codes.reshape(self.num_quantizers, b, *lead, all_codes.shape[-1])

    def get_output_from_indices(self, indices):
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def forward(self, x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        num_quant, multiple_of, device = self.num_quantizers, self.quantize_dropout_multiple_of, x.device
        return_loss = indices is not None
        orig_input = x
        fmap = self.accept_image_fmap
        if fmap and return_loss:
            raise ValueError("indices= is not supported with accept_image_fmap (as LR)")
        # projections act on the channel dim (channel-first for image feature maps)
        x = self.project_in(x.movedim(1, -1)).movedim(-1, 1) if fmap else self.project_in(x)
        # the running sum starts at depth 0's codes (LR adds them to zeros: the same values) —
        # one [N, d] buffer less; implicit neural codebooks condition depth 0 on those zeros
        quantized_out = torch.zeros_like(x) if self.implicit_neural_codebook else None
        residual = x
        if isinstance(indices, list):
            indices = torch.stack(indices, dim=-1)
        if return_loss:
            if bool((indices == -1).any()):
                raise ValueError("some of the residual vq indices were dropped out; use indices "
                                 "from eval mode to derive the cross entropy loss")
            ce_losses = []
        should_dropout = self.training and self.quantize_dropout and not return_loss
        if should_dropout:
            if rand_quantize_dropout_fixed_seed is None:
                rand_quantize_dropout_fixed_seed = _get_maybe_sync_seed(device)
            rand = random.Random(rand_quantize_dropout_fixed_seed)
            dropout_index = rand.randrange(self.quantize_dropout_cutoff_index, num_quant)
            if multiple_of != 1:
                dropout_index = ceil((dropout_index + 1) / multiple_of) * multiple_of - 1
        beam_size = (self.beam_size if self.training else self.eval_beam_size) if beam_size is None else beam_size
        if beam_size is not None and beam_size > 1:
            _beam.check_beam(self, beam_size, return_loss)
            return self._beam_forward(x, orig_input, mask, return_all_codes, sample_codebook_temp,
                                      freeze_codebook, beam_size, dropout_index if should_dropout else None)
        all_indices, all_losses, all_residuals = [], [], []
        # Memory: in the default training path each depth saves a recipe of its input instead of
        # the input and its codes (see _streamed.ResidualChain); bit-identical gradients.
        chain = None
        if (self.training and torch.is_grad_enabled() and x.requires_grad and self.quant_grad_frac <= 0
                and not fmap and mask is None and not return_loss and not self.diveq
                and not self.implicit_neural_codebook and x.dtype == torch.float32):
            chain = _streamed.ResidualChain(x)
        index_shape = None
        # Without autograd (eval) the running residual and sum are updated in place after depth
        # 0 (same float ops, so the same values): two [N, d] buffers less at every depth.  Not
        # when something keeps the depths' residuals (shared codebook) or their sums (QINCo).
        in_place = (not torch.is_grad_enabled() and not return_loss and not self.implicit_neural_codebook
                    and not (self.shared_codebook and self.training))
        transforms = (None, *self.mlps) if self.implicit_neural_codebook else (None,) * num_quant
        for qi, (vq, mlp) in enumerate(zip(self.layers, transforms)):
            if should_dropout and qi > dropout_index:
                all_indices.append(torch.full(index_shape, -1, dtype=torch.long, device=device))
                all_losses.append(torch.zeros((), device=device))
                continue
            if self.shared_codebook and self.training:
                all_residuals.append(residual)  # for the shared codebook's expiry (only then)
            transform = partial(mlp, condition=quantized_out) if mlp is not None else None
            vq._residual_chain = (chain, qi) if chain is not None else None
            try:
                out = vq(residual, mask=mask, indices=None if not return_loss else indices[..., qi],
                         sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
                         codebook_transform_fn=transform)
            finally:
                vq._residual_chain = None
            if chain is not None and len(chain.steps) != qi + 1:
                chain = None  # this depth took the general path: later depths save their inputs
            if return_loss:
                ce_losses.append(out[1])
                quantized = out[0]
                residual = residual - _frac_gradient(quantized, self.quant_grad_frac)
                quantized_out = quantized if quantized_out is None else quantized_out + quantized
                continue
            quantized, embed_indices, loss = out
            index_shape = embed_indices.shape
            if in_place and qi > 0:
                residual.sub_(quantized)  # (depth 0's residual is the caller's input: not in place)
                quantized_out.add_(quantized)
            else:
                residual = residual - _frac_gradient(quantized, self.quant_grad_frac)
                quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(embed_indices)
            all_losses.append(loss.float().reshape(()))
        self._update_shared_codebook(all_residuals)
        if return_loss:
            return self._finish(x, orig_input, quantized_out, mask), sum(ce_losses)
        return self._outputs(x, orig_input, quantized_out, mask, torch.stack(all_indices, dim=-1),
                             torch.stack(all_losses), return_all_codes)

    def _beam_forward(self, x, orig_input, mask, return_all_codes, sample_codebook_temp, freeze_codebook,
                      beam_size, dropout_index):
        """LR's beam search (``beam_size > 1``; see :mod:`._beam`), then LR's codebook updates from
        the best path: each depth's ``update_indices`` with the residual it quantized (EMA, dead
        codes; even with ``freeze_codebook``, as LR), and the shared codebook's step."""
        if x.ndim != 3:
            raise ValueError(f"beam search needs x of shape [B, N, D], got {tuple(orig_input.shape)}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2])):
            raise ValueError(f"mask must be a bool tensor of shape {list(x.shape[:2])}, got "
                             f"{mask.dtype} {list(mask.shape)}")
        quantized_out, all_indices, all_losses, inputs = _beam.residual_beam_search(
            self, x, mask, beam_size, sample_codebook_temp, freeze_codebook, dropout_index)
        if self.training:
            for vq, layer_input, layer_indices in zip(self.layers, inputs, all_indices.unbind(dim=-1)):
                vq.update_indices(layer_input.detach(), layer_indices, mask=mask)
        self._update_shared_codebook(inputs)
        return self._outputs(x, orig_input, quantized_out, mask, all_indices, all_losses, return_all_codes)

    def _update_shared_codebook(self, all_residuals):
        """Shared codebook, training: LR's one EMA step and dead-code expiry per forward, over every
        depth's residual (rows laid out (n l) per batch element)."""
        if not (self.training and self.shared_codebook):
            return
        shared = self.layers[0]
        if self.vq_is_ema_updating:
            shared._codebook.update_ema()
            shared.update_in_place_optimizer()
        stacked = torch.stack(all_residuals, dim=-2).detach()
        if self.accept_image_fmap:
            stacked = stacked.movedim(1, -1)  # b c h w l -> b h w l c
        shared.expire_codes_(stacked.reshape(stacked.shape[0], -1, stacked.shape[-1]))

    def _finish(self, x, orig_input, quantized_out, mask):
        """diveq, ``project_out`` and LR's masked padding (zeros or the input)."""
        if self.diveq:
            quantized_out = _directional_reparam(x, quantized_out)
        quantized_out = (self.project_out(quantized_out.movedim(1, -1)).movedim(-1, 1) if self.accept_image_fmap
                         else self.project_out(quantized_out))
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else orig_input
            quantized_out = torch.where(mask.unsqueeze(-1), quantized_out, fill)
        return quantized_out

    def _outputs(self, x, orig_input, quantized_out, mask, all_indices, all_losses, return_all_codes):
        ret = (self._finish(x, orig_input, quantized_out, mask), all_indices, all_losses)
        if not return_all_codes:
            return ret
        return (*ret, self.get_codes_from_indices(all_indices))


class GroupedResidualVQ(nn.Module):
    """LR's ``GroupedResidualVQ``: the feature dim split into ``groups`` independent
    :class:`ResidualVQ` stacks (``rvqs``); returns ``(quantized, indices [G, ..., Q],
    losses [G, Q][, all_codes [G, Q, ...]])``."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        self.dim = dim
        self.groups = groups
        if dim % groups != 0:
            raise ValueError(f"dim={dim} must be divisible by groups={groups}")
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList([
            ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs) for _ in range(groups)
        ])

    @property
    def codebooks(self):
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self):
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices):
        return torch.stack(tuple(rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices):
        outs = tuple(rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices))
        return torch.cat(outs, dim=self.split_dim)

    def forward(self, x, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, mask=None):
        split_dim = self.split_dim
        if x.shape[split_dim] != self.dim:
            raise ValueError(f"x must have dim={self.dim} features on dim {split_dim}, got {tuple(x.shape)}")
        chunks = x.chunk(self.groups, dim=split_dim)
        indices = () if indices is None else indices
        return_ce_loss = len(indices) > 0
        if return_ce_loss and len(indices) != self.groups:
            raise ValueError(f"indices must hold one entry per group ({self.groups})")
        kwargs = dict(
            return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp, mask=mask,
            freeze_codebook=freeze_codebook,
            # one seed for every group (LR): the same depths drop out in each group
            rand_quantize_dropout_fixed_seed=_get_maybe_sync_seed(x.device) if self.training else None,
        )
        out = tuple(
            rvq(chunk, indices=indices[g] if return_ce_loss else None, **kwargs)
            for g, (rvq, chunk) in enumerate(zip(self.rvqs, chunks))
        )
        out = tuple(zip(*out))
        if return_ce_loss:
            quantized, ce_losses = out
            return torch.cat(quantized, dim=split_dim), sum(ce_losses)
        quantized, all_indices, commit_losses, *maybe_all_codes = out
        ret = (torch.cat(quantized, dim=split_dim), torch.stack(all_indices), torch.stack(commit_losses))
        return (*ret, *maybe_all_codes)  # LR: all_codes stay a per-group tuple
