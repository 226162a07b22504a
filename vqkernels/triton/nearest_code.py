"""Triton nearest-code search (K-streaming, fused running argmin).

┌─ contract ────────────────────────────────────────────────────────────────────────────────────┐
│ nearest_code(x [N, D], codebook [K, D], metric, precision) -> (indices [N] int64,            │
│                                                               distance [N] float32)          │
│   x, codebook: float32 / bfloat16 / float16, same dtype, any strides, same device.           │
│   l2:     argmin_k ‖c_k‖² − 2·x·c_k        distance = max(best + ‖x‖², 0)                     │
│   cosine: argmin_k −x·c_k / max(‖c_k‖, ε)  distance = 1 + best / max(‖x‖, ε),  ε = 1e-12      │
│   ties -> lowest index; extra memory: one fp32 vector [K] (‖c‖² or 1/‖c‖); never N×K.         │
│   precision "exact": fp32 products (fp32 inputs: tl.dot input_precision="ieee"; bf16/fp16:   │
│   products of two half values are exact in fp32, so the tensor-core dot with fp32            │
│   accumulation already is fp32 arithmetic); "fast": fp32 inputs use tf32 tensor cores.       │
└──────────────────────────────────────────────────────────────────────────────────────────────┘

Algorithm: one program owns ``BLOCK_N`` rows of x and streams the codebook in ``BLOCK_K`` blocks.
For each block it forms the ``[BLOCK_N, BLOCK_K]`` products with ``tl.dot`` (fp32 accumulator,
``BLOCK_D`` columns at a time), turns them into scores and folds the block's row minimum into a
running ``(best, best_idx)`` pair.  Ties: within a block ``tl.min(..., return_indices=True,
return_indices_tie_break_left=True)`` returns the lowest column among equal minima; across blocks
the running pair is replaced only on a strict ``<`` and blocks arrive in ascending ``k``, so an
equal score in a later block never displaces an earlier (lower) index.  Together: the lowest
index among exact ties, as ``torch.argmin``.  NaN scores (a NaN code) are mapped to ``+inf`` so a
NaN code is never chosen; a NaN row keeps index 0 and gets a NaN distance.

When ``D`` fits one tile (``D <= 128`` half / ``64`` fp32) the x tile is loaded once, kept on
chip (shared memory) and the K loop is the innermost loop (software-pipelined codebook loads);
otherwise the products loop over 128-byte D tiles inside each K block (x tiles come back from
L1/L2), the structure of a GEMM main loop.

Hopper: bf16/fp16 and tf32 products compile to wgmma (HGMMA in the SASS), fp32 "ieee" to FMA;
the autotuned configs were chosen from sm_90 ahead-of-time compiles (registers, spills, shared
memory: see ``_HOPPER_SHAPES``), not yet from timings on the device.  Rows whose stride is not a
multiple of 16 elements cannot use 16-byte loads (more address registers, possible spills).

Split-K: with few rows (fewer row tiles than multiprocessors) the grid gets a second axis of up
to 16 code ranges; each program stores its range's (best, index) and a small combine kernel folds
them in ascending range order with the same strict ``<`` (bit-identical to one sweep).  Extra
memory stays O(N): ``8·splits·N`` bytes.

Determinism: ``BLOCK_D`` (the split of the reduction dimension) is fixed by the launcher from D and
the dtype, never autotuned, so every autotuned config accumulates each dot product in the same
order: the indices do not depend on which config the autotuner picked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._search import (  # noqa: F401 (_HOPPER_SHAPES, _SMEM_BUDGET, prune_search_configs: tests read them here)
    _HOPPER_SHAPES,
    _SMEM_BUDGET,
    SEARCH_CONFIGS,
    fold_splits,
    interpreting,
    n_bucket,
    prune_search_configs,
    row_sq_norm,
    search_autotune,
    search_meta,
    search_rows,
    size_hint,
    split_range,
)
from .sampling import sample_search

__all__ = ["nearest_code", "code_aux", "search_meta", "num_splits", "SEARCH_CONFIGS"]

COSINE_EPS = 1e-12



# --------------------------------------------------------------------------------- kernels


@triton.jit
def _code_aux_kernel(
    cb_ptr, stride_ck, stride_cd,
    aux_ptr,
    K, D,
    EPS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_COSINE: tl.constexpr,
):  # fmt: skip
    """aux[k] = ‖c_k‖² (l2) or 1 / max(‖c_k‖, EPS) (cosine), in fp32 from the stored codebook
    values (the same rounded values the products use)."""
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    row = offs_k.to(tl.int64) * stride_ck
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        c = tl.load(
            cb_ptr + row[:, None] + offs_d[None, :] * stride_cd,
            mask=mask_k[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        acc += c * c
    sq = tl.sum(acc, axis=1)
    if IS_COSINE:
        # IEEE sqrt and division (not the approximate PTX forms): the reference's F.normalize
        # divides by max(‖c‖, eps) in fp32.
        aux = tl.div_rn(tl.full([BLOCK_K], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq), EPS))
    else:
        aux = sq
    tl.store(aux_ptr + offs_k, aux, mask=mask_k)




@triton.jit
def _nearest_epilogue(
    x_ptr, stride_xd,
    row_off, out_off, mask_n,
    best, best_idx,
    idx_ptr, dist_ptr,
    D,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_COSINE: tl.constexpr,
):  # fmt: skip
    """Store the index and the distance: ‖x‖² in fp32 from the stored x values (one more pass
    over the row tile, which is in L1/L2)."""
    xsq = row_sq_norm(x_ptr, row_off, mask_n, stride_xd, D, BLOCK_N, BLOCK_D)
    if IS_COSINE:
        # (a NaN row keeps its NaN norm: maximum() would otherwise return EPS)
        x_norm = tl.maximum(tl.sqrt_rn(xsq), EPS, propagate_nan=tl.PropagateNan.ALL)
        dist = 1.0 + tl.div_rn(best, x_norm)
    else:
        # ‖x‖² − 2x·c + ‖c‖² cancels: clamp the tiny negative results at 0 (NaN stays NaN)
        dist = tl.maximum(best + xsq, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(idx_ptr + out_off, best_idx.to(tl.int64), mask=mask_n)
    tl.store(dist_ptr + out_off, dist, mask=mask_n)


@search_autotune
@triton.jit
def _nearest_code_kernel(
    x_ptr, stride_xn, stride_xd, stride_xh,
    cb_ptr, stride_ck, stride_cd, stride_ch,
    aux_ptr,
    idx_ptr,
    dist_ptr,
    part_best_ptr, part_idx_ptr,
    N, K, D, H, N_BUCKET,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_COSINE: tl.constexpr, IS_SINGLE_D_TILE: tl.constexpr,
    USE_TF32: tl.constexpr, IS_ROUND_TF32: tl.constexpr, IS_UPCAST_DOT: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), NUM_SPLITS, H).  One split: search + epilogue.  Several: each
    program searches its code range and stores (best, index) partials for
    ``_nearest_combine_kernel``.  Axis 2 is the head: x[:, h] against codebook[h] (aux[h·K:]),
    outputs at n·H + h (H = 1: a plain [K, D] codebook)."""
    pid_h = tl.program_id(2)
    x_ptr += pid_h.to(tl.int64) * stride_xh
    cb_ptr += pid_h.to(tl.int64) * stride_ch
    aux_ptr += pid_h.to(tl.int64) * K
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_off = offs_n.to(tl.int64) * stride_xn
    k_lo, k_hi = split_range(K, BLOCK_K, NUM_SPLITS)
    best, best_idx = search_rows(
        x_ptr, stride_xn, stride_xd, cb_ptr, stride_ck, stride_cd, aux_ptr, row_off, mask_n,
        k_lo, k_hi, K, D,
        BLOCK_N, BLOCK_K, BLOCK_D, IS_COSINE, IS_SINGLE_D_TILE, USE_TF32, IS_ROUND_TF32,
        IS_UPCAST_DOT,
    )  # fmt: skip
    if NUM_SPLITS == 1:
        out_off = offs_n.to(tl.int64) * H + pid_h
        _nearest_epilogue(
            x_ptr, stride_xd, row_off, out_off, mask_n, best, best_idx, idx_ptr, dist_ptr, D,
            EPS, BLOCK_N, BLOCK_D, IS_COSINE,
        )  # fmt: skip
    else:
        part = (pid_h * NUM_SPLITS + tl.program_id(1)).to(tl.int64) * N + offs_n
        tl.store(part_best_ptr + part, best, mask=mask_n)
        tl.store(part_idx_ptr + part, best_idx, mask=mask_n)


