"""Process-group plumbing for ``python -m models.train`` under ``torchrun`` (or plain ``python``).

    torchrun --standalone --nproc_per_node=2 -m models.train --model vqvae --dataset digits ...

* :func:`setup` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``), opens the default process group (``gloo`` on CPU, ``nccl`` with
  one GPU per local rank) with a timeout, or reuses one the caller already opened.  Without those
  variables (or with ``WORLD_SIZE=1``) everything below is a cheap no-op.
* Data (:func:`sample_shard`): every rank advances the *same* data generator, draws the whole
  global batch and keeps its own contiguous slice.  The concatenation of the ranks' shards is
  therefore exactly the single-process batch (what ``DistributedSampler`` does with a shared
  seeded permutation), and the data position is one generator state.
* :class:`StepAgreement`: one tiny all-reduce per step decides, for all ranks at once, whether to
  stop (SIGTERM/SIGINT on any rank, the time budget) and whether any rank saw a non-finite loss,
  so every rank leaves the loop at the same step.  A rank that died or hangs turns into
  :class:`PeerLostError` (clear message) on the others instead of a hang: gloo notices a closed
  connection at once, and every collective is bounded by the process-group timeout.
* Gathers for evaluation (:func:`gather_rows`, padding dropped) and for the checkpoint
  (:func:`gather_objects`: every rank's RNG state), and :func:`rank_max_abs_diff` (how far a
  tensor differs across ranks: the codebook must give 0).
"""

from __future__ import annotations

import datetime
import math
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "PeerLostError",
    "StepAgreement",
    "setup",
    "teardown",
    "local_slice",
    "sample_shard",
    "pad_shard",
    "gather_rows",
    "gather_objects",
    "rank_max_abs_diff",
    "all_reduce_mean",
    "barrier",
    "wrap_ddp",
    "peer_lost",
    "is_comm_failure",
]


