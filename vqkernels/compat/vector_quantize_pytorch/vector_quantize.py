"""Drop-in for vector-quantize-pytorch's ``vector_quantize_pytorch/vector_quantize.py``, on
vqkernels' fused ops.

``VectorQuantize``    vector-quantize-pytorch's ``VectorQuantize`` constructor/forward (the subset
                      below) and its ``state_dict`` layout (``_codebook.embed``, ``_codebook.embed_avg``,
                      ``_codebook.cluster_size``, ``_codebook.initted``, ``project_in.*``,
                      ``project_out.*``): a checkpoint of one loads into the other.

Supported subset of ``VectorQuantize``: euclidean or cosine (``use_cosine_sim``) codebooks learned by
EMA (``decay``, ``eps``, Laplace smoothing), ``kmeans_init``/``kmeans_iters`` (random-sample seeding,
as upstream), ``threshold_ema_dead_code``, ``commitment_weight``, ``codebook_dim`` projections,
``channel_last``/``accept_image_fmap``/``accept_3d_fmap``, ``mask``/``lens``, ``freeze_codebook``,
``sync_codebook``, ``return_zeros_for_masked_padding``, ``heads=1`` and ``rotation_trick=False``
(the plain straight-through estimator).  Every other option that changes the numbers raises
``NotImplementedError`` naming it (note: upstream's default ``rotation_trick=None`` means the
rotation trick for ``dim > 1``, so pass ``rotation_trick=False`` explicitly).

Semantics matched on purpose (tests compare against the installed package): EMA with
``cluster_size``/``embed_avg`` starting at ones/the codebook, the codebook re-normalized after each
update for cosine, the loss is ``commitment_weight·mse(q, x)`` in training and ``0`` in eval,
k-means init runs on the first forward in any mode, masked positions return zeros (or the input)
and index ``-1``.  Upstream's quirk of computing the *masked* commitment loss against the raw
(unprojected, un-normalized) input is reproduced when ``codebook_dim == dim``; with a projection
(where upstream fails on a shape mismatch) the projected input is used.  Random choices (k-means
seeds, dead-code replacements) use vqkernels' own sampling, so they differ draw by draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import functional as vqf
from ...nn import VectorQuantizer

__all__ = ["VectorQuantize", "LossBreakdown"]

# upstream state_dict key (under the module prefix) <-> ours, and whether upstream adds a lead dim
_KEY_MAP = (
    ("_codebook.embed", "codebook", True),
    ("_codebook.embed_avg", "embed_sum", True),
    ("_codebook.cluster_size", "cluster_size", True),
    ("_codebook.initted", "initted", False),
)


class LossBreakdown(tuple):
    """``(commitment, codebook_diversity, orthogonal_reg, inplace_optimize)`` as upstream."""

    def __new__(cls, commitment, codebook_diversity, orthogonal_reg, inplace_optimize):
        return super().__new__(cls, (commitment, codebook_diversity, orthogonal_reg, inplace_optimize))

    commitment = property(lambda self: self[0])
    codebook_diversity = property(lambda self: self[1])
    orthogonal_reg = property(lambda self: self[2])
    inplace_optimize = property(lambda self: self[3])


def _unsupported(name: str, why: str = "") -> NotImplementedError:
    msg = f"vqkernels.compat.VectorQuantize does not support {name}"
    return NotImplementedError(msg + (f" ({why})" if why else ""))


class VectorQuantize(VectorQuantizer):
    """vector-quantize-pytorch's ``VectorQuantize`` on fused kernels (see the module docs for the
    supported subset).  Extra keywords: ``backend``, ``check_inputs`` (as VectorQuantizer).

    Forward: ``quantized, indices, loss = vq(x, mask=None, lens=None)``

    * ``x``: ``[B, N, D]`` (``channel_last``), ``[B, D, N]`` (``channel_last=False``),
      ``[B, D, H, W]`` (``accept_image_fmap``), ``[B, D, T, H, W]`` (``accept_3d_fmap``) or ``[B, D]``.
    * ``quantized``: like ``x``; ``indices``: int64 without the channel dim (``-1`` where masked);
      ``loss``: ``[] float32``, ``commitment_weight·mse`` in training, ``0`` in eval.
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
        check_inputs: bool = True,
    ) -> None:
        del orthogonal_reg_active_codes_only, orthogonal_reg_max_codes  # only with orthogonal reg
        del codebook_diversity_temperature, sample_codebook_temp  # only with those losses/sampling
        del directional_reparam_variance, sync_affine_param, affine_param_batch_decay
        del affine_param_codebook_decay, manual_in_place_optimizer_update
        checks = (
            ("heads", heads != 1, "only heads=1"),
            ("separate_codebook_per_head", bool(separate_codebook_per_head), ""),
            ("layernorm_after_project_in", bool(layernorm_after_project_in), ""),
            ("commitment_use_cross_entropy_loss", bool(commitment_use_cross_entropy_loss), ""),
            ("orthogonal_reg_weight", orthogonal_reg_weight > 0, "orthogonal regularization"),
            ("codebook_diversity_loss_weight", codebook_diversity_loss_weight > 0, ""),
            ("stochastic_sample_codes", bool(stochastic_sample_codes), "gumbel sampling"),
            ("straight_through", bool(straight_through), "gumbel straight-through"),
            ("directional_reparam", bool(directional_reparam), ""),
            ("ema_update", ema_update is False, "a frozen or gradient-only codebook"),
            ("vq_bridge", vq_bridge is not None, ""),
            ("manual_ema_update", bool(manual_ema_update), ""),
            ("learnable_codebook", bool(learnable_codebook), "use vqkernels.nn.VectorQuantizer"),
            ("in_place_codebook_optimizer", in_place_codebook_optimizer is not None, ""),
            ("affine_param", bool(affine_param), ""),
            ("sync_update_v", sync_update_v > 0, ""),
            ("route_gradients_to_input", not route_gradients_to_input, "only True"),
            ("sync_kmeans", not sync_kmeans, "k-means is always synced when the codebook is"),
        )
        for name, bad, why in checks:
            if bad:
                raise _unsupported(name, why)
        if rotation_trick or (rotation_trick is None and dim > 1):
            raise _unsupported(
                "rotation_trick",
                "upstream's default rotation_trick=None enables it for dim > 1; "
                "pass rotation_trick=False for the straight-through estimator",
            )
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap are mutually exclusive")
        self.channel_last = bool(channel_last)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.accept_3d_fmap = bool(accept_3d_fmap)
        channel_first = self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last
        super().__init__(
            dim,
            codebook_size,
            codebook_dim=codebook_dim,
            metric="cosine" if use_cosine_sim else "l2",
            l2_normalize=bool(use_cosine_sim),
            learnable_codebook=False,
            decay=decay,
            eps=eps,
            commitment_weight=commitment_weight,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            kmeans_seeding="random",
            threshold_ema_dead_code=float(threshold_ema_dead_code),
            channel_dim=1 if channel_first else -1,
            sync_distributed=sync_codebook,
            backend=backend,
            check_inputs=check_inputs,
        )
        self.use_cosine_sim = bool(use_cosine_sim)
        self.heads = 1
        self.freeze_codebook = bool(freeze_codebook)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.register_state_dict_post_hook(_to_upstream_keys)

    # ---------------------------------------------------------------------- state_dict layout

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for theirs, ours, lead in _KEY_MAP:
            key = prefix + theirs
            if key in state_dict:
                t = state_dict.pop(key)
                state_dict[prefix + ours] = t[0] if lead and t.dim() > 0 else t
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------- upstream API

    @property
    def ema_update(self) -> bool:
        return True

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices: [B, ...]`` -> codes in codebook space ``[B, ..., codebook_dim]`` (channel-first
        ``[B, codebook_dim, ...]`` for feature-map/channel-first layouts), as upstream."""
        codes = self.codebook[indices]
        if self.channel_dim == 1:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes after ``project_out`` (output space), in the input layout."""
        codes = self.codebook[indices]
        if self.project_out is not None:
            codes = self.project_out(codes)
        if self.channel_dim == 1:
            codes = codes.movedim(-1, 1)
        return codes

    def _set_kmeans_state(self, centers: torch.Tensor, counts: torch.Tensor) -> None:
        # Upstream: embed_avg = means·bins, cluster_size = bins, then the EMA normalisation
        # (so codes whose final bin is empty become 0, exactly as there).
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centers * counts.unsqueeze(1))
        n = counts.sum()
        k = counts.shape[0]
        smoothed = (counts + self.eps) / (n + k * self.eps) * n
        cb = self.embed_sum / smoothed.unsqueeze(1)
        if self.l2_normalize:
            cb = F.normalize(cb, dim=-1)
        self.codebook.copy_(cb)

    # ---------------------------------------------------------------------- forward

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
        del sample_codebook_temp  # only used by stochastic sampling (unsupported)
        for name, bad in (
            ("indices", indices is not None),
            ("topk", topk is not None),
            ("codebook_transform_fn", codebook_transform_fn is not None),
            ("ema_update_weight", ema_update_weight is not None),
            ("accum_ema_update", bool(accum_ema_update)),
            ("ema_update", ema_update is False),
        ):
            if bad:
                raise _unsupported(f"forward({name}=...)")
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        only_one = x.dim() == 2
        if only_one and (mask is not None or lens is not None):
            raise ValueError("mask/lens need a sequence dim; x has shape [B, D]")
        xs = x.unsqueeze(1) if only_one else x
        if lens is not None:
            mask = torch.arange(xs.shape[1], device=xs.device) < lens.to(xs.device).unsqueeze(1)
        fmap = self.accept_image_fmap or self.accept_3d_fmap
        if fmap and mask is not None:
            raise ValueError("mask is not supported with accept_image_fmap/accept_3d_fmap")
        expect = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else 3
        if xs.dim() != expect:
            raise ValueError(f"x must have {expect if not only_one else 2} dims, got {tuple(x.shape)}")
        # to channel-last [B, ..., D]
        if self.channel_dim == 1 and not only_one:
            x_cl = self._to_channel_last(xs)
        else:
            x_cl = xs
            if x_cl.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"x must be float32, bfloat16 or float16, got {x_cl.dtype}")
            if x_cl.shape[-1] != self.dim:
                raise ValueError(f"x must have dim={self.dim} features, got shape {tuple(x.shape)}")
        valid = self._check_mask(mask, x_cl.shape[:-1], x_cl.device)
        h = self._project_in(x_cl)
        training = self.training
        with torch.autocast(x.device.type, enabled=False):
            flat = h.reshape(-1, self.codebook_dim).float()
            if self.use_cosine_sim:
                flat = F.normalize(flat, dim=-1, eps=1e-6)
            self._check_values(flat)
            if not self._initted_py:  # upstream initializes on the first forward, in any mode
                self._kmeans_init_flat(flat.detach(), valid)
            update = training and not freeze
            cb = self.codebook.clone() if update else self.codebook
            check = False  # checked once above
            fused_loss = training and valid is None and self.commitment_weight > 0
            q, idx, loss = vqf.quantize(
                flat, cb, self.commitment_weight if fused_loss else 0.0, self.metric,
                codebook_loss=False, backend=self.backend, check_inputs=check,
            )
            commit = loss / self.commitment_weight if fused_loss else loss.new_zeros(())
            if training and valid is not None and self.commitment_weight > 0:
                # upstream: mse(q, raw input) over the unmasked rows (see module docs)
                ref = x_cl if self.codebook_dim == self.dim else flat.reshape(h.shape)
                ref = ref.reshape(-1, ref.shape[-1]).float()
                sq = ((q.detach() - ref) ** 2).sum(dim=1)
                denom = (valid.sum() * ref.shape[-1]).clamp_min(1).float()
                commit = (sq * valid.float()).sum() / denom
                loss = commit * self.commitment_weight
            if not training:
                loss = loss.new_zeros(())
            if update:
                with torch.no_grad():
                    self._update_state(flat.detach(), idx, valid)
        q = q.reshape(h.shape).to(h.dtype)
        if self.project_out is not None:
            q = self.project_out(q)
        q = q.to(x.dtype)
        idx = idx.reshape(x_cl.shape[:-1])
        if valid is not None:
            m = valid.reshape(x_cl.shape[:-1])
            fill = torch.zeros_like(q) if self.return_zeros_for_masked_padding else x_cl
            q = torch.where(m.unsqueeze(-1), q, fill)
            idx = torch.where(m, idx, torch.full_like(idx, -1))
        if self.channel_dim == 1 and not only_one:
            q = self._from_channel_last(q)
        if only_one:
            q, idx = q.squeeze(1), idx.squeeze(1)
        if return_loss_breakdown:
            zero = loss.new_zeros(())
            return q, idx, loss, LossBreakdown(commit, zero, zero, zero)
        return q, idx, loss


def _to_upstream_keys(module, state_dict, prefix, local_metadata) -> None:
    for theirs, ours, lead in _KEY_MAP:
        key = prefix + ours
        if key in state_dict:
            t = state_dict.pop(key)
            state_dict[prefix + theirs] = t.unsqueeze(0) if lead else t
