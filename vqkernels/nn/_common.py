"""Helpers shared by the native quantizer layers: argument checks, EMA count smoothing, and the
channel-dim view (move the feature dim last and back)."""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _require_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _require_float(name: str, value, lo: float | None = None, hi: float | None = None,
                   lo_open: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return v


def _smoothed_counts(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """Laplace-smoothed cluster sizes ``(cs_k + eps)/(n + K·eps)·n`` (same formula as ema_update_)."""
    k = cluster_size.shape[0]
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + k * eps) * n


def _counts_from_indices(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``[K] float32`` assignment counts of ``indices: [N] int64`` (``-1`` rows ignored).

    ``index_add_`` with a 0/1 weight instead of ``bincount``/boolean indexing: the output shape
    is static, so this also traces under torch.compile.  O(N)."""
    valid = indices >= 0
    counts = torch.zeros(num_codes, dtype=torch.float32, device=indices.device)
    counts.index_add_(0, indices.clamp_min(0), valid.to(torch.float32))
    return counts



class _ChannelView:
    """Moves a channel dim to the end and back, with the layer's error messages."""

    def __init__(self, dim: int, channel_dim: int) -> None:
        self.dim = dim
        self.channel_dim = channel_dim

    def to_channel_last(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
        cdim = self.channel_dim
        if x.dim() < 1 or not -x.dim() <= cdim < x.dim():
            raise ValueError(f"channel_dim={cdim} is out of range for x with shape {tuple(x.shape)}")
        if x.shape[cdim] != self.dim:
            raise ValueError(
                f"x must have dim={self.dim} features along channel_dim={cdim}, "
                f"got shape {tuple(x.shape)}"
            )
        return x if cdim % x.dim() == x.dim() - 1 else x.movedim(cdim, -1)

    def from_channel_last(self, y: torch.Tensor) -> torch.Tensor:
        cdim = self.channel_dim % y.dim()
        return y if cdim == y.dim() - 1 else y.movedim(-1, cdim)
