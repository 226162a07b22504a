"""Pure-PyTorch reference ops: the specification of every vqkernels op.

Every backend (C++ CPU, Triton, CUDA) is tested against these functions, the benchmarks use them
as the baseline, and ``backend="reference"`` runs them.  They are written for clarity, not speed:
they *do* materialize the N x K distance matrix and use a one-hot-free ``index_add_`` for the
cluster statistics.

Shapes (letters as in DESIGN.md §2): ``x: [N, D]`` (callers flatten leading dims), ``codebook: [K, D]``.

Numerics (DESIGN.md §3)
-----------------------
* Scores are computed in fp32 (``compute_dtype``) whatever the input dtype; ``compute_dtype`` lets
  tests run the reference *at* a low precision to measure its own error (the flash-attention rule).
* L2: ``argmin_k ‖c_k‖² − 2·x·c_k`` (‖x‖² is constant per row and dropped from the comparison; it is
  added back only to report the distance, which is clamped at 0 because cancellation can make it
  slightly negative).  ``‖c‖²`` is computed from the same rounded codebook the product uses.
* Cosine: codes are L2-normalized (``F.normalize``, eps 1e-12); ``argmax_k x·ĉ_k`` (normalizing x
  does not change the argmax); distance ``1 − x̂·ĉ``.
* Ties go to the lowest index, as ``torch.argmin`` does.
* Indices ``-1`` mark ignored rows (padding/masking) in ``cluster_stats``/``ema_update_``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "nearest_code",
    "cluster_stats",
    "ema_update_",
    "quantize",
    "quantize_backward",
]

_COSINE_EPS = 1e-12


def _scores(x: torch.Tensor, codebook: torch.Tensor, metric: str, compute_dtype: torch.dtype):
    """Per-row comparison scores [N, K] (lower is better) and the per-row offset that turns the
    best score into the reported distance."""
    xc = x.to(compute_dtype)
    cc = codebook.to(compute_dtype)
    if metric == "l2":
        # ‖c‖² from the same rounded codebook the product uses.
        c_sq = (cc * cc).sum(dim=1)
        scores = c_sq.unsqueeze(0) - 2.0 * (xc @ cc.t())
        offset = (xc * xc).sum(dim=1)
        return scores, offset
    if metric == "cosine":
        cn = F.normalize(cc, dim=1, eps=_COSINE_EPS)
        # score = -x·ĉ; distance = 1 - x·ĉ/‖x‖
        scores = -(xc @ cn.t())
        return scores, None
    raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry per row.

    Args:
        x: ``[N, D]`` float32/bfloat16/float16.
        codebook: ``[K, D]``, same dtype as ``x``.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"``.
        compute_dtype: precision of the scores (fp32 by default; tests use x.dtype to measure the
            reference's own low-precision error).

    Returns:
        indices ``[N] int64`` (ties -> lowest index) and distance ``[N] float32``: the squared L2
        distance (clamped >= 0) or ``1 - cosine similarity`` to the chosen code.
    """
    n, k = x.shape[0], codebook.shape[0]
    if n == 0:
        return (
            torch.empty(0, dtype=torch.int64, device=x.device),
            torch.empty(0, dtype=torch.float32, device=x.device),
        )
    scores, offset = _scores(x, codebook, metric, compute_dtype)
    best, indices = scores.min(dim=1)  # min() returns the first (lowest) index among ties
    best = best.float()
    if metric == "l2":
        distance = (best + offset.float()).clamp_min(0.0)
    else:
        x_norm = x.float().norm(dim=1).clamp_min(_COSINE_EPS)
        distance = 1.0 + best / x_norm
    del k
    return indices, distance


