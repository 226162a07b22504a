"""Triton straight-through quantize: fused search + gather + error forward, fused backward.

┌─ contract ────────────────────────────────────────────────────────────────────────────────────┐
│ quantize(x [N, D], codebook [K, D], beta, metric, codebook_loss, precision)                  │
│     -> quantized [N, D] (dtype of x; the chosen codes' values), indices [N] int64,          │
│        loss [] float32 = beta·S/numel (+ S/numel with codebook_loss), S = Σ (x − q)² in fp32 │
│        (numel = max(N·D, 1); loss = 0 when N = 0)                                            │
│ backward (grad_q [N, D], grad_loss []):                                                      │
│     grad_x        = grad_q + (2·beta/numel)·grad_loss·(x − q)        (fp32, cast to x dtype) │
│     grad_codebook = Σ_{i: idx_i = k} (−2/numel)·grad_loss·(x_i − q_i)  (codebook_loss only) │
│ estimator "rotation": grad_x = s·(g − 2w(w·g) + 2u(q̂·g)) + the loss term (LR's rotate_to). │
│ Multi-head: x [N, H, D], codebook [H, K, D], indices [N, H] (grid axis 2 = head).           │
│ Deterministic: the loss and the codebook gradient are reduced in a fixed order.              │
└──────────────────────────────────────────────────────────────────────────────────────────────┘

Forward: the search of ``nearest_code.py`` (same tiles, same tie rule) followed, in the same
program, by the gather of the chosen rows, the store of ``quantized`` and the per-row squared
error (fp32); one single-program kernel then sums the per-row errors in order into the loss.
Backward: one elementwise kernel for ``grad_x`` (gathers ``q`` again instead of saving an
``[N, D]`` tensor) and, for the codebook, the deterministic sort + segmented reduction of
``ema_update.py`` over ``x_i − c_{idx_i}``, scaled once per code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._search import (
    fold_splits,
    interpreting,
    n_bucket,
    search_autotune,
    search_meta,
    search_rows,
    split_range,
)
from .ema_update import numel_f32, segment_sums
from .nearest_code import check_args, code_aux, head_views, num_splits, split_buffers

__all__ = ["quantize", "quantize_backward"]


@triton.jit
def _quantize_epilogue(
    x_ptr, stride_xd,
    cb_ptr, stride_ck, stride_cd,
    q_ptr, stride_qn,
    idx_ptr, err_ptr,
    row_off, offs_n, out_off, mask_n, best_idx,
    D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """q = codebook[idx] (stored in the codebook dtype = x dtype, bit-exact copies of the codes)
    and err = Σ_d (x − q)² in fp32; index and err stored at ``out_off`` (n·H + h)."""
    code_off = best_idx.to(tl.int64) * stride_ck
    q_off = offs_n.to(tl.int64) * stride_qn
    err = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        q = tl.load(cb_ptr + code_off[:, None] + offs_d[None, :] * stride_cd, mask=mask, other=0.0)
        xv = tl.load(x_ptr + row_off[:, None] + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
        tl.store(q_ptr + q_off[:, None] + offs_d[None, :], q, mask=mask)
        diff = xv.to(tl.float32) - q.to(tl.float32)
        err += tl.sum(diff * diff, axis=1)
    tl.store(idx_ptr + out_off, best_idx.to(tl.int64), mask=mask_n)
    tl.store(err_ptr + out_off, err, mask=mask_n)


@search_autotune
@triton.jit
def _quantize_fwd_kernel(
    x_ptr, stride_xn, stride_xd, stride_xh,
    cb_ptr, stride_ck, stride_cd, stride_ch,
    aux_ptr,
    q_ptr, stride_qn, stride_qh,
    idx_ptr,
    err_ptr,
    part_best_ptr, part_idx_ptr,
    N, K, D, H, N_BUCKET,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_COSINE: tl.constexpr, IS_SINGLE_D_TILE: tl.constexpr,
    USE_TF32: tl.constexpr, IS_ROUND_TF32: tl.constexpr, IS_UPCAST_DOT: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), NUM_SPLITS, H): search (of this split's code range), then with one
    split the gather/error epilogue, else (best, index) partials for the combine kernel.  Axis 2
    is the head (x[:, h] against codebook[h]; H = 1 for a plain codebook)."""
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
        _quantize_epilogue(
            x_ptr, stride_xd, cb_ptr, stride_ck, stride_cd, q_ptr + pid_h.to(tl.int64) * stride_qh,
            stride_qn, idx_ptr, err_ptr, row_off, offs_n, out_off, mask_n, best_idx, D, BLOCK_N,
            BLOCK_D,
        )  # fmt: skip
    else:
        part = (pid_h * NUM_SPLITS + tl.program_id(1)).to(tl.int64) * N + offs_n
        tl.store(part_best_ptr + part, best, mask=mask_n)
        tl.store(part_idx_ptr + part, best_idx, mask=mask_n)


