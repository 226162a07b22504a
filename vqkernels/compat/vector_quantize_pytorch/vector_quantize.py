"""Drop-in for vector-quantize-pytorch 1.32's ``VectorQuantize`` (LR below), on vqkernels' ops.

Same constructor (every keyword, LR's defaults; an unknown keyword is a ``TypeError``), same
forward signature and return values, same ``state_dict`` keys and shapes (``_codebook.embed``,
``_codebook.embed_avg``, ``_codebook.cluster_size``, ``_codebook.initted``, affine buffers,
``project_in``/``project_out``), so a checkpoint of one loads strictly into the other.

Fused: the nearest-code search and the EMA / k-means statistics (see :mod:`._codebook`); the
rotation trick (LR's default for ``dim > 1``) runs in the fused
``quantize(..., estimator="rotation")`` op (search + codes + O(d) backward, every head in one
call), falling back to the O(d)-per-row autograd function :func:`._streamed.rotate_to` where the
op cannot keep LR's semantics (see ``forward``); ``commitment_use_cross_entropy_loss``, the
``indices=`` loss and ``codebook_diversity_loss_weight`` run on the fused ``code_distribution`` op
(logsumexp; per-position grouped ``mean_probs``: see ``_losses``); Gumbel sampling and
straight-through are streamed over row chunks, never ``N x K``; ``forward(topk=...)`` is a
row-chunked top-k search (see ``_beam``).  Everything else is LR's math in plain PyTorch.

Implemented with LR's semantics: ``heads`` (shared or ``separate_codebook_per_head``),
``codebook_dim`` (+ ``layernorm_after_project_in``), ``use_cosine_sim``, EMA (``decay``, ``eps``,
``ema_update``, ``manual_ema_update``, ``accum_ema_update``, ``ema_update_weight``),
``learnable_codebook`` / ``ema_update=False`` (+ ``in_place_codebook_optimizer``,
``manual_in_place_optimizer_update``), ``kmeans_init``, ``threshold_ema_dead_code``,
``stochastic_sample_codes`` / ``sample_codebook_temp`` / ``straight_through``, ``rotation_trick``,
``directional_reparam``, ``orthogonal_reg_*``, ``codebook_diversity_*``,
``commitment_use_cross_entropy_loss``, ``freeze_codebook``, ``affine_param`` (+ sync),
``sync_update_v``, ``vq_bridge``, ``route_gradients_to_input``, ``return_zeros_for_masked_padding``,
``sync_codebook``, ``forward(codebook_transform_fn=...)`` (implicit neural codebooks: per-row
codes, plain PyTorch as LR since the codes themselves are ``N x K x d``), ``forward(topk=...)``
(the ``k`` best codes per row, LR's per-candidate losses; single head as LR asserts; what
ResidualVQ's beam search calls).

Deliberate differences: the rotation-trick output is exactly the chosen code (LR's equals it up to
rounding); masked commitment loss with a projection or heads uses the projected input (LR fails on
a shape mismatch there); stochastic draws follow LR's distribution, not its exact noise.
"""

from __future__ import annotations

from math import sqrt

import torch
import torch.nn.functional as F
from torch import nn

from ... import dispatch
from ... import distributed as vqdist
from . import _beam, _layout, _losses, _streamed
from ._codebook import Codebook
from ._losses import LossBreakdown

__all__ = ["VectorQuantize", "LossBreakdown"]