def cluster_stats(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and sums of rows per code, without a one-hot matrix.

    Args:
        x: ``[N, D]`` float (accumulated in fp32).
        indices: ``[N]`` int64 in ``[-1, num_codes)``; ``-1`` rows are ignored.
        num_codes: K.

    Returns:
        counts ``[K] float32`` and sums ``[K, D] float32``.
    """
    d = x.shape[1]
    counts = torch.zeros(num_codes, dtype=torch.float32, device=x.device)
    sums = torch.zeros(num_codes, d, dtype=torch.float32, device=x.device)
    # Fixed shapes (no boolean indexing) so torch.compile traces this without graph breaks:
    # ignored (-1) rows are sent to code 0 with weight 0 / a zero row, which adds exactly 0.
    keep = indices >= 0
    idx = indices.clamp_min(0)
    counts.index_add_(0, idx, keep.to(torch.float32))
    # fp64 accumulation so the reference itself is order-independent to fp32 rounding.
    sums64 = torch.zeros(num_codes, d, dtype=torch.float64, device=x.device)
    sums64.index_add_(0, idx, torch.where(keep.unsqueeze(1), x.to(torch.float64), 0.0))
    sums.copy_(sums64)
    return counts, sums


def ema_update_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """EMA codebook update, in place.

    ``cluster_size ← decay·cluster_size + (1−decay)·counts``,
    ``embed_sum ← decay·embed_sum + (1−decay)·S`` with ``S_k = Σ_{i: idx_i = k} x_i``,
    ``n = Σ cluster_size``, ``c_k = (cluster_size_k + eps) / (n + K·eps) · n``,
    ``codebook_k = embed_sum_k / c_k``.

    Args:
        codebook: ``[K, D] float32`` (written).
        cluster_size: ``[K] float32`` (written).
        embed_sum: ``[K, D] float32`` (written).
        x: ``[N, D]`` float.
        indices: ``[N] int64`` in ``[-1, K)``; ``-1`` rows are ignored.
        decay: in ``[0, 1]``.
        eps: Laplace smoothing, ``> 0``.
    """
    k = codebook.shape[0]
    counts, sums = cluster_stats(x, indices, k)
    ema_blend_(codebook, cluster_size, embed_sum, counts, sums, decay, eps)


def ema_blend_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """The second half of :func:`ema_update_` given already-reduced ``counts``/``sums`` (used after
    an all-reduce in distributed training).  Same formulas, same rounding order."""
    k = codebook.shape[0]
    cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    codebook.copy_(embed_sum / smoothed.unsqueeze(1))


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    metric: str = "l2",
    codebook_loss: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through vector quantization with the VQ-VAE losses.

    Args:
        x: ``[N, D]`` float.
        codebook: ``[K, D]``, same dtype as x.
        beta: commitment weight.
        metric: search metric (the loss is always the squared error to the chosen code).
        codebook_loss: add ``mean((sg(x) − q)²)``; defaults to ``codebook.requires_grad``.

    Returns:
        quantized ``[N, D]`` (value of the chosen codes, straight-through gradient to x),
        indices ``[N] int64``, loss ``[] float32``:
        ``beta·mean((x − sg(q))²) [+ mean((sg(x) − q)²)]``; 0 when N = 0.
    """
    if codebook_loss is None:
        codebook_loss = codebook.requires_grad
    with torch.no_grad():
        indices, _ = nearest_code(x.detach(), codebook.detach(), metric)
    # index_select, not codebook[indices]: its backward is index_add_ (deterministic on CPU),
    # whereas advanced indexing backward (index_put_ accumulate) adds with atomics in parallel
    # on CPU and gives different codebook-gradient bits from run to run.
    q = torch.index_select(codebook, 0, indices)
    numel = max(x.numel(), 1)
    # Squared error in fp32 whatever the input dtype.
    commit = ((x.float() - q.detach().float()) ** 2).sum() / numel
    loss = beta * commit
    if codebook_loss:
        loss = loss + ((x.detach().float() - q.float()) ** 2).sum() / numel
    # Straight-through estimator.  ``x + (q - x).detach()`` (the usual form) rounds: its value
    # differs from q by up to an ulp of max(|x|, |q|).  ``x - x.detach()`` is exactly 0 with an
    # identity gradient to x, so this value is exactly q (the contract, and what the fused
    # kernels store) and q itself gets no gradient from it.
    quantized = q.detach() + (x - x.detach())
    return quantized, indices, loss


def quantize_backward(
    grad_quantized: torch.Tensor,
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    beta: float,
    codebook_loss: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form backward of :func:`quantize` (what the fused kernels compute).

    ``grad_x = grad_q + grad_loss·2·beta·(x − q)/numel``;
    ``grad_codebook[k] = Σ_{i: idx_i = k} grad_loss·(−2)·(x_i − q_i)/numel`` when ``codebook_loss``.
    Computed in fp32 and returned in the input dtypes.
    """
    numel = max(x.numel(), 1)
    q = codebook[indices].float()
    diff = x.float() - q
    g = grad_loss.float()
    grad_x = grad_quantized.float() + (2.0 * beta / numel) * g * diff
    grad_cb = None
    if codebook_loss:
        grad_cb = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
        grad_cb.index_add_(0, indices, (-2.0 / numel) * g * diff)
        grad_cb = grad_cb.to(codebook.dtype)
    return grad_x.to(x.dtype), grad_cb