@triton.jit
def _quantize_combine_kernel(
    x_ptr, stride_xn, stride_xd, stride_xh,
    cb_ptr, stride_ck, stride_cd, stride_ch,
    part_best_ptr, part_idx_ptr,
    q_ptr, stride_qn, stride_qh,
    idx_ptr,
    err_ptr,
    N, D, H,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), H)."""
    pid_h = tl.program_id(1)
    x_ptr += pid_h.to(tl.int64) * stride_xh
    cb_ptr += pid_h.to(tl.int64) * stride_ch
    part_off = pid_h.to(tl.int64) * NUM_SPLITS * N
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_off = offs_n.to(tl.int64) * stride_xn
    _, best_idx = fold_splits(
        part_best_ptr + part_off, part_idx_ptr + part_off, offs_n, mask_n, N, BLOCK_N, NUM_SPLITS
    )
    out_off = offs_n.to(tl.int64) * H + pid_h
    _quantize_epilogue(
        x_ptr, stride_xd, cb_ptr, stride_ck, stride_cd, q_ptr + pid_h.to(tl.int64) * stride_qh,
        stride_qn, idx_ptr, err_ptr, row_off, offs_n, out_off, mask_n, best_idx, D, BLOCK_N,
        BLOCK_D,
    )  # fmt: skip


@triton.jit
def _loss_kernel(
    err_ptr,
    loss_ptr,
    N, D,
    beta,
    BLOCK: tl.constexpr,
    HAS_CODEBOOK_LOSS: tl.constexpr,
):  # fmt: skip
    """loss = beta·(S/numel) [+ S/numel], S = Σ err in a fixed order (one program).

    numel = max(N·D, 1) is formed here from the int sizes (a symbolic size under torch.compile
    must not become a Python float, which would specialize the graph) and rounded to fp32, as
    the reference's fp32 tensor / int division does."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        acc += tl.load(err_ptr + offs, mask=offs < N, other=0.0)
    mean = tl.div_rn(tl.sum(acc, axis=0), numel_f32(N, D))
    loss = beta * mean
    if HAS_CODEBOOK_LOSS:
        loss = loss + mean
    tl.store(loss_ptr, loss)