@triton.jit
def _nearest_combine_kernel(
    x_ptr, stride_xn, stride_xd, stride_xh,
    part_best_ptr, part_idx_ptr,
    idx_ptr,
    dist_ptr,
    N, D, H,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_COSINE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), H)."""
    pid_h = tl.program_id(1)
    x_ptr += pid_h.to(tl.int64) * stride_xh
    part_off = pid_h.to(tl.int64) * NUM_SPLITS * N
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_off = offs_n.to(tl.int64) * stride_xn
    best, best_idx = fold_splits(
        part_best_ptr + part_off, part_idx_ptr + part_off, offs_n, mask_n, N, BLOCK_N, NUM_SPLITS
    )
    out_off = offs_n.to(tl.int64) * H + pid_h
    _nearest_epilogue(
        x_ptr, stride_xd, row_off, out_off, mask_n, best, best_idx, idx_ptr, dist_ptr, D,
        EPS, BLOCK_N, BLOCK_D, IS_COSINE,
    )  # fmt: skip


# -------------------------------------------------------------------------------- launchers


def code_aux(codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """``[K] float32``: ``‖c_k‖²`` (l2) or ``1/max(‖c_k‖, 1e-12)`` (cosine).  Call inside a
    triton_op (the kernel goes through ``wrap_triton``)."""
    k, d = codebook.shape
    aux = torch.empty(k, dtype=torch.float32, device=codebook.device)
    block_k = 16 if interpreting() else 64
    block_d = min(max(16, triton.next_power_of_2(d)), 64 if interpreting() else 128)
    wrap_triton(_code_aux_kernel)[(triton.cdiv(k, block_k),)](
        codebook, codebook.stride(0), codebook.stride(1),
        aux,
        k, d,
        EPS=COSINE_EPS,
        BLOCK_K=block_k, BLOCK_D=block_d,
        IS_COSINE=metric == "cosine",
        num_warps=4,
    )  # fmt: skip
    return aux


#: Tests set this to force a number of K splits (the heuristic below only splits on a GPU).
FORCE_SPLITS: int | None = None
_MAX_SPLITS = 16


def num_splits(n: int, k: int, device: torch.device) -> int:
    """How many code ranges to search in parallel per row tile ("split-K" of the argmin).

    With few rows (N / 128 row tiles under the multiprocessor count: small batches, inference)
    one program per row tile leaves most of the GPU idle, so the codebook is cut into up to 16
    ranges, each searched by its own program, and a small kernel folds the (best, index)
    partials.  Each range keeps >= 512 codes so the per-program fixed cost stays amortized.
    The result is bit-identical whatever the split: the scores of each (row, code) pair do not
    change and the fold keeps the lowest index among ties.  Extra memory: 8·splits·N bytes."""
    if FORCE_SPLITS is not None:
        return max(1, min(int(FORCE_SPLITS), _MAX_SPLITS))
    if device.type != "cuda":
        return 1
    n, k = size_hint(n), size_hint(k)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(n, 128)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), k // 512, _MAX_SPLITS))


def split_buffers(
    n: int, splits: int, device: torch.device, heads: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials ``best [H, splits, N] f32`` and ``index [H, splits, N] i32`` (1-element dummies
    when there is one split: the kernel does not touch them then)."""
    rows = n if splits > 1 else 1
    h = heads if splits > 1 else 1
    return (
        torch.empty((h, splits, rows), dtype=torch.float32, device=device),
        torch.empty((h, splits, rows), dtype=torch.int32, device=device),
    )


