"""Public ``cluster_stats``, ``ema_update_``, ``ema_blend_``: codebook statistics and EMA updates."""

from __future__ import annotations

import torch

from .. import dispatch, reference
from ._checks import (
    _check_finite,
    _check_indices,
    _check_x,
    _flatten,
    _flatten_heads,
    _require_tensor,
    _want_check,
)

__all__ = ["cluster_stats", "ema_update_", "ema_blend_"]


def cluster_stats(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    *,
    heads: int | None = None,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts and sums of assigned vectors (no one-hot matrix; deterministic).

    Args:
        x: ``[..., D]`` float; ``[..., H, D]`` when ``heads=H``.
        indices: ``[...]`` int64 with ``x.shape[:-1]`` elements, values in ``[-1, num_codes)``;
            ``-1`` marks a row to ignore (padding).  With ``heads``: ``[..., H]``, head h's
            index into its own codebook.
        num_codes: K >= 1 (per head).
        heads: ``None`` (one codebook) or H >= 1: statistics per head, in one kernel call.

    Returns:
        ``counts: [K] float32`` and ``sums: [K, D] float32``; with ``heads``: ``[H, K]`` and
        ``[H, K, D]``.
    """
    x = _check_x(x)
    if not isinstance(num_codes, int) or isinstance(num_codes, bool) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    check = _want_check(check_inputs)
    if heads is None:
        x2 = _flatten(x)
        if check:
            _check_finite("x", x2)
        idx = _check_indices(indices, x2.shape[0], num_codes, x.device, check)
        return dispatch.call("cluster_stats", backend, x.device, x2, idx, num_codes)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1 or None, got {heads!r}")
    if x.dim() < 2 or x.shape[-2] != heads:
        raise ValueError(f"with heads={heads}, x must have shape [..., {heads}, D], got {tuple(x.shape)}")
    x3 = x.reshape(-1, heads, x.shape[-1])
    if check:
        _check_finite("x", x3)
    idx = _check_indices(indices, x3.shape[0] * heads, num_codes, x.device, check)
    return dispatch.call(
        "cluster_stats", backend, x.device, x3, idx.reshape(-1, heads), num_codes,
        features=("heads",),
    )  # fmt: skip


def _check_ema_state(codebook, cluster_size, embed_sum) -> None:
    codebook = _require_tensor("codebook", codebook)
    if codebook.dim() not in (2, 3) or min(codebook.shape) < 1:
        raise ValueError(
            f"codebook must have shape [K, D] (or [H, K, D]) with K, D (H) >= 1, got "
            f"{tuple(codebook.shape)}"
        )
    lead = tuple(codebook.shape[:-1])  # (K,) or (H, K)
    for name, t, shape in (
        ("codebook", codebook, tuple(codebook.shape)),
        ("cluster_size", cluster_size, lead),
        ("embed_sum", embed_sum, tuple(codebook.shape)),
    ):
        _require_tensor(name, t)
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (EMA state stays fp32), got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != codebook.device:
            raise ValueError(f"{name} is on {t.device} but codebook is on {codebook.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} is updated in place and must be contiguous")


def _check_decay_eps(decay, eps) -> tuple[float, float]:
    if not isinstance(decay, (int, float)) or not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must be a float in [0, 1], got {decay!r}")
    if not isinstance(eps, (int, float)) or not float(eps) > 0.0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    return float(decay), float(eps)


def ema_update_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> None:
    """Exponential-moving-average codebook update, in place (returns nothing).

    ``cluster_size ← decay·cluster_size + (1−decay)·counts``;
    ``embed_sum ← decay·embed_sum + (1−decay)·S`` with ``S_k = Σ_{i: idx_i=k} x_i``;
    ``n = Σ cluster_size``; ``c_k = (cluster_size_k + eps)/(n + K·eps)·n`` (Laplace smoothing);
    ``codebook_k = embed_sum_k / c_k``.  Counts and sums are computed without a one-hot matrix and
    deterministically (same bits on every run and thread count).

    Multi-head (one codebook per head, all heads in one kernel call): the same update per head
    with the head's own ``n = Σ_k cluster_size[h, k]``.

    Args:
        codebook: ``[K, D] float32`` (or ``[H, K, D]``), contiguous, written.
        cluster_size: ``[K] float32`` (or ``[H, K]``), contiguous, written.
        embed_sum: ``[K, D] float32`` (or ``[H, K, D]``), contiguous, written.
        x: ``[..., D]`` float (accumulated in fp32); ``[..., H, D]`` multi-head.
        indices: ``[...]`` int64 with ``x.shape[:-1]`` elements in ``[-1, K)``; ``-1`` = ignore.
        decay: in ``[0, 1]``.  eps: ``> 0``.

    Edge case (documented, identical on every backend): when ``n = Σ cluster_size`` is 0 after the
    blend (an all-zero state and no kept rows, or ``decay = 0`` with every row ignored) the
    smoothing is 0/0 and the codebook becomes NaN, as in the usual formulation.  Start
    ``cluster_size`` above 0 (``VectorQuantizer`` starts it at 1) to rule this out.
    """
    _check_ema_state(codebook, cluster_size, embed_sum)
    x = _check_x(x)
    k, d = codebook.shape[-2:]
    if x.shape[-1] != d:
        raise ValueError(f"x has last dim D={x.shape[-1]} but codebook has D={d}")
    if x.device != codebook.device:
        raise ValueError(f"x is on {x.device} but codebook is on {codebook.device}")
    decay, eps = _check_decay_eps(decay, eps)
    multi_head = codebook.dim() == 3
    if multi_head and (x.dim() < 2 or x.shape[-2] != codebook.shape[0]):
        raise ValueError(
            f"a multi-head codebook {list(codebook.shape)} needs x of shape "
            f"[..., {codebook.shape[0]}, {d}], got {tuple(x.shape)}"
        )
    x2 = _flatten_heads(x, codebook)
    check = _want_check(check_inputs)
    if check:
        _check_finite("x", x2)
    idx = _check_indices(indices, x2.shape[:-1].numel(), k, x.device, check)
    idx = idx.reshape(x2.shape[:-1])
    dispatch.call(
        "ema_update_", backend, x.device, codebook, cluster_size, embed_sum, x2, idx, decay, eps,
        features=("heads",) if multi_head else (),
    )  # fmt: skip


def ema_blend_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> None:
    """Second half of :func:`ema_update_` from already-reduced ``counts: [K]``/``sums: [K, D]``
    (fp32; ``[H, K]``/``[H, K, D]`` multi-head), e.g. after an all-reduce across ranks.  Plain
    PyTorch (O(K·D), not a hot spot)."""
    _check_ema_state(codebook, cluster_size, embed_sum)
    decay, eps = _check_decay_eps(decay, eps)
    if tuple(counts.shape) != tuple(cluster_size.shape) or tuple(sums.shape) != tuple(embed_sum.shape):
        raise ValueError(
            f"counts/sums must have shapes {list(cluster_size.shape)}/{list(embed_sum.shape)}, "
            f"got {list(counts.shape)}/{list(sums.shape)}"
        )
    reference.ema_blend_(codebook, cluster_size, embed_sum, counts.float(), sums.float(), decay, eps)