@triton.jit
def _quantize_bwd_x_kernel(
    gq_ptr, stride_gn, stride_gd,
    gl_ptr,
    x_ptr, stride_xn, stride_xd,
    cb_ptr, stride_ck, stride_cd,
    idx_ptr,
    gx_ptr, stride_on,
    beta,
    N, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """grad_x = grad_q + (coef·grad_loss)·(x − codebook[idx]), fp32, stored in the x dtype;
    coef = 2·beta/numel in fp32 with numel = max(N·D, 1) (the reference multiplies the two
    scalars first; numel is computed here so no size becomes a Python float)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d[None, :] < D)
    rows = offs_n.to(tl.int64)
    idx = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
    g = tl.div_rn(2.0 * beta, numel_f32(N, D)) * tl.load(gl_ptr).to(tl.float32)
    xv = tl.load(
        x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask, other=0.0
    )
    q = tl.load(
        cb_ptr + idx[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=mask, other=0.0
    )
    gq = tl.load(
        gq_ptr + rows[:, None] * stride_gn + offs_d[None, :] * stride_gd, mask=mask, other=0.0
    )
    gx = gq.to(tl.float32) + g * (xv.to(tl.float32) - q.to(tl.float32))
    tl.store(gx_ptr + rows[:, None] * stride_on + offs_d[None, :], gx, mask=mask)


@triton.jit
def _quantize_bwd_x_rotation_kernel(
    gq_ptr, stride_gn, stride_gd,
    gl_ptr,
    x_ptr, stride_xn, stride_xd,
    cb_ptr, stride_ck, stride_cd,
    idx_ptr,
    gx_ptr, stride_on,
    beta,
    N, D,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rotation-trick backward (LR 1.32's rotate_to), O(D) per row in three passes over D tiles:
    norms; (u + q̂)·g and q̂·g; then grad_x = s·g − a·(u + q̂) + b·u + coef·grad_loss·(x − q)
    with u = x/max(‖x‖, ε), q̂ = q/max(‖q‖, ε), s = ‖q‖/max(‖x‖, ε),
    a = 2s((u + q̂)·g)/max(‖u + q̂‖, ε)² and b = 2s(q̂·g) (ε = 1e-6), all fp32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    idx = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
    x_row = rows[:, None] * stride_xn
    c_row = idx[:, None] * stride_ck
    g_row = rows[:, None] * stride_gn
    xx = tl.zeros([BLOCK_N], dtype=tl.float32)
    qq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        xv = tl.load(x_ptr + x_row + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        qv = tl.load(cb_ptr + c_row + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
        xx += tl.sum(xv * xv, axis=1)
        qq += tl.sum(qv * qv, axis=1)
    xn = tl.sqrt_rn(xx)
    qn = tl.sqrt_rn(qq)
    cu = tl.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), tl.maximum(xn, EPS))
    cq = tl.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), tl.maximum(qn, EPS))
    vv = tl.zeros([BLOCK_N], dtype=tl.float32)
    vg = tl.zeros([BLOCK_N], dtype=tl.float32)
    qg = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        xv = tl.load(x_ptr + x_row + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        qv = tl.load(cb_ptr + c_row + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(gq_ptr + g_row + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        v = cu[:, None] * xv + cq[:, None] * qv
        vv += tl.sum(v * v, axis=1)
        vg += tl.sum(v * gv, axis=1)
        qg += tl.sum(cq[:, None] * qv * gv, axis=1)
    vn = tl.maximum(tl.sqrt_rn(vv), EPS)
    s = qn * cu
    a = tl.div_rn(2.0 * s * vg, vn * vn)
    b = 2.0 * s * qg
    coef = tl.div_rn(2.0 * beta, numel_f32(N, D)) * tl.load(gl_ptr).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        xv = tl.load(x_ptr + x_row + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        qv = tl.load(cb_ptr + c_row + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(gq_ptr + g_row + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        u = cu[:, None] * xv
        gx = s[:, None] * gv - a[:, None] * (u + cq[:, None] * qv) + b[:, None] * u
        gx = gx + coef * (xv - qv)
        tl.store(gx_ptr + rows[:, None] * stride_on + offs_d[None, :], gx, mask=mask)


# ------------------------------------------------------------------------------- launchers


@triton_op("vqkernels::quantize_triton", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    beta: float,
    metric: str,
    codebook_loss: bool,
    precision: str,
    estimator: str = "ste",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (the estimator only changes the backward)
    n, d = x.shape[0], x.shape[-1]
    k = codebook.shape[-2]
    x2, cb2, h, stride_xh, stride_ch = head_views(x, codebook)
    quantized = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    indices = torch.empty(x.shape[:-1], dtype=torch.int64, device=x.device)
    loss = torch.empty((), dtype=torch.float32, device=x.device)
    err = torch.empty(n * h, dtype=torch.float32, device=x.device)
    stride_qn = h * d
    if n > 0:
        aux = code_aux(cb2, metric)
        meta = search_meta(x, d, precision)
        splits = num_splits(n * h, k, x.device)
        part_best, part_idx = split_buffers(n, splits, x.device, h)
        wrap_triton(_quantize_fwd_kernel)[lambda m: (triton.cdiv(n, m["BLOCK_N"]), splits, h)](
            x2, x2.stride(0), x2.stride(1), stride_xh,
            cb2, cb2.stride(0), cb2.stride(1), stride_ch,
            aux,
            quantized, stride_qn, d,
            indices,
            err,
            part_best, part_idx,
            n, k, d, h, n_bucket(n),
            IS_COSINE=metric == "cosine",
            NUM_SPLITS=splits,
            **meta,
        )  # fmt: skip
        if splits > 1:
            block_n = 16 if interpreting() else 64
            wrap_triton(_quantize_combine_kernel)[(triton.cdiv(n, block_n), h)](
                x2, x2.stride(0), x2.stride(1), stride_xh,
                cb2, cb2.stride(0), cb2.stride(1), stride_ch,
                part_best, part_idx,
                quantized, stride_qn, d,
                indices,
                err,
                n, d, h,
                BLOCK_N=block_n, BLOCK_D=meta["BLOCK_D"],
                NUM_SPLITS=splits,
                num_warps=4,
            )  # fmt: skip
    # N = 0 runs too: the sum of nothing is 0, so loss = 0 as in the reference.
    wrap_triton(_loss_kernel)[(1,)](
        err,
        loss,
        n * h, d,
        float(beta),
        BLOCK=64 if interpreting() else 1024,
        HAS_CODEBOOK_LOSS=codebook_loss,
    )  # fmt: skip
    return quantized, indices, loss


@triton_op("vqkernels::quantize_backward_triton", mutates_args=())
def _quantize_backward_op(
    grad_quantized: torch.Tensor,
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    beta: float,
    codebook_loss: bool,
    estimator: str = "ste",
) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    x_shape = x.shape
    # Multi-head: every (row, head) vector is a row of x [N·H, D] against the flattened codebook
    # [H·K, D] with the global code h·K + idx (the backward has no per-head search).
    if codebook.dim() == 3:
        h, kh = codebook.shape[0], codebook.shape[1]
        offs = torch.arange(h, dtype=torch.int64, device=x.device) * kh
        indices = (indices + offs).reshape(-1)
        x = x.reshape(-1, d)
        grad_quantized = grad_quantized.reshape(-1, d)
    cb_shape = codebook.shape
    codebook = codebook.reshape(-1, d)
    n = x.shape[0]
    k = codebook.shape[0]
    grad_x = torch.empty((n, d), dtype=x.dtype, device=x.device)
    g = grad_loss.to(torch.float32).reshape(())
    if n > 0:
        block_n = 16 if interpreting() else 32
        block_d = min(max(16, triton.next_power_of_2(d)), 32 if interpreting() else 128)
        if estimator == "rotation":
            # 3 row tiles live at once (x, q, grad): BLOCK_D <= 64 keeps a 32-row tile of
            # 4 warps under the register cap on sm_90 (no spills; tests/backends/test_triton.py).
            block_d = min(block_d, 64)
            wrap_triton(_quantize_bwd_x_rotation_kernel)[(triton.cdiv(n, block_n),)](
                grad_quantized, grad_quantized.stride(0), grad_quantized.stride(1),
                g,
                x, x.stride(0), x.stride(1),
                codebook, codebook.stride(0), codebook.stride(1),
                indices,
                grad_x, grad_x.stride(0),
                float(beta),
                n, d,
                EPS=1e-6,
                BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=4,
            )  # fmt: skip
        else:
            wrap_triton(_quantize_bwd_x_kernel)[
                (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
            ](
                grad_quantized, grad_quantized.stride(0), grad_quantized.stride(1),
                g,
                x, x.stride(0), x.stride(1),
                codebook, codebook.stride(0), codebook.stride(1),
                indices,
                grad_x, grad_x.stride(0),
                float(beta),
                n, d,
                BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=4,
            )  # fmt: skip
    if codebook_loss:
        grad_cb = torch.empty((k, d), dtype=codebook.dtype, device=codebook.device)
        counts = torch.empty(k, dtype=torch.float32, device=codebook.device)  # unused by-product
        segment_sums(x, indices, k, grad_cb, counts, codebook=codebook, scale=-2.0, scale_tensor=g)
        grad_cb = grad_cb.reshape(cb_shape)
    else:
        grad_cb = codebook.new_empty((0,))
    return grad_x.reshape(x_shape), grad_cb


def _setup_context(ctx, inputs, output):
    x, codebook, beta, metric, codebook_loss, precision = inputs[:6]
    ctx.estimator = inputs[6] if len(inputs) > 6 else "ste"
    _, indices, _ = output
    ctx.save_for_backward(x, codebook, indices)
    ctx.beta = beta
    ctx.codebook_loss = codebook_loss
    ctx.mark_non_differentiable(indices)


def _backward(ctx, grad_quantized, grad_indices, grad_loss):
    x, codebook, indices = ctx.saved_tensors
    if grad_quantized is None:
        grad_quantized = torch.zeros_like(x)
    if grad_loss is None:
        grad_loss = x.new_zeros((), dtype=torch.float32)
    grad_x, grad_cb = torch.ops.vqkernels.quantize_backward_triton(
        grad_quantized, grad_loss, x, codebook, indices, ctx.beta, ctx.codebook_loss, ctx.estimator
    )
    return grad_x, (grad_cb if ctx.codebook_loss else None), None, None, None, None, None


_quantize_op.register_autograd(_backward, setup_context=_setup_context)


def quantize_backward(
    grad_quantized: torch.Tensor,
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    beta: float,
    codebook_loss: bool,
    estimator: str = "ste",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused backward on its own (for tests and benchmarks).

    Args:
        grad_quantized: ``[N, D]`` (dtype of x), any strides.  grad_loss: ``[]`` float.
        x: ``[N, D]``; codebook: ``[K, D]``; indices: ``[N] int64`` in ``[0, K)`` (multi-head:
        ``[N, H, D]``, ``[H, K, D]``, ``[N, H]``).  estimator: ``"ste"`` or ``"rotation"``.

    Returns:
        ``grad_x`` (shape/dtype of x) and ``grad_codebook`` (shape/dtype of codebook) or None.
    """
    gx, gc = torch.ops.vqkernels.quantize_backward_triton(
        grad_quantized, grad_loss, x, codebook, indices, float(beta), bool(codebook_loss),
        estimator,
    )  # fmt: skip
    return gx, (gc if codebook_loss else None)


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    metric: str = "l2",
    codebook_loss: bool | None = None,
    precision: str = "exact",
    estimator: str = "ste",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantization with the VQ-VAE losses (Triton backend, differentiable); straight-through or
    rotation-trick (``estimator="rotation"``) gradient; multi-head with ``[H, K, D]`` codebooks.

    Args:
        x: ``[N, D]`` float32/bfloat16/float16, any strides.
        codebook: ``[K, D]``, same dtype and device.
        beta: commitment weight.  metric: ``"l2"`` or ``"cosine"`` (search only; the loss is the
            squared error).  codebook_loss: add ``mean((sg(x) − q)²)`` (defaults to
            ``codebook.requires_grad``).  precision: ``"exact"`` or ``"fast"`` search products.

    Returns:
        ``quantized [N, D]`` (dtype of x), ``indices [N] int64``, ``loss [] float32``.
    """
    check_args(x, codebook, metric, precision)
    if codebook_loss is None:
        codebook_loss = codebook.requires_grad
    if estimator not in ("ste", "rotation"):
        raise ValueError(f"estimator must be 'ste' or 'rotation', got {estimator!r}")
    return torch.ops.vqkernels.quantize_triton(
        x, codebook, float(beta), metric, bool(codebook_loss), precision, estimator
    )