class PeerLostError(RuntimeError):
    """Another rank died or stopped answering (the message names the timeout and the cause)."""


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node), the
    ``device`` it trains on, and whether it opened the process group (and so closes it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False
    timeout_s: float = 600.0

    @property
    def enabled(self) -> bool:
        """More than one rank: collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch.cuda.is_available() is False")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(
                f"local rank {local_rank} needs GPU {local_rank}, but only {n} are visible "
                f"(use --nproc_per_node <= {n})"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Open (or join) the default process group when launched with more than one rank.

    Args:
        device: ``auto`` (a GPU per local rank when CUDA is available, else CPU), ``cpu``, ``cuda``.
        timeout_s: bound on every collective; a dead or hung peer raises after at most this long.
    Returns:
        the :class:`DistContext`; single-process when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_available() and dist.is_initialized():
        # The caller (a test, a notebook) opened the group: use it, leave it open.
        local = _env_int("LOCAL_RANK", dist.get_rank())
        dev = _pick_device(device, local)
        return DistContext(
            dist.get_rank(),
            dist.get_world_size(),
            local,
            dev,
            dist.get_backend(),
            False,
            timeout_s,
        )
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(device=_pick_device(device, 0), timeout_s=timeout_s)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = _pick_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(
        backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=rank,
        world_size=world,
        **kwargs,
    )
    return DistContext(rank, world, local, dev, backend, True, timeout_s)


def teardown(ctx: DistContext) -> None:
    """Close the process group if :func:`setup` opened it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def peer_lost(ctx: DistContext, what: str, exc: BaseException) -> PeerLostError:
    """The :class:`PeerLostError` to raise when ``what`` failed with ``exc``."""
    first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return PeerLostError(
        f"rank {ctx.rank}/{ctx.world_size}: {what} failed: another rank died or stopped "
        f"answering (collectives time out after "
        f"{f'{ctx.timeout_s:.0f}s; --dist-timeout' if ctx.owns_group else 'the group timeout'}). "
        f"Cause: {first}"
    )


_COMM_MARKERS = ("gloo", "nccl", "c10d", "connection reset", "connection closed", "timed out")


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the communication backend (a lost or hung peer): a
    ``DistError``, or a ``RuntimeError`` the backend raised inside an op (DDP's reducer raises
    gloo's errors as plain ``RuntimeError``s, recognizable by their message)."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in msg for m in _COMM_MARKERS)


def barrier(ctx: DistContext, what: str = "barrier") -> None:
    if not ctx.enabled:
        return
    try:
        dist.barrier()
    except RuntimeError as exc:
        raise peer_lost(ctx, what, exc) from None


def local_slice(global_batch: int, ctx: DistContext) -> tuple[int, int]:
    """``(start, stop)`` of this rank's rows in a global batch (contiguous, equal sizes).

    Raises:
        ValueError: ``global_batch`` is not divisible by the world size.
    """
    if global_batch % ctx.world_size:
        raise ValueError(
            f"--batch-size {global_batch} (the global batch) must be divisible by the world "
            f"size {ctx.world_size}"
        )
    per = global_batch // ctx.world_size
    return ctx.rank * per, (ctx.rank + 1) * per


def all_reduce_mean(values: list[float], ctx: DistContext) -> list[float]:
    """Mean of each float over the ranks (float64 on the wire; identity on one rank)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_wire(ctx))
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except RuntimeError as exc:
        raise peer_lost(ctx, "all_reduce (logging)", exc) from None
    return (t / ctx.world_size).tolist()


def _wire(ctx: DistContext) -> torch.device:
    """Device the collectives' small tensors live on (nccl needs CUDA tensors)."""
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def gather_rows(local: torch.Tensor, total: int, ctx: DistContext) -> torch.Tensor:
    """Concatenate the ranks' equal-size row blocks ``[n_per, ...]`` in rank order and drop the
    padding rows past ``total`` (see :func:`pad_shard`)."""
    if not ctx.enabled:
        return local[:total]
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    try:
        dist.all_gather(parts, local.contiguous())
    except RuntimeError as exc:
        raise peer_lost(ctx, "all_gather (evaluation)", exc) from None
    return torch.cat(parts)[:total]


def pad_shard(rows: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous block of ``rows [N, ...]``: N is padded to a multiple of the world
    size by repeating the last row (the duplicates are dropped again by :func:`gather_rows`)."""
    n = rows.shape[0]
    per = math.ceil(n / ctx.world_size) if n else 0
    idx = torch.arange(ctx.rank * per, (ctx.rank + 1) * per).clamp_max(max(n - 1, 0))
    return rows[idx] if n else rows


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` (pickled) in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as exc:
        raise peer_lost(ctx, "all_gather_object (checkpoint)", exc) from None
    return out


def rank_max_abs_diff(t: torch.Tensor, ctx: DistContext) -> float:
    """``max |t_rank_i − t_rank_j|`` over all ranks and elements (0.0 on one rank; NaN when any
    rank holds a NaN).  Computed as the elementwise MAX minus MIN across ranks: two all-reduces of
    ``t``'s size and no arithmetic before the subtraction (done in float64), so identical tensors
    give exactly 0."""
    if not ctx.enabled:
        return 0.0
    hi, lo = t.detach().clone(), t.detach().clone()
    try:
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    except RuntimeError as exc:
        raise peer_lost(ctx, "all_reduce (codebook check)", exc) from None
    if bool(torch.isnan(hi).any() | torch.isnan(lo).any()):
        return float("nan")
    return float((hi.double() - lo.double()).abs().max()) if t.numel() else 0.0


class StepAgreement:
    """Signal handling and the per-step agreement of all ranks.

    SIGTERM/SIGINT only set a flag (the handler does no I/O); :meth:`agree` all-reduces
    ``[stop, non-finite, elapsed]`` with MAX, so a signal on *any* rank stops *all* ranks after the
    same step, a non-finite loss anywhere stops everyone with the same message, and every rank
    uses the same (largest) elapsed time for the time budget and the learning-rate schedule.  A
    second SIGINT raises ``KeyboardInterrupt`` as usual (an escape hatch)."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StepAgreement:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def agree(self, nonfinite: bool, elapsed: float) -> tuple[bool, bool, float]:
        """``(stop requested on some rank, non-finite loss on some rank, max elapsed seconds)``."""
        stop = self.signal_name is not None
        if not self.ctx.enabled:
            return stop, nonfinite, elapsed
        t = torch.tensor(
            [float(stop), float(nonfinite), elapsed], dtype=torch.float64, device=_wire(self.ctx)
        )
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        except RuntimeError as exc:
            raise peer_lost(self.ctx, "all_reduce (step agreement)", exc) from None
        s, n, e = t.tolist()
        return s > 0, n > 0, e


def sample_shard(sampler, global_batch: int, generator: torch.Generator, ctx: DistContext):
    """This rank's rows of the global batch ``sampler.sample(global_batch, generator)``.

    Every rank draws the whole global batch from the same generator state and keeps its contiguous
    slice: the generator advances identically everywhere (the data position is one state), and
    the ranks' shards concatenate to exactly the batch one process would train on.  The price is
    that each rank also cuts the other ranks' crops (in-memory copies of ``[B, C, S, S]``: small
    next to a training step); the sampler's random stream is untouched."""
    lo, hi = local_slice(global_batch, ctx)
    batch = sampler.sample(global_batch, generator)
    return batch[lo:hi] if ctx.enabled else batch


def wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel`` as the trainer uses it (identity on one rank).

    * Buffers are not re-broadcast from rank 0 before every forward: the VQ codebook is a buffer
      that the layer keeps identical by all-reducing its statistics; a broadcast would cost a
      ``K x D`` copy per step and hide a desync that ``codebook_rank_max_abs_diff`` must see.
      (Parameters and buffers are still broadcast once, when the wrapper is built.)
    * ``find_unused_parameters`` stays off (every parameter gets a gradient every step);
      ``gradient_as_bucket_view`` saves a copy of the gradients.
    """
    if not ctx.enabled:
        return module
    import inspect
    import warnings

    # A conv weight with one input channel ([C, 1, k, k]) has two valid stride layouts; autograd
    # may produce the other one, and DDP then warns once per process that it copies the gradient
    # into its bucket.  Correct either way and negligible at these sizes: keep the log readable.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    ddp = torch.nn.parallel.DistributedDataParallel
    params = inspect.signature(ddp.__init__).parameters
    kwargs = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in params
        else {"broadcast_buffers": False}
    )
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return ddp(module, device_ids=ids, gradient_as_bucket_view=True, **kwargs)
