"""``Codebook``: the ``_codebook`` sub-module of the ``VectorQuantize`` drop-in, with LR 1.32's
buffers (``initted``, ``cluster_size [H, K]``, ``embed_avg [H, K, D]``, ``embed [H, K, D]`` buffer
or Parameter, the affine buffers, ``vq_bridge``) so checkpoints load strictly both ways.

What runs fused (vqkernels ops, no ``[N, K]`` matrix, no one-hot):
* the search: one ``nearest_code`` call for all codebooks (``[H, K, d]`` codebooks when H > 1;
  ``"l2"``: the argmin of ``‖c‖² − 2x·c`` equals LR's argmax of ``-cdist``; ``"cosine"`` for LR's cosine codebooks, whose codes are unit vectors);
* the EMA statistics: one ``cluster_stats`` call (counts and sums per code, per head),
  then LR's own blend arithmetic (``lerp_`` by ``(1 - decay)·weight``, Laplace smoothing).
Stochastic sampling (LR's exact draws; the fused Gumbel-max of ``nearest_code`` with
``fused_sampling=True``) and searches against a non-normalized code set under a dot product
(cosine + ``vq_bridge``) use the chunked PyTorch search of :mod:`._streamed`.

Random draws (k-means seeds, dead-code replacements) call the torch generator with LR's calls in
LR's order (``randperm``/``randint`` of the same sizes), so the same seed gives the same codebooks.
Multi-rank sampling (``use_ddp``) draws on rank 0 from its local batch and broadcasts (LR gathers
per-rank samples in multinomial proportions): a valid k-means/dead-code seed, not LR's draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed as vqdist
from ... import functional as vqf
from . import _streamed
from ._affine import AffineParams


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1, eps=1e-6)


def _sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    # LR's sample_vectors, same generator calls
    n = samples.shape[0]
    if n >= num:
        idx = torch.randperm(n, device=samples.device)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device)
    return samples[idx]


def _kaiming_uniform(*shape) -> torch.Tensor:
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t)
    return t


def _heads_view(flat: torch.Tensor, codes: torch.Tensor):
    """``flat: [H, N, d]``, ``codes: [H, K, d]`` -> the op's layout: ``([N, d], [K, d])`` for one
    codebook, ``([N, H, d]`` (a transposed view), ``[H, K, d])`` for H codebooks (one call)."""
    if codes.shape[0] == 1:
        return flat[0], codes[0]
    return flat.transpose(0, 1), codes


def _lr_nearest(flat: torch.Tensor, codes: torch.Tensor, metric: str, backend: str) -> torch.Tensor:
    """Fused nearest-code search with LR's tie semantics: ``flat: [H, N, d]``, ``codes:
    [H, K, d]`` -> ``[H, N] int64``, every head in one op call (``[H, K, d]`` codebooks).

    LR picks ``argmax(-sqrt(clamp(‖x‖² + ‖c‖² − 2x·c, 1e-8)))``: every code closer than 1e-4
    ties, and the lowest index wins.  That happens in earnest in residual stacks (a k-means code
    equal to a batch vector leaves a ~1e-5 residual, and later depths see many near-zero vectors
    and codes).  The fused search returns the exact nearest code and its squared distance; rows
    whose best distance is below 1e-6 (a superset of LR's clamped region, allowing for rounding)
    are re-decided with LR's own formula over all codes — only those rows, so O(rows·K)."""
    x_op, codes_op = _heads_view(flat, codes)
    if metric != "l2":
        idx = vqf.nearest_code(x_op, codes_op, metric, backend=backend, check_inputs=False)
        return idx.unsqueeze(0) if codes.shape[0] == 1 else idx.t()
    idx, dist = vqf.nearest_code(x_op, codes_op, "l2", return_distance=True, backend=backend,
                                 check_inputs=False)
    if codes.shape[0] == 1:
        idx, dist = idx.unsqueeze(0), dist.unsqueeze(0)
    else:
        idx, dist = idx.t(), dist.t()  # [N, H] -> [H, N]
    _redecide_near_rows_(idx, dist < 1e-6, flat, codes)
    return idx


def _redecide_near_rows_(idx: torch.Tensor, near: torch.Tensor, flat: torch.Tensor,
                         codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite ``idx[h, n]`` where ``near[h, n]`` with LR's choice (its clamped ``-cdist``
    argmax, see :func:`_lr_nearest`); returns the (head, row) indices of those rows."""
    hs, ns = near.nonzero(as_tuple=True)
    if hs.numel() == 0:  # the usual case: no row near any code
        return hs, ns
    for h in hs.unique().tolist():
        rows = ns[hs == h]
        xr = flat[h, rows]
        # Rows that are exactly 0 (a residual equal to its code: common in residual stacks
        # once dead codes are resampled from the batch) all get the same answer: their logits
        # are -sqrt(clamp(0 + ‖c‖² − 2·0, 1e-8)) = -sqrt(clamp(‖c‖², 1e-8)) bit for bit (x·c = 0
        # exactly), so one [K] argmax replaces their [rows, K] GEMM.
        zero = ~xr.ne(0).any(dim=-1)
        if bool(zero.any()):
            e = codes[h]
            zero_choice = (-(e * e).sum(-1).clamp(min=1e-8).sqrt()).argmax()
            choice = zero_choice.expand(rows.shape[0]).clone()
            live = (~zero).nonzero().squeeze(-1)
            if live.numel():
                choice[live] = _streamed.logits(xr[live], e, "neg_cdist").argmax(dim=-1)
            idx[h, rows] = choice
        else:
            idx[h, rows] = _streamed.logits(xr, codes[h], "neg_cdist").argmax(dim=-1)
    return hs, ns


def _codes_are_unit(embed: torch.Tensor) -> bool:
    """Whether a cosine codebook's codes are unit vectors, as LR keeps them (l2-normalised at
    init, by k-means, dead-code replacement and the EMA update).  A user can still write raw codes
    (``vq.codebook = codes``, ``_codebook.embed.copy_``); LR then scores ``x̂·c`` against them and
    returns the raw code, which the fused ``"cosine"`` search (it normalises the codes) would not
    reproduce, so such codebooks take the ``"dot"`` stand-in.  O(K·d), a rounding margin of 1e-5."""
    norms = embed.detach().float().norm(dim=-1)
    return bool(((norms - 1.0).abs() <= 1e-5).all())


class Codebook(AffineParams, nn.Module):
    """LR's ``Codebook`` (euclidean and cosine) on fused kernels; arguments as LR's."""

    def __init__(
        self,
        dim,
        codebook_size,
        num_codebooks=1,
        kmeans_init=False,
        kmeans_iters=10,
        sync_kmeans=True,
        decay=0.8,
        eps=1e-5,
        threshold_ema_dead_code=2,
        reset_cluster_size=None,
        use_ddp=False,
        learnable_codebook=False,
        stochastic_sample_codes=False,
        straight_through=False,
        sample_codebook_temp=1.0,
        ema_update=True,
        manual_ema_update=False,
        affine_param=False,
        sync_affine_param=False,
        affine_param_batch_decay=0.99,
        affine_param_codebook_decay=0.9,
        use_cosine_sim=False,
        vq_bridge=None,
        backend="auto",
        fused_sampling=False,
    ):
        super().__init__()
        self.fused_sampling = bool(fused_sampling)
        self.transform_input = _l2norm if use_cosine_sim else (lambda t: t)
        self.decay = decay
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = _kaiming_uniform(num_codebooks, codebook_size, dim)
            if use_cosine_sim:
                embed = _l2norm(embed)
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.kmeans_iters = kmeans_iters
        self.eps = eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.has_dead_code_replacement = threshold_ema_dead_code > 0
        self.reset_cluster_size = threshold_ema_dead_code if reset_cluster_size is None else reset_cluster_size
        self.stochastic_sample_codes = bool(stochastic_sample_codes)
        self.straight_through = bool(straight_through)
        self.sample_codebook_temp = sample_codebook_temp
        self.use_ddp = bool(use_ddp)
        self.sync_kmeans = bool(sync_kmeans)
        self.backend = backend
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.learnable_codebook = learnable_codebook
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.use_cosine_sim = use_cosine_sim
        self.vq_bridge = vq_bridge
        self.affine_param = affine_param
        self.sync_affine_param = sync_affine_param
        if not affine_param:
            return
        self.affine_param_batch_decay = affine_param_batch_decay
        self.affine_param_codebook_decay = affine_param_codebook_decay
        # as LR: the batch statistics appear in the state_dict after the first forward
        self.register_buffer("batch_mean", None)
        self.register_buffer("batch_variance", None)
        self.register_buffer("codebook_mean_needs_init", torch.tensor(True))
        self.register_buffer("codebook_mean", torch.empty(num_codebooks, 1, dim))
        self.register_buffer("codebook_variance_needs_init", torch.tensor(True))
        self.register_buffer("codebook_variance", torch.empty(num_codebooks, 1, dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the affine batch statistics are None until the first forward (LR registers them then)
        if self.affine_param:
            for name in ("batch_mean", "batch_variance"):
                if getattr(self, name) is None and prefix + name in state_dict:
                    self.register_buffer(name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ sync helpers

    def _all_reduce(self, *ts):
        if self.use_ddp:
            vqdist.all_reduce_sum_(*ts)

    def _sample(self, samples: torch.Tensor, num: int, sync: bool) -> torch.Tensor:
        if not (sync and self.use_ddp and vqdist.world_size() > 1):
            return _sample_vectors(samples, num)
        # rank 0 draws from its batch, every rank takes the same vectors (see module docs)
        out = (
            _sample_vectors(samples, num)
            if vqdist.rank() == 0
            else samples.new_empty(num, samples.shape[-1])
        )
        vqdist.broadcast_from_root_(out)
        return out

    # ------------------------------------------------------------------ search

    def _metric(self, embed_is_unit: bool) -> str | None:
        if not self.use_cosine_sim:
            return "l2"
        return "cosine" if embed_is_unit else None

    def search(self, flat: torch.Tensor, embed: torch.Tensor, temperature: float, training: bool,
               embed_is_unit: bool) -> torch.Tensor:
        """``flat: [H, N, d]``, ``embed: [H, K, d]`` -> ``[H, N] int64`` (LR's gumbel_sample index)."""
        kind = "dot" if self.use_cosine_sim else "neg_cdist"
        metric = self._metric(embed_is_unit)
        stochastic = training and self.stochastic_sample_codes and temperature > 0
        if not (stochastic or metric is None):
            return _lr_nearest(flat.detach(), embed.detach().contiguous(), metric, self.backend)
        if stochastic and metric is not None and self.fused_sampling:
            # nearest_code's fused Gumbel-max with LR's logits (-cdist, non-squared, for l2; the
            # cosine similarity for cosine): LR's distribution, O(1) memory per row, one call
            # for every head — but counter-hash noise, not LR's torch draws (hence opt-in)
            x_op, codes_op = _heads_view(flat.detach(), embed.detach().contiguous())
            idx = vqf.nearest_code(x_op, codes_op, metric, sample_temperature=float(temperature),
                                   backend=self.backend, check_inputs=False)
            return idx.unsqueeze(0) if embed.shape[0] == 1 else idx.t()
        # Default stand-in (chunked PyTorch): LR's gumbel_sample noise drawn from the torch
        # generator with LR's calls, so a seed gives LR's exact codes (tests compare them); the
        # fused op's counter-based noise cannot reproduce those draws.  Also the only way for a
        # dot product against non-normalized codes (cosine + vq_bridge), which the op lacks.
        out = []
        for h in range(flat.shape[0]):
            e = embed[h].detach()
            out.append(_streamed.sample_codes(flat[h].detach(), e, kind, temperature, stochastic))
        return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)

    def can_fuse_rotation(self, temperature: float) -> bool:
        """Whether a training step's search + codes + rotation-trick gradient can be one fused
        ``quantize(..., estimator="rotation")`` call: a deterministic search (no Gumbel sampling)
        over a non-learnable code set (the op's codes carry no codebook gradient; LR's learnable
        codebook gets one through its commitment loss) under ``"l2"`` or unit-code ``"cosine"``."""
        stochastic = self.stochastic_sample_codes and temperature > 0
        if stochastic or self.learnable_codebook or self.vq_bridge is not None:
            return False
        # last: the unit-code check reads the codebook (a host sync on a GPU), and the forward's
        # search asks it again whenever this returns False
        return not self.use_cosine_sim or _codes_are_unit(self.embed)

    def rotation_quantize(self, flat: torch.Tensor, embed: torch.Tensor):
        """``flat: [H, N, d]`` (differentiable), ``embed: [H, K, d]`` -> ``(quantize [H, N, d],
        embed_ind [H, N])``: one fused ``quantize(..., estimator="rotation")`` call for every head
        (search, codes, LR's O(d) rotation gradient to ``flat``).  The value is exactly the codes
        (LR's pre-rotation ``quantize``; the layer patches LR's clamped value on ‖x‖ < 1e-6 rows).

        LR's ties (see :func:`_lr_nearest`): rows within 1e-6 (squared) of their code, plus a
        rounding margin, are re-decided with LR's formula; where that changes the code, the row's
        output is rebuilt from LR's code with the PyTorch rotation (rare: near-zero residuals)."""
        metric = self._metric(True)
        codes = embed.detach().contiguous()
        x_op, codes_op = _heads_view(flat, codes)
        q, idx, _ = vqf.quantize(x_op, codes_op, beta=0.0, metric=metric, estimator="rotation",
                                 codebook_loss=False, backend=self.backend, check_inputs=False)
        if codes.shape[0] == 1:
            q, idx = q.unsqueeze(0), idx.unsqueeze(0)
        else:
            q, idx = q.transpose(0, 1), idx.t()  # [N, H, ...] -> [H, N, ...]
        if metric != "l2":
            return q, idx
        xd, qd = flat.detach(), q.detach()
        xx, qq = _streamed.rowdot(xd, xd), _streamed.rowdot(qd, qd)
        # ‖x − q‖² from row dot products (no [N, d] temporary); the margin covers their rounding
        # (a few ulp of ‖x‖² + ‖q‖²), so every row LR could decide differently is re-decided
        near = (xx + qq - 2.0 * _streamed.rowdot(xd, qd)) < 1e-6 + 1e-6 * (xx + qq)
        if not bool(near.any()):
            return q, idx
        before = idx[near]
        idx = idx.clone()  # the op saved its indices for the backward
        hs, ns = _redecide_near_rows_(idx, near, xd, codes)
        changed = idx[hs, ns] != before
        if bool(changed.any()):
            hs, ns = hs[changed], ns[changed]
            fixed = _streamed.rotate_to_code(flat[hs, ns], codes[hs, idx[hs, ns]])
            q = q.index_put((hs, ns), fixed)
        return q, idx

    # ------------------------------------------------------------------ k-means init

    @torch.no_grad()
    def init_embed_(self, data: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if bool(self.initted):
            return
        if mask is not None:
            c = data.shape[0]
            data = data[mask].reshape(c, -1, data.shape[-1])
        num_samples = data.shape[-2]
        if num_samples < self.codebook_size:
            import warnings

            warnings.warn(
                f"k-means init received {num_samples} vectors for a codebook of "
                f"{self.codebook_size} - duplicates will be sampled", RuntimeWarning, stacklevel=3,
            )
        sync = self.sync_kmeans
        means = torch.stack([self._sample(s, self.codebook_size, sync) for s in data.unbind(0)])
        # Assignments with LR's own formula (row chunks, never N x K): k-means runs once, and
        # in residual stacks its data are degenerate — with many near-zero residuals, every
        # vector is almost equidistant from the near-zero centers and the last ulp of the
        # distance decides; LR's rounding is the only way to reproduce LR's centers there.
        kind = "dot" if self.use_cosine_sim else "neg_cdist"
        k = self.codebook_size
        bins = torch.zeros(data.shape[0], k, device=data.device)
        for _ in range(self.kmeans_iters):
            new = []
            for h in range(data.shape[0]):
                idx = _streamed.sample_codes(data[h], means[h], kind, 1.0, False)
                # Sums by scatter_add in row order, exactly LR's accumulation: k-means runs once,
                # and bit-identical centers matter downstream — a k-means code equal to a batch
                # vector leaves a ~1e-5 residual whose next-depth k-means is chaotic in the last
                # ulp, so any other summation order gives a different residual codebook.
                counts = torch.zeros(k, device=data.device).index_put_((idx,), torch.ones_like(idx, dtype=torch.float32), accumulate=True)
                sums = torch.zeros(k, data.shape[-1], device=data.device, dtype=data.dtype)
                sums.scatter_add_(0, idx[:, None].expand(-1, data.shape[-1]), data[h])
                if sync:
                    self._all_reduce(counts)
                bins[h] = counts
                m = sums / counts.clamp_min(1.0).unsqueeze(1)
                if sync:
                    self._all_reduce(m)  # LR all-reduces the per-rank means (a sum), as here
                if self.use_cosine_sim:
                    m = _l2norm(m)
                new.append(torch.where((counts == 0).unsqueeze(1), means[h], m))
            means = torch.stack(new)
        # LR: the returned sizes are those of the last assignment (before its mean update)
        self.embed_avg.data.copy_(means * bins.unsqueeze(-1))
        self.cluster_size.data.copy_(bins)
        self.update_ema()
        self.initted.data.copy_(torch.tensor(True))

    # ------------------------------------------------------------------ dead codes

    @torch.no_grad()
    def replace(self, batch_samples, batch_mask, seq_mask=None):
        if self.use_cosine_sim:
            batch_samples = _l2norm(batch_samples)
        for ind, (samples, mask) in enumerate(zip(batch_samples, batch_mask)):
            if seq_mask is not None:
                samples = samples[seq_mask[ind]]
            if samples.numel() == 0:
                continue
            num_samples = samples.shape[0]
            num_dead = int(mask.sum())
            local = not (self.use_ddp and self.sync_kmeans)
            if local and num_dead > num_samples:
                # more dead codes than samples: replace a random subset now (LR), the rest later
                dead = mask.nonzero(as_tuple=True)[0]
                dead = dead[torch.randperm(num_dead, device=samples.device)[:num_samples]]
                mask = torch.zeros_like(mask)
                mask[dead] = True
                num_dead = num_samples
            sampled = self._sample(samples, num_dead, sync=not local).to(self.embed.data)
            self.embed.data[ind][mask] = sampled
            self.cluster_size.data[ind][mask] = self.reset_cluster_size
            self.embed_avg.data[ind][mask] = sampled * self.reset_cluster_size

    def expire_codes_(self, batch_samples, seq_mask=None):
        if not self.has_dead_code_replacement or not self.training:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        if not bool(expired.any()):
            return
        batch_samples = batch_samples.reshape(batch_samples.shape[0], -1, batch_samples.shape[-1])
        self.replace(batch_samples, batch_mask=expired, seq_mask=seq_mask)

    # ------------------------------------------------------------------ EMA

    @torch.no_grad()
    def update_ema(self):
        cs = self.cluster_size
        total = cs.sum(dim=-1, keepdim=True)
        smoothed = (cs + self.eps) / (total + self.codebook_size * self.eps) * total
        embed = self.embed_avg / smoothed.unsqueeze(-1)
        if self.use_cosine_sim:
            embed = _l2norm(embed)
        self.embed.data.copy_(embed)

    @staticmethod
    def _ema_inplace(old, new, decay, weight=None):
        # LR's ema_inplace: accumulated statistics (accum_ema_update) ride in old.grad
        if old.grad is not None:
            new.add_(old.grad)
            old.grad = None
        weight = 1.0 if weight is None else weight
        if isinstance(weight, torch.Tensor):
            if weight.ndim == 1:
                weight = weight.unsqueeze(0)
            weight = weight.reshape(*weight.shape, *((1,) * (old.ndim - weight.ndim)))
        old.data.lerp_(new.to(old), (1.0 - decay) * weight)

    @torch.no_grad()
    def track_cluster_size_and_embed_avg(self, flatten, embed_ind, mask=None, ema_update_weight=None,
                                         accum_ema_update=False):
        """``flatten: [H, N, d]``, ``embed_ind: [H, N]`` (``mask: [H, N]``) -> EMA of the per-code
        counts and sums (fused ``cluster_stats``; masked rows get index -1 = ignored)."""
        flatten = flatten.float()
        if self.affine_param:
            cstd, bstd = self._affine_stds()
            flatten = (flatten - self.batch_mean) * (cstd / bstd) + self.codebook_mean
        if mask is not None:
            embed_ind = embed_ind.masked_fill(~mask, -1)
        heads = flatten.shape[0]
        if heads == 1:
            cluster_size, embed_sum = vqf.cluster_stats(flatten[0], embed_ind[0], self.codebook_size,
                                                        backend=self.backend, check_inputs=False)
            cluster_size, embed_sum = cluster_size.unsqueeze(0), embed_sum.unsqueeze(0)
        else:  # every codebook in one op call: x [N, H, d] (a view), indices [N, H]
            cluster_size, embed_sum = vqf.cluster_stats(
                flatten.transpose(0, 1), embed_ind.t(), self.codebook_size, heads=heads,
                backend=self.backend, check_inputs=False,
            )
        self._all_reduce(cluster_size, embed_sum)
        if callable(ema_update_weight):
            ema_update_weight = ema_update_weight(embed_sum, cluster_size)
        if accum_ema_update:
            for old, new in ((self.cluster_size, cluster_size), (self.embed_avg, embed_sum)):
                if old.grad is not None:
                    old.grad.add_(new)
                else:
                    old.grad = new.clone()
        else:
            self._ema_inplace(self.cluster_size, cluster_size, self.decay, ema_update_weight)
            self._ema_inplace(self.embed_avg, embed_sum, self.decay, ema_update_weight)

    def update_codebook(self, flatten, embed_ind, mask=None, ema_update_weight=None,
                        accum_ema_update=False, ema_update=None):
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        self.track_cluster_size_and_embed_avg(flatten, embed_ind, mask, ema_update_weight, accum_ema_update)
        if accum_ema_update:
            return
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        self.expire_codes_(flatten, seq_mask=mask)

    @staticmethod
    def _expand_mask(mask, flatten):
        # LR: repeat(mask, 'b n -> c (b h n)'), h = rows per (b, n) (shared-codebook heads)
        b, n = mask.shape
        h = flatten.shape[-2] // (b * n)
        return mask.repeat_interleave(h, dim=0).reshape(b, h, n).reshape(1, -1).expand(flatten.shape[0], -1)

    def update_indices(self, x, embed_ind, mask=None, ema_update_weight=None, accum_ema_update=False,
                       ema_update=None):
        """LR's ``update_indices``: the EMA/dead-code update from given indices (``-1`` -> code 0)."""
        x = x.float()
        if x.ndim < 4:
            x, embed_ind = x.unsqueeze(0), embed_ind.unsqueeze(0)
        flatten = x.reshape(x.shape[0], -1, x.shape[-1])
        if mask is not None:
            mask = self._expand_mask(mask, flatten)
        embed_ind = embed_ind.reshape(embed_ind.shape[0], -1)
        embed_ind = embed_ind.masked_fill(embed_ind == -1, 0)
        self.update_codebook(flatten, embed_ind, mask=mask, ema_update_weight=ema_update_weight,
                             accum_ema_update=accum_ema_update, ema_update=ema_update)

    update_ema_indices = update_indices

    # ------------------------------------------------------------------ forward

    def effective_embed(self):
        """The code set searched and returned: ``[H, K, d]`` (bridge / affine applied)."""
        embed = self.embed if self.learnable_codebook else self.embed.detach()
        embed = embed.float()
        if self.vq_bridge is not None:
            embed = self.vq_bridge(embed)
        if self.affine_param:
            cstd, bstd = self._affine_stds()
            embed = (embed - self.codebook_mean) * (bstd / cstd) + self.batch_mean
        return embed

    # LR's Codebook.forward runs with CUDA autocast off (``@autocast('cuda', enabled=False)``):
    # its k-means, distances and Gumbel logits stay fp32 under mixed-precision training; ours
    # must too, or its k-means and PyTorch stand-ins would run in half precision there.  CPU
    # autocast too: LR's guard names only 'cuda', so under CPU autocast parts of LR's search run
    # in bf16 (its codes then move with the autocast setting); ours keeps LR's fp32 decisions.
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, x, sample_codebook_temp=None, mask=None, freeze_codebook=False,
                ema_update_weight=None, accum_ema_update=False, ema_update=None, update_usage=True,
                keep_embed=False, codebook_transform_fn=None, fused_rotation=False):
        """``x: [b, n, d]`` or ``[H, b, n, d]`` (float) -> ``(quantize like x (fp32), embed_ind
        [b, n] / [H, b, n], flatten [H, N, d], embed [H, K, d], mask [H, N] or None, dist)``; the
        middle three let the layer compute LR's distance-based losses chunk by chunk; ``keep_embed``
        snapshots the searched codes when the EMA update below would overwrite them in place.
        ``dist`` is ``None`` except with ``codebook_transform_fn`` (implicit neural codebooks: a
        codebook per row, ``[H, N, K, d]``, inherent to the method), where it is LR's ``[H, N, K]``
        logits and the search runs in plain PyTorch.  ``fused_rotation`` (the layer checked
        :meth:`can_fuse_rotation`): ``quantize`` already carries the rotation-trick gradient."""
        ema_update = self.ema_update if ema_update is None else ema_update
        temp = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        needs_codebook_dim = x.ndim < 4
        x = x.float()
        if needs_codebook_dim:
            x = x.unsqueeze(0)
        lead = x.shape[:-1]
        flatten = x.reshape(x.shape[0], -1, x.shape[-1])
        if mask is not None:
            mask = self._expand_mask(mask, flatten)
        self.init_embed_(flatten.detach(), mask=mask)
        if self.affine_param:
            self.update_affine(flatten.detach(), self.embed.detach(), mask=mask)
        embed = self.effective_embed()
        # the fused quantize saves the codes for its backward: keep them from this step's update
        if (keep_embed or fused_rotation) and embed.data_ptr() == self.embed.data_ptr():
            # differentiable copy (a learnable codebook keeps its gradient); also when this step
            # does not update: a later forward may, before this step's backward reads the codes
            embed = embed.clone()
        dist = None
        if codebook_transform_fn is not None:
            quantize, embed_ind, dist = self._transformed_lookup(flatten, embed, codebook_transform_fn, temp)
        elif fused_rotation:
            quantize, embed_ind = self.rotation_quantize(flatten, embed)
        else:
            unit = self.use_cosine_sim and self.vq_bridge is None and _codes_are_unit(embed)
            embed_ind = self.search(flatten, embed, temp, self.training, unit)
            # gather = LR's one-hot @ embed (same values, same gradient to a learnable codebook)
            # (one codebook: unsqueeze, not stack, so the [N, d] codes are not copied again)
            heads = embed.shape[0]
            quantize = (F.embedding(embed_ind[0], embed[0]).unsqueeze(0) if heads == 1 else
                        torch.stack([F.embedding(embed_ind[h], embed[h]) for h in range(heads)]))
        if dist is None and self.training and self.straight_through and temp > 0:
            # LR's Gumbel straight-through: one_hot + π − sg(π) with π = softmax(logits/τ), i.e.
            # the soft codes Σ_k π_k c_k, on the fused soft_quantize (never N x K); LR's logits:
            # -cdist ("euclidean") or x·c of the already normalized rows and codes ("dot")
            metric = "dot" if self.use_cosine_sim else "euclidean"
            soft = torch.stack([
                vqf.soft_quantize(flatten[h], embed[h], float(temp), metric, backend=self.backend,
                                  check_inputs=False)
                for h in range(embed.shape[0])
            ])
            quantize = quantize + soft - soft.detach()
        if self.training and update_usage and not freeze_codebook:
            self.update_codebook(flatten.detach(), embed_ind, mask=mask, ema_update_weight=ema_update_weight,
                                 accum_ema_update=accum_ema_update, ema_update=ema_update)
        quantize = quantize.reshape(*lead, quantize.shape[-1])
        embed_ind = embed_ind.reshape(lead)
        if needs_codebook_dim:
            quantize, embed_ind = quantize[0], embed_ind[0]
        return quantize, embed_ind, flatten, embed, mask, dist

    def _transformed_lookup(self, flatten, embed, fn, temp):
        """LR's implicit-neural-codebook branch: ``fn(embed) -> [H, b, n, K, d]`` per-row codes."""
        h, n = flatten.shape[:2]
        t = fn(embed)
        t = t.reshape(h, n, t.shape[-2], t.shape[-1])
        if self.use_cosine_sim:
            t = _l2norm(t)
            dist = torch.einsum("hnd,hncd->hnc", flatten, t)
        else:
            dist = -F.pairwise_distance(flatten.unsqueeze(-2), t)  # LR: ‖x − c + 1e-6‖
        logits = dist
        stochastic = self.training and self.stochastic_sample_codes and temp > 0
        if stochastic:
            u = torch.zeros_like(dist).uniform_(0, 1)
            logits = dist / temp - torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))
        embed_ind = logits.detach().argmax(dim=-1)
        quantize = t.gather(-2, embed_ind[..., None, None].expand(h, n, 1, t.shape[-1])).squeeze(-2)
        if self.training and self.straight_through and temp > 0:
            soft = torch.einsum("hnc,hncd->hnd", (dist / temp).softmax(-1), t)
            quantize = quantize + soft - soft.detach()
        return quantize, embed_ind, dist
