"""Triton cluster statistics and EMA codebook update: deterministic segmented reductions.

┌─ contract ────────────────────────────────────────────────────────────────────────────────────┐
│ cluster_stats(x [N, D] float, indices [N] int64 in [-1, K), K)                                │
│     -> counts [K] float32, sums [K, D] float32        (index -1 = ignored row)               │
│ ema_update_(codebook [K, D] f32!, cluster_size [K] f32!, embed_sum [K, D] f32!,              │
│             x [N, D] float, indices [N] int64, decay, eps) -> None, in place:                │
│     cluster_size ← decay·cluster_size + (1−decay)·counts                                     │
│     embed_sum    ← decay·embed_sum + (1−decay)·sums                                          │
│     n = Σ cluster_size;  c_k = (cluster_size_k + eps)/(n + K·eps)·n;  codebook_k = embed_sum_k/c_k │
│ Bitwise reproducible: no float atomics; every sum runs in a fixed order.                     │
└──────────────────────────────────────────────────────────────────────────────────────────────┘

Algorithm (no one-hot matrix, no atomics):

1. ``torch.sort(indices, stable=True)`` groups the rows by code, keeping each code's rows in their
   original order; ``searchsorted`` gives every code its segment ``[start_k, end_k)`` of the sorted
   rows (ignored rows, index -1, sort first and belong to no segment).
2. Each segment is cut into pieces of at most ``CHUNK`` rows (an empty code still gets one empty
   piece).  The number of pieces is at most ``K + ceil(N / CHUNK)``, a bound known without a host
   sync, so the grid is static (torch.compile / CUDA graphs friendly) and a collapsed codebook
   (every row on one code) is spread over ``N / CHUNK`` programs instead of serializing on one.
   Kernel 1 (``_segment_partial_kernel``) sums the rows of one piece (``BLOCK_R`` rows at a time,
   fp32, fixed order) into ``partial [P, D]``.
3. Kernel 2 (``_segment_combine_kernel``) sums each code's pieces in order and writes counts/sums,
   or directly blends them into the EMA state (one pass, no [K, D] temporary).
4. Kernel 3 (``_sum_kernel``) reduces ``n = Σ cluster_size`` in one program (fixed order) and
   kernel 4 (``_ema_refresh_kernel``) applies the Laplace smoothing and writes the codebook.

Block sizes here are fixed functions of D (never autotuned): the summation order, hence the bits,
must not depend on which config a timing run preferred.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._search import interpreting

__all__ = ["cluster_stats", "ema_update_", "segment_sums", "numel_f32"]


def _chunk() -> int:
    return 16 if interpreting() else 256


def _block_r() -> int:
    return 4 if interpreting() else 32


def _block_d(d: int) -> int:
    return min(max(16, triton.next_power_of_2(d)), 32 if interpreting() else 128)


def _block_kc() -> int:
    return 4 if interpreting() else 16


# --------------------------------------------------------------------------------- kernels


@triton.jit
def numel_f32(N, D):
    """max(N·D, 1) as fp32, computed exactly in int64 and rounded once (as the reference's
    division of an fp32 tensor by the int numel).  tl.cast, not .to(): an int argument equal to
    1 arrives as a constexpr on the GPU."""
    return tl.cast(tl.maximum(tl.cast(N, tl.int64) * D, 1), tl.float32)


@triton.jit
def _segment_partial_kernel(
    x_ptr, stride_xn, stride_xd,
    cb_ptr, stride_ck, stride_cd,
    perm_ptr,
    start_ptr, end_ptr,
    piece_first_ptr, piece_code_ptr,
    part_ptr, stride_pp,
    K, D,
    CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SUBTRACT: tl.constexpr,
):  # fmt: skip
    """partial[p, :] = Σ over the rows of piece p (in sorted = original order) of x_row in fp32,
    or of (x_row − codebook[code]) with HAS_SUBTRACT (the quantize backward's error term)."""
    p = tl.program_id(0)
    pid_d = tl.program_id(1)
    k = tl.load(piece_code_ptr + p)
    if k < K:  # pieces past the last code's are padding of the static grid
        j = p - tl.load(piece_first_ptr + k)
        seg_end = tl.load(end_ptr + k)
        lo = tl.load(start_ptr + k) + j * CHUNK
        hi = tl.minimum(lo + CHUNK, seg_end)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask_r = rows < hi
            src = tl.load(perm_ptr + rows, mask=mask_r, other=0)
            mask = mask_r[:, None] & mask_d[None, :]
            v = tl.load(
                x_ptr + src[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask, other=0.0
            ).to(tl.float32)
            if HAS_SUBTRACT:
                c = tl.load(cb_ptr + k * stride_ck + offs_d * stride_cd, mask=mask_d, other=0.0)
                v = tl.where(mask, v - c.to(tl.float32)[None, :], 0.0)
            # elementwise adds into a [BLOCK_R, BLOCK_D] accumulator: each lane sums its rows in
            # order; the final tree over BLOCK_R is fixed by the (constant) block shape.
            acc += v
        tl.store(part_ptr + p * stride_pp + offs_d, tl.sum(acc, axis=0), mask=mask_d)


@triton.jit
def _segment_combine_kernel(
    part_ptr, stride_pp,
    piece_first_ptr, npieces_ptr,
    start_ptr, end_ptr,
    sums_ptr, stride_sk,
    counts_ptr,
    scale_ptr,
    scale,
    decay, one_minus_decay,
    N, K, D,
    BLOCK_KC: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_EMA: tl.constexpr, HAS_SCALE: tl.constexpr,
):  # fmt: skip
    """Per code: S_k = Σ_pieces partial (in piece order), count_k = end_k − start_k.

    IS_EMA=False: sums[k] = S_k (· (scale / max(N·D, 1)) · scale_ptr[0] with HAS_SCALE: the
                  quantize backward's (−2/numel)·grad_loss), counts[k] = count_k.
    IS_EMA=True:  sums/counts point at embed_sum/cluster_size and are blended in place:
                  v ← decay·v + (1−decay)·new (fp32, the reference's mul_ then add_)."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_k = pid_k * BLOCK_KC + tl.arange(0, BLOCK_KC)
    mask_k = offs_k < K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    first = tl.load(piece_first_ptr + offs_k, mask=mask_k, other=0)
    npc = tl.load(npieces_ptr + offs_k, mask=mask_k, other=0)
    acc = tl.zeros([BLOCK_KC, BLOCK_D], dtype=tl.float32)
    for i in range(0, tl.max(npc, axis=0)):
        m = mask_k & (i < npc)
        acc += tl.load(
            part_ptr + (first + i)[:, None] * stride_pp + offs_d[None, :],
            mask=m[:, None] & mask_d[None, :],
            other=0.0,
        )
    mask = mask_k[:, None] & mask_d[None, :]
    ptrs = sums_ptr + offs_k[:, None].to(tl.int64) * stride_sk + offs_d[None, :]
    count = (
        tl.load(end_ptr + offs_k, mask=mask_k, other=0)
        - tl.load(start_ptr + offs_k, mask=mask_k, other=0)
    ).to(tl.float32)
    if IS_EMA:
        old = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, decay * old + one_minus_decay * acc, mask=mask)
        if pid_d == 0:
            cs = tl.load(counts_ptr + offs_k, mask=mask_k, other=0.0)
            tl.store(counts_ptr + offs_k, decay * cs + one_minus_decay * count, mask=mask_k)
    else:
        if HAS_SCALE:
            acc = acc * (tl.div_rn(scale, numel_f32(N, D)) * tl.load(scale_ptr))
        tl.store(ptrs, acc, mask=mask)  # store casts to the output dtype
        if pid_d == 0:
            tl.store(counts_ptr + offs_k, count, mask=mask_k)


@triton.jit
def _sum_kernel(
    v_ptr,
    out_ptr,
    K,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out[h] = Σ v[h·K : (h+1)·K] in fp32, one program per head h, fixed order (deterministic)."""
    head = tl.program_id(0)
    v_ptr += head.to(tl.int64) * K
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        acc += tl.load(v_ptr + offs, mask=offs < K, other=0.0)
    tl.store(out_ptr + head, tl.sum(acc, axis=0))


@triton.jit
def _ema_refresh_kernel(
    cb_ptr, stride_ck,
    es_ptr, stride_ek,
    cs_ptr,
    n_ptr,
    eps,
    K, KT, D,
    BLOCK_KC: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """codebook_k = embed_sum_k / ((cluster_size_k + eps) / (n + K·eps) · n), fp32, IEEE division
    (the reference's evaluation order; K·eps in fp32 here, so K is not baked into a float).
    Rows [0, KT) of the (flattened multi-head) state; row r belongs to head r // K, whose own
    n = n_ptr[r // K] is used."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_k = pid_k * BLOCK_KC + tl.arange(0, BLOCK_KC)
    mask_k = offs_k < KT
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = mask_k[:, None] & (offs_d[None, :] < D)
    n = tl.load(n_ptr + offs_k // K, mask=mask_k, other=1.0)
    cs = tl.load(cs_ptr + offs_k, mask=mask_k, other=1.0)
    smoothed = tl.div_rn(cs + eps, n + tl.cast(K, tl.float32) * eps) * n
    row = offs_k[:, None].to(tl.int64)
    es = tl.load(es_ptr + row * stride_ek + offs_d[None, :], mask=mask, other=0.0)
    tl.store(
        cb_ptr + row * stride_ck + offs_d[None, :], tl.div_rn(es, smoothed[:, None]), mask=mask
    )


# ------------------------------------------------------------------------------- launchers


def _segments(indices: torch.Tensor, k: int, chunk: int):
    """Sort rows by code and cut each code's segment into pieces of <= chunk rows.

    Returns ``perm [N] i64`` (rows in sorted order), ``start/end [K] i64`` (each code's segment of
    ``perm``), ``piece_first/npieces [K] i64`` and ``piece_code [P] i64`` (the code of each piece;
    ``K`` for padding pieces) with the static ``P = K + ceil(N / chunk)``."""
    n = indices.shape[0]
    dev = indices.device
    # 32-bit keys halve the radix-sort passes of 64-bit ones (codes < 2^31 always).
    keys = indices.to(torch.int32) if k < 2**31 - 1 else indices
    sorted_idx, perm = torch.sort(keys, stable=True)
    codes = torch.arange(k, dtype=keys.dtype, device=dev)
    start = torch.searchsorted(sorted_idx, codes, right=False)
    end = torch.searchsorted(sorted_idx, codes, right=True)
    npieces = torch.clamp(torch.div(end - start + (chunk - 1), chunk, rounding_mode="floor"), min=1)
    piece_end = torch.cumsum(npieces, 0)
    piece_first = piece_end - npieces
    p = k + triton.cdiv(n, chunk)
    piece_code = torch.searchsorted(
        piece_end, torch.arange(p, dtype=torch.int64, device=dev), right=True
    )
    return perm, start, end, piece_first, npieces, piece_code


def segment_sums(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    out_sums: torch.Tensor,
    out_counts: torch.Tensor,
    *,
    codebook: torch.Tensor | None = None,
    scale: float = 1.0,
    scale_tensor: torch.Tensor | None = None,
    ema: tuple[float, float] | None = None,
) -> None:
    """Deterministic per-code sums of the rows of ``x [N, D]`` grouped by ``indices [N] int64``.

    Writes ``out_sums [K, D]`` (row stride any, unit column stride) and ``out_counts [K] f32``.
    ``codebook``: sum ``x_i − codebook[idx_i]`` instead of ``x_i``.  ``scale_tensor`` (a 0-d
    fp32 tensor): multiply the sums by ``(scale / max(N·D, 1)) · scale_tensor``.  ``ema=(decay, 1 − decay)``:
    blend into ``out_sums``/``out_counts`` (embed_sum/cluster_size) in place instead.
    Must be called inside a triton_op (kernels go through ``wrap_triton``)."""
    n, d = x.shape
    chunk, block_r, block_d, block_kc = _chunk(), _block_r(), _block_d(d), _block_kc()
    perm, start, end, piece_first, npieces, piece_code = _segments(indices, num_codes, chunk)
    p = piece_code.shape[0]
    part = torch.empty((p, d), dtype=torch.float32, device=x.device)
    cb = codebook if codebook is not None else x  # dummy pointer when unused
    n_dblk = triton.cdiv(d, block_d)
    wrap_triton(_segment_partial_kernel)[(p, n_dblk)](
        x, x.stride(0), x.stride(1),
        cb, cb.stride(0), cb.stride(1),
        perm,
        start, end,
        piece_first, piece_code,
        part, part.stride(0),
        num_codes, d,
        CHUNK=chunk, BLOCK_R=block_r, BLOCK_D=block_d,
        HAS_SUBTRACT=codebook is not None,
        num_warps=4,
    )  # fmt: skip
    st = scale_tensor if scale_tensor is not None else out_counts  # dummy pointer when unused
    decay, one_minus_decay = ema if ema is not None else (0.0, 0.0)
    wrap_triton(_segment_combine_kernel)[(triton.cdiv(num_codes, block_kc), n_dblk)](
        part, part.stride(0),
        piece_first, npieces,
        start, end,
        out_sums, out_sums.stride(0),
        out_counts,
        st,
        float(scale),
        float(decay), float(one_minus_decay),
        n, num_codes, d,
        BLOCK_KC=block_kc, BLOCK_D=block_d,
        IS_EMA=ema is not None, HAS_SCALE=scale_tensor is not None,
        num_warps=4,
    )  # fmt: skip


def _flatten_heads(x: torch.Tensor, indices: torch.Tensor, num_codes: int):
    """Multi-head ``x [N, H, D]``, ``indices [N, H]`` -> rows ``[N·H, D]`` and global codes
    ``h·K + idx`` (``-1`` kept) over ``H·K`` codes: each code's rows keep their row order, so the
    sums have the bits of H separate calls.  2-D inputs pass through."""
    if x.dim() == 2:
        return x, indices, 1
    n, h, d = x.shape
    offs = torch.arange(h, dtype=torch.int64, device=x.device) * num_codes
    flat = torch.where(indices >= 0, indices + offs, -1).reshape(n * h)
    return x.reshape(n * h, d), flat, h


@triton_op("vqkernels::cluster_stats_triton", mutates_args=())
def _cluster_stats_op(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    lead = (x.shape[1],) if x.dim() == 3 else ()
    x2, idx2, h = _flatten_heads(x, indices, num_codes)
    counts = torch.empty(h * num_codes, dtype=torch.float32, device=x.device)
    sums = torch.empty((h * num_codes, d), dtype=torch.float32, device=x.device)
    segment_sums(x2, idx2, h * num_codes, sums, counts)
    return counts.reshape(lead + (num_codes,)), sums.reshape(lead + (num_codes, d))


@triton_op("vqkernels::ema_update_triton_", mutates_args=("codebook", "cluster_size", "embed_sum"))
def _ema_update_op(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    k, d = codebook.shape[-2:]
    x2, idx2, h = _flatten_heads(x, indices, k)
    kt = h * k
    # The state is contiguous (checked): flat views [H·K(, D)] share its storage.
    cb2, cs2, es2 = codebook.view(kt, d), cluster_size.view(kt), embed_sum.view(kt, d)
    # (1 − decay) in double, then fp32, as the reference's alpha=1.0 − decay
    segment_sums(x2, idx2, kt, es2, cs2, ema=(decay, 1.0 - decay))
    n = torch.empty(h, dtype=torch.float32, device=codebook.device)
    wrap_triton(_sum_kernel)[(h,)](cs2, n, k, BLOCK=64 if interpreting() else 1024)
    block_kc, block_d = _block_kc(), _block_d(d)
    grid = (triton.cdiv(kt, block_kc), triton.cdiv(d, block_d))
    wrap_triton(_ema_refresh_kernel)[grid](
        cb2, cb2.stride(0),
        es2, es2.stride(0),
        cs2,
        n,
        float(eps),
        k, kt, d,
        BLOCK_KC=block_kc, BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip


def _check_stats_args(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, D] (or [N, H, D] multi-head), got shape {tuple(x.shape)}")
    if indices.dtype != torch.int64 or indices.shape != x.shape[:-1]:
        raise ValueError(
            f"indices must be int64 of shape {list(x.shape[:-1])}, got {indices.dtype} "
            f"{tuple(indices.shape)}"
        )
    if num_codes < 1:
        raise ValueError(f"num_codes must be >= 1, got {num_codes}")


def cluster_stats(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts and fp32 sums of rows (Triton backend, deterministic).

    Args:
        x: ``[N, D]`` float32/bfloat16/float16, any strides; or ``[N, H, D]`` (multi-head).
        indices: ``[N]`` (``[N, H]``) int64 in ``[-1, num_codes)``; ``-1`` rows are ignored.
        num_codes: K >= 1 (per head).

    Returns:
        ``counts [K] float32``, ``sums [K, D] float32`` (``[H, K]`` / ``[H, K, D]``).
    """
    _check_stats_args(x, indices, num_codes)
    return torch.ops.vqkernels.cluster_stats_triton(x, indices, int(num_codes))


def ema_update_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """EMA codebook update in place (Triton backend, bitwise reproducible).

    Args:
        codebook: ``[K, D] float32`` contiguous (written), or ``[H, K, D]`` (one per head).
        cluster_size: ``[K] float32`` contiguous (written), or ``[H, K]``.
        embed_sum: ``[K, D] float32`` contiguous (written), or ``[H, K, D]``.
        x: ``[N, D]`` float, any strides; ``[N, H, D]`` multi-head.
        indices: ``[N]`` (``[N, H]``) int64 in ``[-1, K)``; ``-1`` rows are ignored.
        decay: in ``[0, 1]``.  eps: ``> 0``.
    """
    k = codebook.shape[-2]
    _check_stats_args(x, indices, k)
    for name, t in (
        ("codebook", codebook),
        ("cluster_size", cluster_size),
        ("embed_sum", embed_sum),
    ):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor (EMA state stays fp32)")
    torch.ops.vqkernels.ema_update_triton_(
        codebook, cluster_size, embed_sum, x, indices, float(decay), float(eps)
    )