def head_views(x: torch.Tensor, codebook: torch.Tensor):
    """``(x2, cb2, H, stride_xh, stride_ch)``: for a multi-head ``x [N, H, D]`` and codebook
    ``[H, K, D]`` the per-head row views (x2 = ``x[:, 0]``-shaped, cb2 = ``[H·K, D]`` with
    ``codebook[h]`` at ``h·stride_ch``); plain 2-D inputs pass through with H = 1."""
    if codebook.dim() == 2:
        return x, codebook, 1, 0, 0
    h, k, d = codebook.shape
    cb2 = codebook.reshape(h * k, d)  # a view when contiguous (copied otherwise)
    return x[:, 0], cb2, h, x.stride(1), k * cb2.stride(0)


def check_args(x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str) -> None:
    """Cheap structural checks of the raw op (the public API validates more, with context)."""
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if precision not in ("exact", "fast"):
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    heads = codebook.dim() == 3 and x.dim() == 3 and x.shape[1] == codebook.shape[0]
    plain = x.dim() == 2 and codebook.dim() == 2
    if not (heads or plain) or x.shape[-1] != codebook.shape[-1]:
        raise ValueError(
            f"x must be [N, D] and codebook [K, D] (or [N, H, D] and [H, K, D]), got "
            f"{tuple(x.shape)} and {tuple(codebook.shape)}"
        )
    if x.dtype != codebook.dtype:
        raise TypeError(f"x ({x.dtype}) and codebook ({codebook.dtype}) must share a dtype")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")


