"""Drop-in vector-quantization layers built on the fused ops.

``VectorQuantizer``          one codebook: EMA (default) or learned by gradient, k-means init, dead-code
                             restart, low-dimensional lookup, masks, perplexity / usage statistics.

Everything runs on :mod:`vqkernels.functional` (``quantize``, ``nearest_code``, ``cluster_stats``,
``ema_update_``, ``ema_blend_``); no N x K matrix is built by this module (the ``reference``
backend builds one inside the op, the fused backends do not).

Numerics and precision
----------------------
* The search, the losses and every EMA statistic are computed in **fp32**, whatever the input
  dtype, also under ``torch.autocast`` (the layer disables autocast around the ops).  A half
  precision input is upcast once (an ``[N, D]`` copy, small next to the search): this rules out
  overflow of ``‖x‖²`` or of ``x·c`` for large-norm fp16 inputs (``65504`` is reached by a 64-dim
  vector of norm ~256), so no NaN/Inf appears.  ``quantized`` is returned in the input dtype.
* The codebook, ``cluster_size`` and ``embed_sum`` are fp32 buffers (or an fp32 ``Parameter``).
* ``l2_normalize=True`` normalizes the (projected) inputs and the codes before the lookup; with an
  EMA codebook the codes are re-normalized in place after every update (as in
  vector-quantize-pytorch's cosine codebook), with a learnable one they are normalized in forward.

torch.compile
-------------
A training step (forward, loss, ``loss.backward()``, EMA update) of a model using the plain EMA
layer compiles with ``fullgraph=True`` (``tests/ops/test_compile.py``, ``cpu`` and ``reference``
backends; ``loss.backward()`` inside the compiled function needs
``torch._dynamo.config.trace_autograd_ops=True``).  The EMA update is a custom op that mutates the
module's buffers (or, on the reference backend, plain in-place PyTorch).  Under
``torch.compiler.is_compiling()``: input value checks are skipped (shape/dtype checks are static
and stay); usage/perplexity tracking and dead-code restarts run as tensor-only code (no host sync,
no data-dependent Python branch; the restarts also compile, with masks); k-means init does *not*
run (it is eager-only: run one eager training step first or call
:meth:`VectorQuantizer.init_codebook_`; a compiled forward on an un-initialized k-means layer
raises).  Distributed synchronisation is exercised eagerly only.

Distributed
-----------
Whether to synchronize is decided at *call* time: with ``sync_distributed=None`` the layer syncs
when ``torch.distributed`` is available, initialized and has more than one rank.  EMA: per-rank
``cluster_stats`` -> ``all_reduce(SUM)`` of counts and sums -> ``ema_blend_`` (identical on every
rank).  k-means: rank 0 seeds, broadcasts the seeds; Lloyd steps all-reduce the cluster
statistics.  Dead-code restarts: rank 0 picks the replacement vectors and broadcasts them.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch
from .. import distributed as vqdist
from .. import functional as vqf
from ._common import (
    _ChannelView,
    _counts_from_indices,
    _is_compiling,
    _require_float,
    _require_int,
    _smoothed_counts,
)
from ._entropy import codebook_entropy_loss

__all__ = ["VectorQuantizer"]

_METRICS = ("l2", "cosine")
_SEEDINGS = ("kmeans++", "random")
_KMEANSPP_ROUNDS = 128  # k-means++ seeding rounds (see VectorQuantizer._seed)


class VectorQuantizer(nn.Module):
    """Vector quantizer with an EMA (default) or learnable codebook, on fused kernels.

    Args:
        dim: feature size D of the input (the channel dim).
        codebook_size: number of codes K (>= 1).
        codebook_dim: size of the codes; when it differs from ``dim``, ``nn.Linear`` projections
            ``project_in: dim -> codebook_dim`` and ``project_out: codebook_dim -> dim`` wrap the
            lookup (low-dimensional lookup; with ``l2_normalize`` the ViT-VQGAN recipe).
        metric: ``"l2"`` or ``"cosine"`` (search metric of the op; the loss is always the squared
            error to the chosen code).
        l2_normalize: L2-normalize the (projected) inputs and the codes before the lookup.
        learnable_codebook: ``False`` -> EMA codebook (buffer); ``True`` -> ``nn.Parameter`` learned
            by the codebook loss ``mean((sg(x) − q)²)`` (added to ``loss``).
        decay, eps: EMA decay and Laplace smoothing (see :func:`vqkernels.ema_update_`).  With a
            learnable codebook, ``decay`` still drives the ``cluster_size`` usage EMA (for restarts).
        commitment_weight: weight β of the commitment loss ``β·mean((x − sg(q))²)``.
        kmeans_init, kmeans_iters, kmeans_seeding: initialize the codebook with k-means on the first
            training batch (``"kmeans++"`` or ``"random"`` seeding; Lloyd steps on the fused search).
        threshold_ema_dead_code: codes whose EMA ``cluster_size`` falls below it are re-seeded from
            the current batch; their ``cluster_size`` is reset to the threshold and their
            ``embed_sum`` to ``threshold·code`` (0 disables restarts).
        entropy_loss_weight: weight of the MAGVIT-2 / LlamaGen entropy loss
            ``sample_weight·mean_i H(p_i) − batch_weight·H(mean p)`` over the softmax of the layer's
            metric (``−‖x − c‖²/τ`` or ``cos/τ``), added to ``loss`` in training (0 = off; see
            :func:`vqkernels.nn.codebook_entropy_loss`; streamed, no N x K matrix).
            entropy_temperature: its τ (0.01 as LlamaGen).  entropy_sample_weight,
            entropy_batch_weight: the weights of its two terms.
        channel_dim: the channel dim of ``x`` (``-1`` for ``[B, ..., D]``, ``1`` for ``[B, D, H, W]``).
        usage_window: number of training batches in the ``codebook_usage`` window.
        sync_distributed: ``None`` -> sync when torch.distributed is initialized (decided per call).
        backend: op backend (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``).
        check_inputs: validate values (NaN/Inf) in eager mode.

    Forward: ``quantized, indices, loss = vq(x, mask=None)``

    * ``x``: ``[B, ..., D]`` (or channel-first with ``channel_dim=1``) float32/bfloat16/float16.
    * ``mask``: optional bool, ``x``'s shape without the channel dim; ``False`` = padding, excluded
      from the EMA, k-means, restarts and the loss (indices are still computed there).
    * ``quantized``: same shape and dtype as ``x``, the chosen codes (after ``project_out``) with the
      straight-through gradient of ``x``.
    * ``indices``: ``x``'s shape without the channel dim, int64.
    * ``loss``: ``[] float32`` = ``commitment_weight·commit`` (+ codebook loss when learnable), over
      the unmasked positions (0 when there are none).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        metric: str = "l2",
        l2_normalize: bool = False,
        learnable_codebook: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_seeding: str = "kmeans++",
        threshold_ema_dead_code: float = 0.0,
        entropy_loss_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        entropy_sample_weight: float = 1.0,
        entropy_batch_weight: float = 1.0,
        channel_dim: int = -1,
        usage_window: int = 8,
        sync_distributed: bool | None = None,
        backend: str = "auto",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.dim = _require_int("dim", dim, 1)
        self.codebook_size = _require_int("codebook_size", codebook_size, 1)
        self.codebook_dim = self.dim if codebook_dim is None else _require_int(
            "codebook_dim", codebook_dim, 1
        )
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        if kmeans_seeding not in _SEEDINGS:
            raise ValueError(f"kmeans_seeding must be one of {_SEEDINGS}, got {kmeans_seeding!r}")
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
            raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
        if sync_distributed not in (None, True, False):
            raise TypeError(f"sync_distributed must be None or a bool, got {sync_distributed!r}")
        self.metric = metric
        self.l2_normalize = bool(l2_normalize)
        self.learnable_codebook = bool(learnable_codebook)
        self.decay = _require_float("decay", decay, 0.0, 1.0)
        self.eps = _require_float("eps", eps, 0.0, lo_open=True)
        self.commitment_weight = _require_float("commitment_weight", commitment_weight, 0.0)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = _require_int("kmeans_iters", kmeans_iters, 0)
        self.kmeans_seeding = kmeans_seeding
        self.threshold_ema_dead_code = _require_float(
            "threshold_ema_dead_code", threshold_ema_dead_code, 0.0
        )
        self.entropy_loss_weight = _require_float("entropy_loss_weight", entropy_loss_weight, 0.0)
        self.entropy_temperature = _require_float(
            "entropy_temperature", entropy_temperature, 0.0, lo_open=True
        )
        self.entropy_sample_weight = _require_float("entropy_sample_weight", entropy_sample_weight)
        self.entropy_batch_weight = _require_float("entropy_batch_weight", entropy_batch_weight)
        self.channel_dim = channel_dim
        self.usage_window = _require_int("usage_window", usage_window, 1)
        self.sync_distributed = sync_distributed
        self.backend = dispatch.validate_backend(backend)
        self.check_inputs = bool(check_inputs)

        k, cd = self.codebook_size, self.codebook_dim
        if cd != self.dim:
            self.project_in = nn.Linear(self.dim, cd)
            self.project_out = nn.Linear(cd, self.dim)
        else:
            self.project_in = None
            self.project_out = None

        if self.kmeans_init:
            embed = torch.zeros(k, cd)
        else:
            embed = torch.empty(k, cd)
            nn.init.kaiming_uniform_(embed)
            if self.l2_normalize:
                embed = F.normalize(embed, dim=-1)
        if self.learnable_codebook:
            self.codebook = nn.Parameter(embed)
        else:
            self.register_buffer("codebook", embed)
        # EMA state.  cluster_size starts at 1 with embed_sum = codebook, so that
        # codebook == embed_sum / smoothed(cluster_size) holds from the start (up to smoothing).
        self.register_buffer("cluster_size", torch.ones(k))
        if not self.learnable_codebook:
            self.register_buffer("embed_sum", embed.clone())
        else:
            self.embed_sum = None
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        # Python mirror of `initted` so a compiled forward can check it without a graph break.
        self._initted_py = not self.kmeans_init
        # Statistics (not part of the checkpoint).
        self.register_buffer("_perplexity", torch.zeros(()), persistent=False)
        self.register_buffer(
            "_usage", torch.zeros(self.usage_window, k, dtype=torch.bool), persistent=False
        )
        self.register_buffer("_usage_step", torch.zeros((), dtype=torch.int64), persistent=False)

    # ------------------------------------------------------------------------- public state

    @property
    def perplexity(self) -> torch.Tensor:
        """``[] float32``: ``exp(entropy)`` of the last training batch's code assignments."""
        return self._perplexity

    @property
    def codebook_usage(self) -> float:
        """Fraction of codes (in ``[0, 1]``) assigned at least once over the last
        ``usage_window`` training batches (0.0 before the first training batch)."""
        steps = int(self._usage_step)
        if steps == 0:
            return 0.0
        rows = self._usage if steps >= self.usage_window else self._usage[:steps]
        return float(rows.any(dim=0).float().mean())

    def extra_repr(self) -> str:
        try:
            resolved = dispatch.resolve(self.backend, self.codebook.device)
        except Exception as exc:  # report, never fail a repr
            resolved = f"unavailable ({exc})"
        kind = "learnable" if self.learnable_codebook else f"ema(decay={self.decay}, eps={self.eps})"
        parts = [
            f"dim={self.dim}",
            f"codebook_size={self.codebook_size}",
            f"codebook_dim={self.codebook_dim}",
            f"metric={self.metric!r}",
            f"l2_normalize={self.l2_normalize}",
            f"codebook={kind}",
            f"commitment_weight={self.commitment_weight}",
        ]
        if self.kmeans_init:
            parts.append(f"kmeans_init={self.kmeans_seeding}x{self.kmeans_iters}")
        if self.threshold_ema_dead_code > 0:
            parts.append(f"threshold_ema_dead_code={self.threshold_ema_dead_code}")
        if self.channel_dim != -1:
            parts.append(f"channel_dim={self.channel_dim}")
        parts.append(f"backend={self.backend!r} -> {resolved}")
        return ", ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted_py = bool(self.initted)

    # ------------------------------------------------------------------------- helpers

    def _lookup_codebook(self) -> torch.Tensor:
        """``[K, codebook_dim] float32`` codes used for the lookup (normalized if asked)."""
        cb = self.codebook
        if self.learnable_codebook and self.l2_normalize:
            cb = F.normalize(cb, dim=-1)  # differentiable: the Parameter itself stays unconstrained
        return cb

    def _should_sync(self) -> bool:
        return vqdist.should_sync(self.sync_distributed)

    def _to_channel_last(self, x: torch.Tensor) -> torch.Tensor:
        return _ChannelView(self.dim, self.channel_dim).to_channel_last(x)

    def _from_channel_last(self, y: torch.Tensor) -> torch.Tensor:
        return _ChannelView(self.dim, self.channel_dim).from_channel_last(y)

    def _check_mask(self, mask, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(
                f"mask must have x's shape without the channel dim {list(shape)}, "
                f"got {list(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but x is on {device}")
        return mask.reshape(-1)

    def _project_in(self, x_cl: torch.Tensor) -> torch.Tensor:
        return self.project_in(x_cl) if self.project_in is not None else x_cl

    def _prepare(self, h: torch.Tensor) -> torch.Tensor:
        """Flattened fp32 lookup input ``[N, codebook_dim]`` (normalized if asked)."""
        flat = h.reshape(-1, self.codebook_dim).float()
        if self.l2_normalize:
            flat = F.normalize(flat, dim=-1)
        return flat

    # ------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        x_cl = self._to_channel_last(x)
        valid = self._check_mask(mask, x_cl.shape[:-1], x_cl.device)
        h = self._project_in(x_cl)
        with torch.autocast(x.device.type, enabled=False):
            flat = self._prepare(h)
            q, idx, loss = self._quantize_flat(flat, valid)
        q = q.reshape(h.shape).to(h.dtype)
        if self.project_out is not None:
            q = self.project_out(q)
        q = self._from_channel_last(q.to(x.dtype))
        return q, idx.reshape(x_cl.shape[:-1]), loss

    def _maybe_kmeans_init(self, flat: torch.Tensor, valid: torch.Tensor | None) -> None:
        if not self.training or self._initted_py:
            return
        if _is_compiling():
            raise RuntimeError(
                "VectorQuantizer(kmeans_init=True) is not initialized: k-means runs eagerly; run "
                "one eager training step (or call init_codebook_(x)) before compiling"
            )
        self._kmeans_init_flat(flat.detach(), valid)

    def _quantize_flat(self, flat: torch.Tensor, valid: torch.Tensor | None):
        """``flat: [N, cd] float32`` -> (quantized ``[N, cd]`` fp32 straight-through, indices
        ``[N]`` int64, loss ``[]`` fp32); updates the EMA/statistics in training."""
        self._check_values(flat)
        self._maybe_kmeans_init(flat, valid)
        training = self.training
        cb = self._lookup_codebook()
        if not self.learnable_codebook and training:
            # The EMA update below rewrites the codebook in place, but the quantize op saves the
            # codebook for its backward (it recomputes q = codebook[idx]): give it a snapshot.
            cb = cb.clone()
        check = False  # values were checked once above (see _check_values)
        if valid is None:
            q, idx, loss = vqf.quantize(
                flat, cb, self.commitment_weight, self.metric,
                codebook_loss=self.learnable_codebook, backend=self.backend, check_inputs=check,
            )
        else:
            q, idx, _ = vqf.quantize(
                flat, cb.detach(), 0.0, self.metric,
                codebook_loss=False, backend=self.backend, check_inputs=check,
            )
            loss = self._masked_loss(flat, cb, idx, valid)
        if training and self.entropy_loss_weight > 0:
            ent = codebook_entropy_loss(
                flat, cb, self.entropy_temperature, self.metric, valid,
                sample_weight=self.entropy_sample_weight, batch_weight=self.entropy_batch_weight,
                backend=self.backend, check_inputs=False,
            )  # fmt: skip
            loss = loss + self.entropy_loss_weight * ent
        if training:
            with torch.no_grad():
                self._update_state(flat.detach(), idx, valid)
        return q, idx, loss

    def _check_values(self, flat: torch.Tensor) -> None:
        """Eager NaN/Inf check (``check_inputs``, skipped while compiling) of the lookup input and,
        when learnable, of the codebook (an optimizer step can make it non-finite).  An EMA codebook
        is not rescanned on every call: it is built only from checked inputs, and the scan costs
        K·D per call, more than the input itself at large K (the ops' own checks are turned off
        for the same reason)."""
        if not self.check_inputs or _is_compiling():
            return
        tensors = [("x", flat)]
        if self.learnable_codebook:
            tensors.append(("codebook", self.codebook.detach()))
        for name, t in tensors:
            if not t.numel():
                continue
            # one reduction pass, no [N, D] temporary: aminmax propagates NaN and ±Inf
            lo, hi = torch.aminmax(t)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"{name} contains {bad} NaN/Inf value(s) (after the input projection, if any); "
                    f"pass finite values or check_inputs=False"
                )

    def _masked_loss(self, flat, cb, idx, valid) -> torch.Tensor:
        """Losses over the unmasked rows only: O(N·D) elementwise, no search."""
        w = valid.to(torch.float32).unsqueeze(1)
        denom = (valid.sum() * self.codebook_dim).clamp_min(1).to(torch.float32)
        q_sel = cb[idx]  # gradient reaches the codebook through this gather when learnable
        commit = (((flat - q_sel.detach()) ** 2) * w).sum() / denom
        loss = self.commitment_weight * commit
        if self.learnable_codebook:
            loss = loss + (((flat.detach() - q_sel) ** 2) * w).sum() / denom
        return loss

    # ------------------------------------------------------------------------- state updates

    def _update_state(self, flat: torch.Tensor, idx: torch.Tensor, valid) -> None:
        idx_e = idx if valid is None else torch.where(valid, idx, torch.full_like(idx, -1))
        sync = self._should_sync()
        k = self.codebook_size
        check = False  # rows checked in forward; indices come from the search (always in range)
        if not self.learnable_codebook:
            if sync:
                counts, sums = vqf.cluster_stats(
                    flat, idx_e, k, backend=self.backend, check_inputs=check
                )
                vqdist.all_reduce_sum_(counts, sums)
                vqf.ema_blend_(
                    self.codebook, self.cluster_size, self.embed_sum, counts, sums,
                    self.decay, self.eps,
                )
            else:
                vqf.ema_update_(
                    self.codebook, self.cluster_size, self.embed_sum, flat, idx_e,
                    self.decay, self.eps, backend=self.backend, check_inputs=check,
                )
                counts = _counts_from_indices(idx_e, k)
            if self.l2_normalize:
                self.codebook.copy_(F.normalize(self.codebook, dim=-1))
        else:
            counts = _counts_from_indices(idx_e, k)
            if sync:
                vqdist.all_reduce_sum_(counts)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self._track(counts)
        if self.threshold_ema_dead_code > 0:
            self._restart_dead_codes(flat, valid, sync)

    def _track(self, counts: torch.Tensor) -> None:
        """Perplexity and the usage window, tensor-only (no host sync)."""
        total = counts.sum().clamp_min(1.0)
        p = counts / total
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        self._perplexity.copy_(torch.exp(entropy))
        row = torch.remainder(self._usage_step, self.usage_window).reshape(1)
        self._usage.index_copy_(0, row, (counts > 0).unsqueeze(0))
        self._usage_step.add_(1)

    def _restart_dead_codes(self, flat: torch.Tensor, valid, sync: bool) -> None:
        """Re-seed codes whose EMA cluster size fell below the threshold from the current batch.

        Tensor-only (fixed shapes) so it also runs under torch.compile: the valid rows are put in a
        random order, dead code number r (in index order) takes valid row number r; when there are
        more dead codes than valid rows the rest wait for a later batch (no duplicated codes)."""
        thr = self.threshold_ema_dead_code
        expired = self.cluster_size < thr
        # Eager fast path (cluster_size is identical on every rank, so all ranks take it together).
        if not _is_compiling() and not bool(expired.any()):
            return
        n = flat.shape[0]
        if n == 0:
            return
        v = valid if valid is not None else torch.ones(n, dtype=torch.bool, device=flat.device)
        keys = torch.rand(n, device=flat.device) + (~v).to(torch.float32) * 2.0
        order = torch.argsort(keys)  # valid rows first, in random order
        n_valid = v.sum()
        rank = torch.cumsum(expired.to(torch.int64), 0) - 1
        take = expired & (rank < n_valid)
        samples = flat[order[rank.clamp(0, n - 1)]]  # [K, cd]
        if sync:
            # Rank 0 decides: broadcast its choice (fixed-size tensors: no size exchange needed).
            take_f = take.to(torch.float32)
            vqdist.broadcast_from_root_(take_f, samples)
            take = take_f > 0.5
        take2 = take.unsqueeze(1)
        self.codebook.copy_(torch.where(take2, samples, self.codebook))
        self.cluster_size.copy_(
            torch.where(take, torch.full_like(self.cluster_size, thr), self.cluster_size)
        )
        if self.embed_sum is not None:
            self.embed_sum.copy_(torch.where(take2, samples * thr, self.embed_sum))

    # ------------------------------------------------------------------------- k-means

    @torch.no_grad()
    def init_codebook_(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Run the k-means initialization now on ``x`` (same layout as forward's ``x``) and mark
        the codebook initialized.  Eager only; synchronized across ranks when distributed."""
        x_cl = self._to_channel_last(x)
        valid = self._check_mask(mask, x_cl.shape[:-1], x_cl.device)
        flat = self._prepare(self._project_in(x_cl))
        self._kmeans_init_flat(flat, valid)

    def _seed(self, data: torch.Tensor) -> torch.Tensor:
        """``[K, cd]`` initial centers from ``data: [n, cd]`` (n >= 1)."""
        n, k = data.shape[0], self.codebook_size
        if n < k:
            warnings.warn(
                f"k-means init got {n} vectors for {k} codes: some codes start as duplicates",
                RuntimeWarning,
                stacklevel=4,
            )
        if self.kmeans_seeding == "random":
            if n >= k:
                pick = torch.randperm(n, device=data.device)[:k]
            else:
                pick = torch.randint(0, n, (k,), device=data.device)
            return data[pick].clone()
        # k-means++ (D² sampling): centers are drawn with probability ∝ the squared distance to
        # the nearest center chosen so far.  Drawn in rounds of `per_round` centers (exact
        # k-means++ for K <= _KMEANSPP_ROUNDS; beyond, each round samples a batch without
        # replacement from the same D² distribution, as k-means|| oversampling does), and the
        # distances are updated with the fused search against the round's new centers: O(n·K·D)
        # in all, the cost of one Lloyd step, in at most _KMEANSPP_ROUNDS + 1 rounds.
        pts = F.normalize(data, dim=-1) if self.metric == "cosine" else data
        centers = torch.empty(k, data.shape[1], dtype=data.dtype, device=data.device)
        first = int(torch.randint(0, n, (1,)))
        centers[0] = data[first]
        d2 = ((pts - pts[first]) ** 2).sum(dim=1)
        per_round = max(1, math.ceil((k - 1) / _KMEANSPP_ROUNDS))
        filled = 1
        while filled < k:
            b = min(per_round, k - filled)
            positive = int((d2 > 0).sum())
            if positive >= b:
                pick = torch.multinomial(d2, b, replacement=False)
            elif positive > 0:  # fewer distinct candidates than centers to draw: duplicates
                pick = torch.multinomial(d2, b, replacement=True)
            else:  # every point is already a center (n < K or duplicated data): uniform draw
                pick = torch.randint(0, n, (b,), device=data.device)
            centers[filled : filled + b] = data[pick]
            _, dist = vqf.nearest_code(
                pts, pts[pick].contiguous(), "l2", return_distance=True,
                backend=self.backend, check_inputs=False,
            )
            d2 = torch.minimum(d2, dist)
            filled += b
        return centers

    def _kmeans_init_flat(self, flat: torch.Tensor, valid: torch.Tensor | None) -> None:
        k = self.codebook_size
        data = flat if valid is None else flat[valid]
        sync = self._should_sync()
        is_root = (not sync) or vqdist.rank() == 0
        if data.shape[0] == 0 and not sync:
            raise ValueError("k-means init needs at least one unmasked vector in the batch")
        if is_root:
            centers = self._seed(data) if data.shape[0] else self.codebook.detach().float().clone()
        else:
            centers = torch.empty(k, self.codebook_dim, dtype=torch.float32, device=flat.device)
        if sync:
            vqdist.broadcast_from_root_(centers)
        counts = None
        for it in range(self.kmeans_iters + 1):
            idx = vqf.nearest_code(
                data, centers, self.metric, backend=self.backend, check_inputs=False
            )
            counts, sums = vqf.cluster_stats(data, idx, k, backend=self.backend)
            if sync:
                vqdist.all_reduce_sum_(counts, sums)
            if it == self.kmeans_iters:
                break  # last pass only measures the final cluster sizes
            means = sums / counts.clamp_min(1.0).unsqueeze(1)
            if self.l2_normalize:
                means = F.normalize(means, dim=-1)
            # empty clusters keep their previous center
            centers = torch.where((counts > 0).unsqueeze(1), means, centers)
        self._set_kmeans_state(centers, counts)
        self.initted.fill_(True)
        self._initted_py = True

    def _set_kmeans_state(self, centers: torch.Tensor, counts: torch.Tensor) -> None:
        """Store k-means centers as the codebook and the final cluster sizes as the EMA state,
        with ``embed_sum = centers·smoothed(counts)`` so codebook == embed_sum/smoothed holds."""
        self.codebook.data.copy_(centers)
        self.cluster_size.copy_(counts)
        if self.embed_sum is not None:
            self.embed_sum.copy_(centers * _smoothed_counts(counts, self.eps).unsqueeze(1))

    # ------------------------------------------------------------------------- codes

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices: [...] int64`` in ``[0, K)`` -> ``[..., dim]`` codes in the output space
        (after ``project_out``), channel-last, float32 (or the projection's dtype)."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be int64 (or int32), got {indices.dtype}")
        if not _is_compiling() and indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"indices must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]"
                )
        codes = F.embedding(indices.long(), self._lookup_codebook())
        if self.project_out is not None:
            codes = self.project_out(codes)
        return codes
