"""Reference ``nearest_code``: the full N x K score matrix, then a first-index argmin."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["nearest_code"]

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