@triton_op("vqkernels::nearest_code_triton", mutates_args=())
def _nearest_code_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    precision: str,
    sample_temperature: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape[0], x.shape[-1]
    k = codebook.shape[-2]
    indices = torch.empty(x.shape[:-1], dtype=torch.int64, device=x.device)
    distance = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if n == 0:
        return indices, distance
    x2, cb2, h, stride_xh, stride_ch = head_views(x, codebook)
    aux = code_aux(cb2, metric)
    if sample_temperature > 0.0:
        sample_search(x2, cb2, aux, stride_xh, stride_ch, h, k, metric, sample_temperature, seed,
                      indices, distance)  # fmt: skip
        return indices, distance
    meta = search_meta(x, d, precision)
    splits = num_splits(n * h, k, x.device)
    part_best, part_idx = split_buffers(n, splits, x.device, h)
    wrap_triton(_nearest_code_kernel)[lambda m: (triton.cdiv(n, m["BLOCK_N"]), splits, h)](
        x2, x2.stride(0), x2.stride(1), stride_xh,
        cb2, cb2.stride(0), cb2.stride(1), stride_ch,
        aux,
        indices,
        distance,
        part_best, part_idx,
        n, k, d, h, n_bucket(n),
        EPS=COSINE_EPS,
        IS_COSINE=metric == "cosine",
        NUM_SPLITS=splits,
        **meta,
    )  # fmt: skip
    if splits > 1:
        block_n = 16 if interpreting() else 64
        wrap_triton(_nearest_combine_kernel)[(triton.cdiv(n, block_n), h)](
            x2, x2.stride(0), x2.stride(1), stride_xh,
            part_best, part_idx,
            indices,
            distance,
            n, d, h,
            EPS=COSINE_EPS,
            BLOCK_N=block_n, BLOCK_D=meta["BLOCK_D"],
            IS_COSINE=metric == "cosine",
            NUM_SPLITS=splits,
            num_warps=4,
        )  # fmt: skip
    return indices, distance


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    precision: str = "exact",
    sample_temperature: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest (or Gumbel-sampled) codebook entry per row (Triton backend).

    Args:
        x: ``[N, D]`` float32/bfloat16/float16, any strides; ``[N, H, D]`` multi-head.
        codebook: ``[K, D]`` (or ``[H, K, D]``: head h searches codebook[h]), same dtype/device.
        metric: ``"l2"`` or ``"cosine"``.
        precision: ``"exact"`` or ``"fast"`` (see the contract box above; sampling always
            computes exact fp32 products).
        sample_temperature, seed: Gumbel-max sampling (``> 0``), see
            ``vqkernels.reference.sampling`` and ``sampling.py``.

    Returns:
        ``indices [N] int64`` (``[N, H]``; ties -> lowest index), ``distance`` float32, same shape.
    """
    check_args(x, codebook, metric, precision)
    return torch.ops.vqkernels.nearest_code_triton(
        x, codebook, metric, precision, float(sample_temperature), int(seed)
    )