class VectorQuantize(nn.Module):
    """vector-quantize-pytorch's ``VectorQuantize`` on fused kernels (see the module docs).

    Forward: ``quantized, indices, loss[, breakdown] = vq(x, indices=None, mask=None, lens=None,
    sample_codebook_temp=None, freeze_codebook=None, return_loss_breakdown=False, ...)``

    * ``x``: ``[B, N, D]`` (``channel_last``), ``[B, D, N]``, ``[B, D, H, W]``
      (``accept_image_fmap``), ``[B, D, T, H, W]`` (``accept_3d_fmap``) or ``[B, D]``; float.
    * ``quantized``: like ``x``; ``indices``: int64, ``x`` without the channel dim (plus a heads dim
      when ``heads > 1``; ``-1`` where masked); ``loss``: ``[]`` float32 (0 in eval).
    * with ``indices=`` given: returns ``(quantized, cross_entropy_loss)`` as LR.
    * with ``topk=k`` (single head): the ``k`` best codes per row, best first: ``quantized``
      ``[..., k, D]`` (channel-first layouts ``[B, D, ..., k]``), ``indices [..., k]``, ``loss``
      ``[..., k]`` per candidate (LR's), no codebook update (see :mod:`._beam`).

    Extra keyword-only arguments (not LR's): ``backend`` (vqkernels backend) and
    ``fused_sampling`` (``stochastic_sample_codes`` on ``nearest_code``'s fused Gumbel-max:
    LR's distribution and logits, no ``N x K`` work in PyTorch, but counter-hash noise instead of
    LR's torch draws, so a seed no longer reproduces LR's codes; default off).
    """

    def __init__(
        self,
        dim,
        codebook_size,
        codebook_dim=None,
        heads=1,
        separate_codebook_per_head=False,
        decay=0.8,
        eps=1e-5,
        freeze_codebook=False,
        kmeans_init=False,
        kmeans_iters=10,
        sync_kmeans=True,
        use_cosine_sim=False,
        layernorm_after_project_in=False,
        threshold_ema_dead_code=0,
        channel_last=True,
        accept_image_fmap=False,
        accept_3d_fmap=False,
        commitment_weight=1.0,
        commitment_use_cross_entropy_loss=False,
        orthogonal_reg_weight=0.0,
        orthogonal_reg_active_codes_only=False,
        orthogonal_reg_max_codes=None,
        codebook_diversity_loss_weight=0.0,
        codebook_diversity_temperature=100.0,
        stochastic_sample_codes=False,
        sample_codebook_temp=1.0,
        straight_through=False,
        rotation_trick=None,
        directional_reparam=False,
        directional_reparam_variance=5e-3,
        sync_codebook=None,
        sync_affine_param=False,
        ema_update=None,
        vq_bridge=None,
        manual_ema_update=False,
        learnable_codebook=None,
        in_place_codebook_optimizer=None,
        manual_in_place_optimizer_update=False,
        affine_param=False,
        affine_param_batch_decay=0.99,
        affine_param_codebook_decay=0.9,
        sync_update_v=0.0,
        return_zeros_for_masked_padding=True,
        route_gradients_to_input=True,
        *,
        backend: str = "auto",
        fused_sampling: bool = False,
    ):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not isinstance(codebook_size, int) or isinstance(codebook_size, bool) or codebook_size < 1:
            raise ValueError(f"codebook_size must be an int >= 1, got {codebook_size!r}")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be an int >= 1, got {heads!r}")
        ema_update = (not directional_reparam and vq_bridge is None) if ema_update is None else ema_update
        learnable_codebook = (
            (directional_reparam or vq_bridge is not None) if learnable_codebook is None else learnable_codebook
        )
        rotation_trick = (not directional_reparam and dim > 1) if rotation_trick is None else rotation_trick
        # LR's assertions, as ValueErrors naming the options
        for bad, msg in (
            (use_cosine_sim and learnable_codebook, "use_cosine_sim is not compatible with learnable_codebook"),
            (sum(map(bool, (straight_through, rotation_trick, directional_reparam))) > 1,
             "at most one of straight_through, rotation_trick, directional_reparam (note: "
             "rotation_trick defaults to True for dim > 1; pass rotation_trick=False)"),
            (directional_reparam and threshold_ema_dead_code == 0,
             "directional_reparam needs threshold_ema_dead_code > 0"),
            (straight_through and learnable_codebook, "straight_through is not allowed with learnable_codebook"),
            (ema_update and learnable_codebook, "learnable_codebook needs ema_update=False"),
            (vq_bridge is not None and not learnable_codebook, "vq_bridge needs learnable_codebook=True"),
            (vq_bridge is not None and ema_update, "vq_bridge needs ema_update=False"),
            (not 0 <= sync_update_v <= 1.0, "sync_update_v must lie in [0, 1]"),
            (sync_update_v > 0 and not learnable_codebook, "sync_update_v > 0 needs learnable_codebook=True"),
            (affine_param and use_cosine_sim, "affine_param is only compatible with euclidean codebooks"),
            (accept_image_fmap and accept_3d_fmap, "accept_image_fmap and accept_3d_fmap are exclusive"),
        ):
            if bad:
                raise ValueError(msg)
        self.dim = dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        codebook_dim = dim if codebook_dim is None else codebook_dim
        codebook_input_dim = codebook_dim * heads
        requires_projection = codebook_input_dim != dim
        if requires_projection:
            lin = nn.Linear(dim, codebook_input_dim)
            self.project_in = (
                nn.Sequential(lin, nn.LayerNorm(codebook_input_dim)) if layernorm_after_project_in else lin
            )
            self.project_out = nn.Linear(codebook_input_dim, dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.has_projections = requires_projection
        self.eps = eps
        self.has_commitment_loss = commitment_weight > 0.0 and not directional_reparam
        self.commitment_weight = commitment_weight
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.learnable_codebook = learnable_codebook
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0.0
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.has_codebook_diversity_loss = codebook_diversity_loss_weight > 0.0
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.rotation_trick = rotation_trick
        self.directional_reparam = directional_reparam
        self.directional_reparam_variance = directional_reparam_variance
        self.route_gradients_to_input = route_gradients_to_input
        self.sync_update_v = sync_update_v
        if sync_codebook is None:
            sync_codebook = vqdist.world_size() > 1
        self.use_cosine_sim = use_cosine_sim
        self.backend = dispatch.validate_backend(backend)
        self._codebook = Codebook(
            dim=codebook_dim,
            num_codebooks=heads if separate_codebook_per_head else 1,
            codebook_size=codebook_size,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            sync_kmeans=sync_kmeans,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            use_ddp=sync_codebook,
            learnable_codebook=self.has_codebook_orthogonal_loss or learnable_codebook,
            stochastic_sample_codes=stochastic_sample_codes,
            straight_through=straight_through,
            sample_codebook_temp=sample_codebook_temp,
            ema_update=ema_update,
            manual_ema_update=manual_ema_update,
            affine_param=affine_param,
            sync_affine_param=sync_affine_param,
            affine_param_batch_decay=affine_param_batch_decay,
            affine_param_codebook_decay=affine_param_codebook_decay,
            use_cosine_sim=use_cosine_sim,
            vq_bridge=vq_bridge,
            backend=self.backend,
            fused_sampling=fused_sampling,
        )
        self.in_place_codebook_optimizer = (
            in_place_codebook_optimizer(self._codebook.parameters())
            if in_place_codebook_optimizer is not None else None
        )
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update
        self.codebook_size = codebook_size
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        self.channel_last = channel_last
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.freeze_codebook = freeze_codebook
        # (ResidualChain, depth) set by ResidualVQ around this layer's call: see _chained_path
        self._residual_chain = None

    # ------------------------------------------------------------------ LR's public helpers

    @property
    def ema_update(self):
        return self._codebook.ema_update

    @property
    def codebook(self):
        codebook = self._codebook.embed
        return codebook if self.separate_codebook_per_head else codebook[0]

    @codebook.setter
    def codebook(self, codes):
        if not self.separate_codebook_per_head:
            codes = codes.unsqueeze(0)
        with torch.no_grad():
            self._codebook.embed.copy_(codes)

    def _channel_first_out(self) -> bool:
        return not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap

    def get_codes_from_indices(self, indices):
        """``indices: [B, ...]`` (``[B, ..., heads]`` multi-head) -> codes in codebook space
        ``[B, ..., codebook_dim·heads]`` (channel-first layouts: ``[B, C, ...]``), as LR."""
        codebook = self.codebook
        if codebook.ndim == 2:
            codes = codebook[indices]
        else:
            h = codebook.shape[0]
            codes = torch.stack([codebook[i][indices[..., i]] for i in range(h)], dim=-2)
            codes = codes.reshape(*codes.shape[:-2], -1)
        if self._channel_first_out():
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices):
        return self.project_out(self.get_codes_from_indices(indices))

    def update_in_place_optimizer(self):
        if self.in_place_codebook_optimizer is None:
            return
        if self._codebook.use_ddp:
            for param in self._codebook.parameters():
                if param.grad is None:
                    continue
                torch.distributed.all_reduce(param.grad)
                param.grad /= torch.distributed.get_world_size()
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    def maybe_split_heads_from_input(self, x):
        if self.heads == 1:
            return x
        b, n, hd = x.shape
        h = self.heads
        t = x.reshape(b, n, h, hd // h)
        if self.separate_codebook_per_head:
            return t.permute(2, 0, 1, 3)  # h b n d
        return t.permute(0, 2, 1, 3).reshape(1, b * h, n, hd // h)  # 1 (b h) n d

    def expire_codes_(self, x):
        x = self._codebook.transform_input(x)
        x = self.maybe_split_heads_from_input(x)
        # as LR: the leading dim is taken as the codebook dim and zipped with the codebooks, so a
        # [B, n, d] input replaces dead codes from its first element(s) only
        self._codebook.expire_codes_(x)

    def _to_sequence(self, x):
        """Input layout -> ``[b, n, d]`` plus what is needed to undo it."""
        if self.accept_image_fmap:
            b, c, hh, ww = x.shape
            return x.reshape(b, c, hh * ww).transpose(1, 2), (hh, ww)
        if self.accept_3d_fmap:
            b, c, dd, hh, ww = x.shape
            return x.reshape(b, c, dd * hh * ww).transpose(1, 2), (dd, hh, ww)
        return x, None

    def update_indices(self, x, indices, mask=None):
        """LR's ``update_indices``: EMA / dead-code update of the codebook from given ``indices``
        (LR's output layout) for input ``x`` (forward's layout), without a search."""
        if (self.accept_image_fmap or self.accept_3d_fmap) and mask is not None:
            raise ValueError("mask is not supported with accept_image_fmap/accept_3d_fmap")
        x, spatial = self._to_sequence(x)
        if not self.channel_last and spatial is None and x.ndim == 3:
            x = x.transpose(1, 2)
        if spatial is not None:
            keep = 1 if self.heads > 1 else 0
            indices = indices.reshape(indices.shape[0], -1, *indices.shape[indices.ndim - keep:])
        x = self.project_in(x)
        x = self.maybe_split_heads_from_input(x)
        x = self._codebook.transform_input(x)
        if self.heads > 1:
            if self.separate_codebook_per_head:
                indices = indices.permute(2, 0, 1)  # b n h -> h b n
            else:
                b, n, h = indices.shape
                indices = indices.permute(0, 2, 1).reshape(1, b * h, n)
        if x.ndim == 2:  # only one token
            indices = indices.unsqueeze(1)
        self._codebook.update_indices(x, indices, mask=mask)

    update_ema_indices = update_indices

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x,
        indices=None,
        mask=None,
        lens=None,
        topk=None,
        sample_codebook_temp=None,
        freeze_codebook=None,
        return_loss_breakdown=False,
        codebook_transform_fn=None,
        ema_update_weight=None,
        accum_ema_update=False,
        ema_update=None,
    ):
        if topk is not None:
            if codebook_transform_fn is not None:
                raise ValueError("topk cannot be combined with codebook_transform_fn= "
                                 "(vector-quantize-pytorch 1.32 fails there)")
            return _beam.vq_topk_forward(self, x, topk, indices=indices, mask=mask, lens=lens,
                                         sample_codebook_temp=sample_codebook_temp,
                                         freeze_codebook=freeze_codebook,
                                         return_loss_breakdown=return_loss_breakdown)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        orig_input, input_requires_grad = x, x.requires_grad
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        x, mask, only_one = _layout.sequence_mask(x, mask, lens)
        expect = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else 3
        if x.ndim != expect:
            raise ValueError(f"x must have {expect} dims (or [B, D]), got shape {tuple(orig_input.shape)}")
        shape, dtype, heads = x.shape, x.dtype, self.heads
        heads_layout = (heads, self.separate_codebook_per_head)  # for the _layout helpers
        is_multiheaded, return_loss = heads > 1, indices is not None
        need_transpose = not self.channel_last and not self.accept_image_fmap and not self.accept_3d_fmap and not only_one
        if (self.accept_image_fmap or self.accept_3d_fmap) and mask is not None:
            raise ValueError("mask is not supported with accept_image_fmap/accept_3d_fmap")
        x, spatial = self._to_sequence(x)
        if need_transpose:
            x = x.transpose(1, 2)
            orig_input = orig_input.transpose(1, 2)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have dim={self.dim} features, got shape {tuple(orig_input.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask must have shape {list(x.shape[:2])}, got {list(mask.shape)}")

        x = self.project_in(x)
        x = self.maybe_split_heads_from_input(x)
        x = self._codebook.transform_input(x)
        # Rotation trick fused into the search (one quantize(estimator="rotation") call: codes +
        # O(d) backward in the op) wherever LR's exact semantics survive it; the stand-in
        # (search, gather, _streamed.rotate_to) stays for Gumbel sampling (the op has no sampled
        # search), learnable codebooks (LR's commitment loss sends the codebook a gradient
        # through the gathered codes, the op's codes carry none), the in-place optimizer (two
        # searches per step) and residual stacks' ResidualChain path (it saves a K x d recipe
        # instead of the op's saved input: the memory win of ResidualVQ).
        temp = self._codebook.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        chained = self.training and self._chained_path(
            x, mask, None if codebook_transform_fn is None else True, input_requires_grad, return_loss)
        fused_rotation = (
            self.training and self.rotation_trick and input_requires_grad and self.route_gradients_to_input
            and not chained and self.in_place_codebook_optimizer is None and codebook_transform_fn is None
            and self._codebook.can_fuse_rotation(temp)
        )
        codebook_kwargs = dict(
            sample_codebook_temp=sample_codebook_temp, mask=mask, freeze_codebook=freeze_codebook,
            ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update, ema_update=ema_update,
            # LR's distance-based losses use the codes searched *before* this step's EMA update
            keep_embed=(return_loss or self.has_codebook_diversity_loss or self.commitment_use_cross_entropy_loss
                        or self._residual_chain is not None),
            codebook_transform_fn=codebook_transform_fn, fused_rotation=fused_rotation,
        )
        quantize, embed_ind, flatten, embed, flat_mask, dist = self._codebook(x, **codebook_kwargs)
        quantize = quantize.to(dtype)
        zero = self.zero
        commit_loss = orthogonal_reg_loss = inplace_optimize_loss = codebook_diversity_loss = zero

        if self.in_place_codebook_optimizer is not None and self.training and not freeze_codebook:
            if mask is not None:
                sq = F.mse_loss(quantize, x.detach(), reduction="none")
                loss_mask = _layout.head_mask(mask, sq, *heads_layout)
                loss = sq[loss_mask].mean()
            else:
                loss = F.mse_loss(quantize, x.detach())
            loss.backward()
            if not self.manual_in_place_optimizer_update:
                self.update_in_place_optimizer()
            inplace_optimize_loss = loss
            codebook_kwargs.update(update_usage=False)
            quantize, embed_ind, flatten, embed, flat_mask, dist = self._codebook(x, **codebook_kwargs)
            quantize = quantize.to(dtype)

        chained_commit = None
        if chained:
            chain, depth = self._residual_chain
            chain.record(embed_ind, embed[0], quantize, self.rotation_trick, self.backend)
            quantize, chained_commit = _streamed.chained_estimator(x, quantize, chain, depth, self.rotation_trick)
        elif self.training:
            commit_quantize = (
                quantize.detach() if (not self.learnable_codebook or freeze_codebook) else quantize
            )
            if input_requires_grad and self.route_gradients_to_input:
                if fused_rotation:  # the op's codes already carry the rotation gradient
                    quantize = _streamed.patch_rotation_value(x, quantize)
                elif self.rotation_trick:
                    quantize = _streamed.rotate_to(x, quantize)
                elif self.directional_reparam:
                    err = quantize - x
                    err_norm = err.norm(dim=-1, keepdim=True)
                    noised = err + sqrt(self.directional_reparam_variance) * torch.randn_like(err)
                    quantize = x + F.normalize(noised, p=2, dim=-1, eps=1e-6).detach() * err_norm
                else:
                    quantize = x + (quantize - x).detach()
            if self.sync_update_v > 0.0:
                quantize = quantize + self.sync_update_v * (quantize - quantize.detach())

        metric = _losses.metric_for(self.use_cosine_sim)

        def ce_loss(codes):
            # codes in LR's layout ([b, n] / [b, n, h]) -> per codebook row order of `flatten`
            codes = _layout.codes_to_flat(codes, flatten.shape[0], *heads_layout)
            if dist is not None:  # implicit neural codebook: LR's full [H, N, K] logits exist
                return _losses.cross_entropy_from_logits(dist, codes)
            return _losses.cross_entropy(flatten, embed, codes, metric, self.backend)

        if return_loss:
            return quantize, ce_loss(_layout.indices_to_internal(indices, spatial, only_one, self.heads))

        embed_ind = _layout.indices_from_internal(embed_ind, spatial, only_one, *heads_layout)

        loss = zero.clone()
        if self.training:
            loss.requires_grad_()
            if self.has_codebook_diversity_loss:
                codebook_diversity_loss = self._diversity_loss(flatten, embed, metric, x, dist)
                loss = loss + codebook_diversity_loss * self.codebook_diversity_loss_weight
            if self.has_commitment_loss:
                if self.commitment_use_cross_entropy_loss:
                    if mask is not None:
                        m = mask if not is_multiheaded else mask.unsqueeze(-1).expand(*mask.shape, heads)
                        embed_ind = embed_ind.masked_fill(~m, -1)
                    commit_loss = ce_loss(_layout.indices_to_internal(embed_ind, spatial, only_one, self.heads))
                elif mask is not None:
                    # LR compares with the raw input (not projected / normalized) where it
                    # broadcasts against the codes, else it fails; we fall back to x there
                    try:
                        same = torch.broadcast_shapes(orig_input.shape, commit_quantize.shape) == commit_quantize.shape
                    except RuntimeError:
                        same = False
                    ref = orig_input if same else x
                    sq = F.mse_loss(commit_quantize, ref, reduction="none")
                    commit_loss = sq[_layout.head_mask(mask, sq, *heads_layout)].mean()
                elif chained_commit is not None:
                    commit_loss = chained_commit
                else:
                    commit_loss = F.mse_loss(commit_quantize, x)
                loss = loss + commit_loss * self.commitment_weight
            if self.has_codebook_orthogonal_loss:
                orthogonal_reg_loss = _losses.orthogonal_reg_loss(self, embed_ind)
                loss = loss + orthogonal_reg_loss * self.orthogonal_reg_weight

        if is_multiheaded:
            if self.separate_codebook_per_head:
                quantize = quantize.permute(1, 2, 0, 3)  # h b n d -> b n h d
            else:
                b = shape[0]
                quantize = quantize.reshape(b, heads, -1, quantize.shape[-1]).permute(0, 2, 1, 3)
            quantize = quantize.reshape(*quantize.shape[:2], -1)
        quantize = self.project_out(quantize)

        if mask is not None:
            fill = torch.zeros_like(orig_input) if self.return_zeros_for_masked_padding else orig_input
            quantize = torch.where(mask.unsqueeze(-1), quantize, fill)
            m = mask if embed_ind.ndim == 2 else mask.unsqueeze(-1)
            embed_ind = torch.where(m, embed_ind, torch.full_like(embed_ind, -1))

        if need_transpose:
            quantize = quantize.transpose(1, 2)
        if spatial is not None:
            quantize = quantize.transpose(1, 2).reshape(shape[0], -1, *spatial)
        if only_one:
            quantize = quantize.squeeze(1)
        if not return_loss_breakdown:
            return quantize, embed_ind, loss
        return quantize, embed_ind, loss, LossBreakdown(
            commit_loss, codebook_diversity_loss, orthogonal_reg_loss, inplace_optimize_loss
        )

    def _chained_path(self, x, mask, dist, input_requires_grad, return_loss) -> bool:
        """Whether this training step may save a ResidualChain recipe instead of its input and
        codes (memory of residual stacks): the default estimators (rotation trick or STE) with
        the plain commitment MSE on an fp32, euclidean, single-head, unprojected EMA layer —
        where the layer's ``x`` is exactly the residual the chain replays."""
        return (
            self._residual_chain is not None and input_requires_grad and self.route_gradients_to_input
            and not self.directional_reparam and self.sync_update_v == 0.0 and not self.learnable_codebook
            and not self._codebook.learnable_codebook and mask is None and dist is None and not return_loss
            and self.heads == 1 and not self.use_cosine_sim and not self.has_projections
            and not self.commitment_use_cross_entropy_loss and x.dtype == torch.float32
            and self.in_place_codebook_optimizer is None and not self.accept_image_fmap
            and not self.accept_3d_fmap and self.channel_last
            and not (self._codebook.straight_through or self._codebook.stochastic_sample_codes)
        )

    def _diversity_loss(self, flatten, embed, metric, x, dist=None):
        # LR: prob = softmax(dist·T); avg over every dim but (position n, code); -entropy, mean over n
        n = x.shape[-2]
        scale = self.codebook_diversity_temperature
        if dist is not None:  # implicit neural codebook: the full logits exist already
            prob = (dist * scale).softmax(-1)
            return -_losses.entropy(prob.reshape(-1, n, prob.shape[-1]).mean(0)).mean()
        return _losses.diversity_loss(flatten, embed, metric, n, scale, self.backend)
