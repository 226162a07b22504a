"""torch.distributed helpers for the VQ layers (decided at call time, never at construction).

The layers call :func:`should_sync` on every training step, so a layer built before
``init_process_group`` (the usual order: model first, then DDP) still synchronizes.  What is
synchronized (see :mod:`vqkernels.nn`):

* EMA statistics: per-rank ``cluster_stats`` -> :func:`all_reduce_sum_` (counts ``[K]`` and sums
  ``[K, D]``, fp32) -> ``ema_blend_``.  Every rank applies the same blend to the same reduced
  tensors, so the codebooks stay bit-identical across ranks.
* k-means init: rank 0 seeds, :func:`broadcast_from_root_`; Lloyd steps all-reduce their statistics.
* dead-code restarts: rank 0 picks the replacements, :func:`broadcast_from_root_`.

Only ``SUM`` reductions and broadcasts of fixed-size tensors are used (no size exchange, no gather
of variable-size batches), so any backend works (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import socket

import torch

__all__ = [
    "is_initialized",
    "should_sync",
    "world_size",
    "rank",
    "all_reduce_sum_",
    "broadcast_from_root_",
    "find_free_port",
]


def is_initialized() -> bool:
    """``torch.distributed`` is available and a default process group exists."""
    d = torch.distributed
    return d.is_available() and d.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def should_sync(flag: bool | None) -> bool:
    """Resolve a layer's ``sync_distributed`` setting now.

    ``None``: sync when initialized with more than one rank.  ``False``: never.  ``True``: always,
    and a missing process group is an error (a silent local update would diverge the ranks)."""
    if flag is False:
        return False
    ready = is_initialized()
    if flag is True:
        if not ready:
            raise RuntimeError(
                "sync_distributed=True but torch.distributed is not initialized; call "
                "init_process_group first or pass sync_distributed=None"
            )
        return True
    return ready and torch.distributed.get_world_size() > 1


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """In-place ``SUM`` all-reduce of each tensor (fp32 statistics)."""
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def broadcast_from_root_(*tensors: torch.Tensor, src: int = 0) -> None:
    """In-place broadcast of each tensor from rank ``src`` (rank 0 decides)."""
    for t in tensors:
        torch.distributed.broadcast(t, src)


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
