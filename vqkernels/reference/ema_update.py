"""Reference ``cluster_stats`` / ``ema_update_`` / ``ema_blend_`` (no one-hot: ``index_add_``)."""

from __future__ import annotations

import torch

__all__ = ["cluster_stats", "ema_update_", "ema_blend_"]


def cluster_stats(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and sums of rows per code, without a one-hot matrix.

    Args:
        x: ``[N, D]`` float (accumulated in fp32), or ``[N, H, D]`` (multi-head).
        indices: ``[N]`` (``[N, H]``) int64 in ``[-1, num_codes)``; ``-1`` rows are ignored.
        num_codes: K (per head).

    Returns:
        counts ``[K] float32`` and sums ``[K, D] float32``; multi-head ``[H, K]`` / ``[H, K, D]``
        (head h's statistics of the vectors ``x[:, h]`` by ``indices[:, h]``).
    """
    if x.dim() == 3:
        # Head h's codes are the global codes [h·K, (h+1)·K): one flat reduction, same bits as
        # H separate ones (each code's rows are still summed in row order).
        n, h, d = x.shape
        offs = torch.arange(h, device=x.device) * num_codes
        flat = torch.where(indices >= 0, indices + offs, -1).reshape(n * h)
        counts, sums = cluster_stats(x.reshape(n * h, d), flat, h * num_codes)
        return counts.reshape(h, num_codes), sums.reshape(h, num_codes, d)
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

    Multi-head (one codebook per head): the same update per head, ``n`` being the head's own
    ``Σ_k cluster_size[h, k]``.

    Args:
        codebook: ``[K, D] float32`` (written), or ``[H, K, D]``.
        cluster_size: ``[K] float32`` (written), or ``[H, K]``.
        embed_sum: ``[K, D] float32`` (written), or ``[H, K, D]``.
        x: ``[N, D]`` float, or ``[N, H, D]``.
        indices: ``[N] int64`` (``[N, H]``) in ``[-1, K)``; ``-1`` rows are ignored.
        decay: in ``[0, 1]``.
        eps: Laplace smoothing, ``> 0``.
    """
    k = codebook.shape[-2]
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
    an all-reduce in distributed training).  Same formulas, same rounding order.  Multi-head
    state (``[H, K]`` / ``[H, K, D]``): ``n`` is per head."""
    k = codebook.shape[-2]
    cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
    n = cluster_size.sum(dim=-1, keepdim=True)
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    codebook.copy_(embed_sum / smoothed.unsqueeze(-1))
