"""Reference ``nearest_code``: the full N x K score matrix, then a first-index argmin (or a
Gumbel-max draw); multi-head codebooks ``[H, K, D]`` search each head's codebook."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import gumbel_noise

__all__ = ["nearest_code"]

_COSINE_EPS = 1e-12
# LR's cdist clamps the squared distance at 1e-8 before the square root (sampling logits).
SAMPLE_L2_EPS = 1e-8


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


def _nearest_code_2d(x, codebook, metric, compute_dtype, sample_temperature, seed, row_counter):
    """One head: x [N, D], codebook [K, D]; ``row_counter [N]`` are the rows' RNG counters."""
    n = x.shape[0]
    if n == 0:
        return (
            torch.empty(0, dtype=torch.int64, device=x.device),
            torch.empty(0, dtype=torch.float32, device=x.device),
        )
    scores, offset = _scores(x, codebook, metric, compute_dtype)
    x_norm = None if metric == "l2" else x.float().norm(dim=1).clamp_min(_COSINE_EPS)
    if sample_temperature > 0.0:
        # Gumbel-max: argmax_k(logit_k/τ + g_k) = argmin_k(−logit_k/τ − g_k), in fp32.
        scores = scores.float()
        if metric == "l2":
            # LR's cdist: sqrt(clamp(‖x‖² + ‖c‖² − 2x·c, min=1e-8)) (the NON-squared distance).
            logits = -(scores + offset.float().unsqueeze(1)).clamp_min(SAMPLE_L2_EPS).sqrt()
        else:
            logits = -scores / x_norm.unsqueeze(1)  # cosine similarity x̂·ĉ
        noise = gumbel_noise(seed, row_counter, codebook.shape[0])
        # 1/τ rounded once to fp32, then an fp32 product (the kernels do the same arithmetic).
        inv_temp = torch.tensor(1.0 / sample_temperature, dtype=torch.float32, device=x.device)
        perturbed = -(logits * inv_temp) - noise
        _, indices = perturbed.min(dim=1)
        best = scores.gather(1, indices.unsqueeze(1)).squeeze(1)
    else:
        best, indices = scores.min(dim=1)  # min() returns the first (lowest) index among ties
    best = best.float()
    if metric == "l2":
        distance = (best + offset.float()).clamp_min(0.0)
    else:
        distance = 1.0 + best / x_norm
    return indices, distance


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    compute_dtype: torch.dtype = torch.float32,
    sample_temperature: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest (or Gumbel-sampled) codebook entry per row, for one codebook or one per head.

    Args:
        x: ``[N, D]`` (one codebook) or ``[N, H, D]`` (multi-head) float32/bfloat16/float16.
        codebook: ``[K, D]``, or ``[H, K, D]`` with ``x: [N, H, D]`` (head h searches
            ``codebook[h]``); same dtype as ``x``.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"``.
        compute_dtype: precision of the scores (fp32 by default; tests use x.dtype to measure the
            reference's own low-precision error).
        sample_temperature: ``0`` = deterministic nearest code.  ``τ > 0`` = Gumbel-max sampling
            (LR's ``stochastic_sample_codes``): ``argmax_k(logit_k/τ + g_k)`` with the logits of
            vector-quantize-pytorch, ``−‖x − c_k‖`` (non-squared, ``sqrt(max(d², 1e-8))``) for
            l2 and the cosine similarity ``x̂·ĉ_k`` for cosine, and ``g`` the counter-based
            Gumbel noise of :mod:`vqkernels.reference.sampling` (row counter ``n·H + h``).
        seed: the noise seed, an int in ``[0, 2^63)`` (used only when sampling).

    Returns:
        indices ``[N] int64`` (``[N, H]`` multi-head; ties -> lowest index) and distance of the
        same shape, float32: the squared L2 distance (clamped >= 0) or ``1 - cosine similarity``
        to the chosen code.
    """
    multi_head = codebook.dim() == 3
    x3 = x if multi_head else x.unsqueeze(1)
    cb3 = codebook if multi_head else codebook.unsqueeze(0)
    n, h = x3.shape[0], x3.shape[1]
    rows = torch.arange(n, dtype=torch.int64, device=x.device) * h
    # The reference may loop over heads (it is the specification, not a kernel).
    out = [
        _nearest_code_2d(
            x3[:, j], cb3[j], metric, compute_dtype, float(sample_temperature), seed, rows + j
        )
        for j in range(h)
    ]
    indices = torch.stack([o[0] for o in out], dim=1)
    distance = torch.stack([o[1] for o in out], dim=1)
    if not multi_head:
        return indices.squeeze(1), distance.squeeze(1)
    return indices, distance
