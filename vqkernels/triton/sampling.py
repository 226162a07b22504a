"""Triton Gumbel-max sampling fused into the nearest-code search.

┌─ contract ────────────────────────────────────────────────────────────────────────────────────┐
│ sample_search(x [N, D] (row view of head 0), codebook rows [H·K, D], aux [H·K], ...)         │
│   -> indices [N(, H)] int64, distance [N(, H)] float32   (written into the given outputs)     │
│   index = argmin_k(−logit_k·(1/τ) − g(seed, n·H + h, k))  (ties -> lowest index), with       │
│   logit = −sqrt(max(‖c‖² − 2x·c + ‖x‖², 1e-8)) (l2, LR's −cdist) or −(−x·ĉ)/max(‖x‖, ε)     │
│   (cosine similarity), g the counter-based Gumbel noise of vqkernels/reference/sampling.py;  │
│   distance = that of the chosen code (squared L2 clamped >= 0, or 1 − cosine).               │
│   Extra memory: none beyond the outputs (never N×K).                                         │
└──────────────────────────────────────────────────────────────────────────────────────────────┘

One program owns BLOCK_N rows of one head (grid axis 1) and streams the codebook in BLOCK_K
blocks: fp32 products (``tl.dot``, ieee; half inputs are upcast, their products are exact in
fp32), the scores, the logits, the noise of every (row, code) pair of the block from the hash,
and a running (perturbed best, index, unperturbed score) per row, folded with a strict ``<`` in
ascending k (lowest index among ties, as the reference's ``min``).  The hash runs on int64 lanes
holding 32-bit words (both multipliers < 2^31: no overflow), exactly as the reference.
Numerics: the products are summed in another order than the reference's matmul, and the logs
come from another math library, so a choice may differ from the reference's only where two
perturbed scores are within float rounding of each other (tests count those).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference.sampling import MASK32, SEED_SALT, mix32
from ._search import row_sq_norm

__all__ = ["sample_search"]

COSINE_EPS = 1e-12
SAMPLE_L2_EPS = 1e-8


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _mix32(v):
    """lowbias32 on int64 lanes holding 32-bit words (vqkernels.reference.sampling.mix32)."""
    v = v ^ (v >> 16)
    v = (v * 0x21F0AAAD) & 0xFFFFFFFF
    v = v ^ (v >> 15)
    v = (v * 0x735A2D97) & 0xFFFFFFFF
    return v ^ (v >> 15)


@triton.jit
def _sample_kernel(
    x_ptr, stride_xn, stride_xd, stride_xh,
    cb_ptr, stride_ck, stride_cd, stride_ch,
    aux_ptr,
    idx_ptr, dist_ptr,
    seed_key, inv_temp,
    N, K, D, H,
    EPS: tl.constexpr, L2_EPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_COSINE: tl.constexpr,
):  # fmt: skip
    pid_h = tl.program_id(1)
    x_ptr += pid_h.to(tl.int64) * stride_xh
    cb_ptr += pid_h.to(tl.int64) * stride_ch
    aux_ptr += pid_h.to(tl.int64) * K
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_off = offs_n.to(tl.int64) * stride_xn
    # ‖x‖² in fp32 (the reference's offset); its square root for the cosine logits.
    xsq = row_sq_norm(x_ptr, row_off, mask_n, stride_xd, D, BLOCK_N, BLOCK_D)
    x_norm = tl.maximum(tl.sqrt_rn(xsq), EPS)
    # Row keys of the RNG: counter n·H + h (seed_key already mixes both seed halves).
    counter = offs_n.to(tl.int64) * H + pid_h
    key = _mix32(seed_key.to(tl.int64) ^ (counter >> 32))
    key = _mix32(key ^ (counter & 0xFFFFFFFF))

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_score = tl.zeros([BLOCK_N], dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        col_off = offs_k.to(tl.int64) * stride_ck
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            a = tl.load(
                x_ptr + row_off[:, None] + offs_d[None, :] * stride_xd,
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            b = tl.load(
                cb_ptr + col_off[None, :] + offs_d[:, None] * stride_cd,
                mask=mask_k[None, :] & mask_d[:, None],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        aux = tl.load(aux_ptr + offs_k, mask=mask_k, other=0.0)
        if IS_COSINE:
            score = -(acc * aux[None, :])
            logit = tl.div_rn(-score, x_norm[:, None])  # IEEE division, as the reference
        else:
            score = aux[None, :] - 2.0 * acc
            logit = -tl.sqrt_rn(tl.maximum(score + xsq[:, None], L2_EPS))
        bits = _mix32(key[:, None] ^ _mix32(offs_k.to(tl.int64))[None, :])
        u = ((bits >> 9) * 2 + 1).to(tl.float32) * 5.960464477539063e-08  # 2^-24
        g = -tl.log(-tl.log(u))
        z = -(logit * inv_temp) - g
        z = tl.where(mask_k[None, :] & (z == z), z, float("inf"))
        blk_min, blk_arg = tl.min(
            z, axis=1, return_indices=True, return_indices_tie_break_left=True
        )
        blk_score = tl.sum(
            tl.where(tl.arange(0, BLOCK_K)[None, :] == blk_arg[:, None], score, 0.0), axis=1
        )
        better = blk_min < best
        best = tl.where(better, blk_min, best)
        best_idx = tl.where(better, k0 + blk_arg.to(tl.int32), best_idx)
        best_score = tl.where(better, blk_score, best_score)
    if IS_COSINE:
        dist = 1.0 + tl.div_rn(best_score, x_norm)
    else:
        dist = tl.maximum(best_score + xsq, 0.0)
    out_off = offs_n.to(tl.int64) * H + pid_h
    tl.store(idx_ptr + out_off, best_idx.to(tl.int64), mask=mask_n)
    tl.store(dist_ptr + out_off, dist, mask=mask_n)


def seed_key(seed: int) -> int:
    """The seed half of every row key (``mix32(mix32(seed_hi ^ salt) ^ seed_lo)``), on the host."""
    base = mix32(torch.tensor(((seed >> 32) ^ SEED_SALT) & MASK32, dtype=torch.int64))
    return int(mix32(base ^ (seed & MASK32)))


def sample_search(
    x2: torch.Tensor,
    cb2: torch.Tensor,
    aux: torch.Tensor,
    stride_xh: int,
    stride_ch: int,
    heads: int,
    k: int,
    metric: str,
    temperature: float,
    seed: int,
    indices: torch.Tensor,
    distance: torch.Tensor,
) -> None:
    """Launch the sampling kernel (inside a triton_op).  ``x2`` is the row view of head 0
    (``[N, D]``), head h at ``h·stride_xh``; ``cb2 [H·K, D]`` with head h at ``h·stride_ch``."""
    n, d = x2.shape
    interp = _interpreting()
    block_n = 16 if interp else 64
    block_k = 16 if interp else 64
    block_d = min(max(16, triton.next_power_of_2(d)), 32 if interp else 64)
    wrap_triton(_sample_kernel)[(triton.cdiv(n, block_n), heads)](
        x2, x2.stride(0), x2.stride(1), stride_xh,
        cb2, cb2.stride(0), cb2.stride(1), stride_ch,
        aux,
        indices, distance,
        seed_key(seed), 1.0 / temperature,
        n, k, d, heads,
        EPS=COSINE_EPS, L2_EPS=SAMPLE_L2_EPS,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
        IS_COSINE=metric == "cosine",
        num_warps=4,
    )  # fmt: skip
