"""Building blocks shared by the Triton search kernels (``nearest_code``, the ``quantize``
forward, ``sampling``): the search autotuning (configs, pruning, launch constants) and the
``@triton.jit`` pieces of the K-streaming running argmin.

The ``@triton.jit`` helpers are inlined by Triton into each kernel, so sharing them changes no
generated code.  See ``nearest_code``'s module docs for the contract and the numerics (fixed
``BLOCK_D`` accumulation order, tf32 rounding, ties to the lowest index across splits).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def row_sq_norm(x_ptr, row_off, mask_n, stride_xd, D, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):  # fmt: skip
    """``‖x_i‖²`` of a ``[BLOCK_N]`` row tile, accumulated in fp32 over ``BLOCK_D`` chunks in
    order (the reference's offset: the same products, summed in fp32).  ``row_off`` is the int64
    row offset ``i·stride_xn``; masked rows read 0 and give 0."""
    xsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        xv = tl.load(
            x_ptr + row_off[:, None] + offs_d[None, :] * stride_xd,
            mask=mask_n[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        xsq += tl.sum(xv * xv, axis=1)
    return xsq


try:  # torch >= 2.10: a size hint for optimization decisions that installs no guard
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _optimization_hint
except ImportError:  # pragma: no cover - older torch

    def _optimization_hint(v, fallback=None):
        return int(v)


def size_hint(v) -> int:
    """A concrete int for a size that may be symbolic (``torch.compile`` with dynamic shapes).

    Only for choices that cannot change results (autotuning keys, split counts): no guard is
    installed, so the compiled graph is not specialized on the size."""
    return v if isinstance(v, int) else int(_optimization_hint(v, fallback=4096))


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------------------ autotuning

# (BLOCK_N, BLOCK_K, num_warps, num_stages).  H100/H200: 227 KB of shared memory per block,
# wgmma tiles of 64 rows per warpgroup.  Every config keeps the fp32 score accumulator at
# BLOCK_N·BLOCK_K / (32·num_warps) <= 64 registers per thread: compiled for sm_90 (Triton 3.9,
# ahead of time, cuobjdump -res-usage), 128x128 tiles with 4 warps and 128x256 / 256x128 tiles
# with 8 warps hit the 255-register cap and spill (local-memory LDL/STL in the SASS), while these
# stay under it and use HGMMA for bf16/fp16/tf32 (the 32-row config uses mma.sync).  The fp32
# "ieee" (FMA) path is pruned further to <= 32 accumulator registers per thread (the last four).
# tests/backends/test_triton.py::test_sm90_* recompiles them and checks for spills (marker slow).
_HOPPER_SHAPES = [  # in order of preference (VQKERNELS_TRITON_AUTOTUNE=0 takes the first fit)
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (256, 64, 8, 3),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
    (128, 64, 8, 3),
    (64, 128, 8, 3),
    (64, 64, 4, 3),
    (32, 64, 4, 2),
]
# Under the interpreter every program runs in numpy: one small config, no benchmarking.
_INTERPRET_SHAPES = [(16, 16, 1, 1)]


def _configs() -> list[triton.Config]:
    shapes = _INTERPRET_SHAPES if interpreting() else _HOPPER_SHAPES
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in shapes
    ]


SEARCH_CONFIGS = _configs()

_SMEM_BUDGET = 200 * 1024  # of 228 KB on Hopper; leaves room for the reduction scratch


def prune_search_configs(configs, named_args, **kwargs):
    """Drop configs that are too big for the problem or for shared memory (fewer to benchmark).

    Keeps at least the smallest config so something always runs."""
    k = size_hint(named_args["K"])
    elsize = named_args["x_ptr"].element_size()
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    single = kwargs.get("IS_SINGLE_D_TILE", named_args.get("IS_SINGLE_D_TILE"))
    use_tf32 = kwargs.get("USE_TF32", named_args.get("USE_TF32"))
    # fp32 "ieee" products run on the FMA units with both operands in registers: only tiles
    # with <= 32 accumulator registers per thread compile without spilling (sm_90, measured);
    # tensor-core (wgmma) tiles keep <= 64.
    acc_cap = 32 if (elsize == 4 and not use_tf32) else 64
    k_cap = max(16, triton.next_power_of_2(k))
    n_cap = max(16, size_hint(named_args["N_BUCKET"]))
    kept = []
    for c in configs:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bk > k_cap or bn > n_cap:
            continue
        if bn * bk > acc_cap * 32 * c.num_warps:
            continue
        x_tile = bn * block_d * elsize * (1 if single else c.num_stages)
        smem = c.num_stages * bk * block_d * elsize + x_tile
        if smem > _SMEM_BUDGET:
            continue
        kept.append(c)
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    if not autotune_enabled():
        kept = kept[:1]  # the list is in order of preference: no benchmarking at all
    return kept


# The autotuning of every kernel that runs the search (nearest_code and the quantize forward):
# one decorator, so both kernels tune over the same configs, pruned alike, keyed on the same
# arguments (N only through its power-of-two bucket).
search_autotune = triton.autotune(
    configs=SEARCH_CONFIGS,
    key=["K", "D", "N_BUCKET", "IS_COSINE", "USE_TF32", "NUM_SPLITS"],
    prune_configs_by={"early_config_prune": prune_search_configs},
)


def autotune_enabled() -> bool:
    """``VQKERNELS_TRITON_AUTOTUNE=0`` skips the timing runs of the search kernels and uses the
    first (preferred) config that fits: faster first calls, one config in every process."""
    return os.environ.get("VQKERNELS_TRITON_AUTOTUNE", "1") not in ("0", "false", "False", "")


def search_meta(x: torch.Tensor, d: int, precision: str, interpret: bool | None = None) -> dict:
    """Launch constants shared by the search kernels (nearest_code, quantize forward).

    ``BLOCK_D`` is chosen here (not autotuned: it fixes the accumulation order, see module doc):
    the whole row when it fits one tile, else 128-byte column tiles (64 half / 32 fp32 values,
    one 128 B swizzled shared-memory row on Hopper)."""
    interpret = interpreting() if interpret is None else interpret
    elsize = x.element_size()
    d_pow2 = max(16, triton.next_power_of_2(d))
    # Caps measured for sm_90 (see _HOPPER_SHAPES): wider single tiles either exceed the
    # shared-memory budget with the x tile resident or spill registers.
    single_cap = 128 if elsize == 2 else 64
    if interpret:
        single_cap = 64  # keep the numpy tiles small
    if d_pow2 <= single_cap:
        block_d, single = d_pow2, True
    else:
        block_d, single = (64 if elsize == 2 else 32), False
    return {
        "BLOCK_D": block_d,
        "IS_SINGLE_D_TILE": single,
        "USE_TF32": precision == "fast" and x.dtype == torch.float32,
        # PTX inline asm: not available to the interpreter (which multiplies in fp32 anyway)
        "IS_ROUND_TF32": precision == "fast" and x.dtype == torch.float32 and not interpret,
        # Triton 3.9's interpreter multiplies bf16 tiles as raw uint16 bit patterns; upcast there
        # (bf16 x bf16 products are exact in fp32, so this is the same arithmetic).
        "IS_UPCAST_DOT": interpret and x.dtype == torch.bfloat16,
    }


def n_bucket(n: int) -> int:
    """Autotuning key for N: its power-of-two bucket (occupancy depends on N, not its exact value)."""
    return min(triton.next_power_of_2(max(size_hint(n), 1)), 1 << 20)


# ------------------------------------------------------------------ search building blocks


@triton.jit
def round_tf32(v):
    """Round fp32 to the nearest tf32 value (10-bit mantissa; ties away from zero).  The tensor
    cores read only the top 19 bits of an fp32 operand, i.e. they truncate: rounding first
    halves the worst-case input error (2^-11 instead of 2^-10 relative), the figure the
    "fast" tolerance of vqkernels.testing assumes.  One cvt per loaded element: negligible
    next to the BLOCK_N·BLOCK_K·BLOCK_D products it feeds."""
    return tl.inline_asm_elementwise(
        "cvt.rna.tf32.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _fold_block(
    acc, aux_ptr, k0, K, best, best_idx,
    BLOCK_K: tl.constexpr,
    IS_COSINE: tl.constexpr,
):  # fmt: skip
    """Scores of one codebook block from its products ``acc [BLOCK_N, BLOCK_K]`` and the fold
    into the running (best, best_idx)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    aux = tl.load(aux_ptr + offs_k, mask=mask_k, other=0.0)
    if IS_COSINE:
        score = -(acc * aux[None, :])
    else:
        # -2·acc is exact (power of two), so this rounds once, like the reference's c_sq − 2·(x@cᵀ)
        score = aux[None, :] - 2.0 * acc
    # Padding columns and NaN scores (score != score) can never win.
    score = tl.where(mask_k[None, :] & (score == score), score, float("inf"))
    blk_min, blk_arg = tl.min(
        score, axis=1, return_indices=True, return_indices_tie_break_left=True
    )
    better = blk_min < best  # strict: an equal score in a later block keeps the lower index
    best = tl.where(better, blk_min, best)
    best_idx = tl.where(better, k0 + blk_arg.to(tl.int32), best_idx)
    return best, best_idx


@triton.jit
def search_rows(
    x_ptr, stride_xn, stride_xd,
    cb_ptr, stride_ck, stride_cd,
    aux_ptr,
    row_off, mask_n,
    k_lo, k_hi, K, D,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_COSINE: tl.constexpr, IS_SINGLE_D_TILE: tl.constexpr,
    USE_TF32: tl.constexpr, IS_ROUND_TF32: tl.constexpr, IS_UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Running (best score, best index) over codes ``[k_lo, k_hi)`` for a tile of rows.

    ``row_off [BLOCK_N] int64`` are the rows' element offsets (``n * stride_xn``); ``k_lo`` is a
    multiple of BLOCK_K and ``k_hi`` one too or K, so blocks never straddle two splits."""
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    if IS_SINGLE_D_TILE:
        # The x tile stays on chip for the whole K sweep; the K loop is the innermost loop, so
        # the compiler pipelines the codebook tile loads over num_stages buffers.
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = tl.load(
            x_ptr + row_off[:, None] + offs_d[None, :] * stride_xd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        if IS_UPCAST_DOT:
            a = a.to(tl.float32)
        if IS_ROUND_TF32:
            a = round_tf32(a)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            b = tl.load(
                cb_ptr + offs_k[None, :].to(tl.int64) * stride_ck + offs_d[:, None] * stride_cd,
                mask=(offs_k[None, :] < K) & mask_d[:, None],
                other=0.0,
            )
            if IS_UPCAST_DOT:
                b = b.to(tl.float32)
            if IS_ROUND_TF32:
                b = round_tf32(b)
            if USE_TF32:
                acc = tl.dot(a, b, input_precision="tf32")
            else:
                acc = tl.dot(a, b, input_precision="ieee")
            best, best_idx = _fold_block(acc, aux_ptr, k0, K, best, best_idx, BLOCK_K, IS_COSINE)
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            col_off = offs_k.to(tl.int64) * stride_ck
            mask_k = offs_k < K
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                a = tl.load(
                    x_ptr + row_off[:, None] + offs_d[None, :] * stride_xd,
                    mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0,
                )
                b = tl.load(
                    cb_ptr + col_off[None, :] + offs_d[:, None] * stride_cd,
                    mask=mask_k[None, :] & mask_d[:, None],
                    other=0.0,
                )
                if IS_UPCAST_DOT:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IS_ROUND_TF32:
                    a = round_tf32(a)
                    b = round_tf32(b)
                if USE_TF32:
                    acc = tl.dot(a, b, acc, input_precision="tf32")
                else:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
            best, best_idx = _fold_block(acc, aux_ptr, k0, K, best, best_idx, BLOCK_K, IS_COSINE)
    return best, best_idx


@triton.jit
def split_range(K, BLOCK_K: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Codes ``[k_lo, k_hi)`` of this program's split (program_id(1)): whole BLOCK_K blocks,
    consecutive ascending ranges (empty for trailing splits when K is small)."""
    per = tl.cdiv(tl.cdiv(K, BLOCK_K), NUM_SPLITS) * BLOCK_K
    k_lo = tl.program_id(1) * per
    return k_lo, tl.minimum(k_lo + per, K)


@triton.jit
def fold_splits(
    part_best_ptr, part_idx_ptr,
    offs_n, mask_n,
    N,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """Combine the per-split (best, index) partials ``[NUM_SPLITS, N]`` of a row tile.  Splits
    cover ascending code ranges and replace the running pair only on a strict ``<``: the lowest
    index among ties, exactly as one program sweeping all of K would choose."""
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for s in tl.static_range(NUM_SPLITS):
        b = tl.load(part_best_ptr + s * N + offs_n, mask=mask_n, other=float("inf"))
        i = tl.load(part_idx_ptr + s * N + offs_n, mask=mask_n, other=0)
        better = b < best
        best = tl.where(better, b, best)
        best_idx = tl.where(better, i, best_idx)
    return best, best_idx
