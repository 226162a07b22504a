"""Triton ``soft_quantize`` (family codebook_softmax; contract and pass structure in
``codebook_softmax.py``): the row pass keeps the running max, the rescaled ``Σ e^{l−m}·v`` and the
running argmax; the backward recomputes the tiles (FlashAttention-2): a row pass for ``grad_x``, a
code pass for ``grad_keys`` and ``grad_values``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .codebook_softmax_tiles import (
    _METRIC_IDS,
    _args,
    _blocks,
    _check,
    _e_factor,
    _load_rows,
    _logits,
    _relative_lse,
    _sq_norms,
    _store_operand_grad,
)

__all__ = ["soft_quantize"]


@triton.jit
def _sq_row_fwd_kernel(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    v_ptr, stride_vk, stride_vd,
    out_ptr, lse_ptr, idx_ptr,
    N, K, D, inv_tau,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    best = tl.zeros([BLOCK_N], tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        logit, coef = _logits(
            x_ptr, stride_xn, stride_xd, xsq_ptr, offs_n, mask_n,
            c_ptr, stride_ck, stride_cd, csq_ptr, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
        )  # fmt: skip
        tmax = tl.max(logit, axis=1)
        # First position of the tile max (ties -> lowest index, as torch.argmax).
        targ = tl.min(tl.where(logit == tmax[:, None], offs_k[None, :], K), axis=1)
        best = tl.where(tmax > m, targ.to(tl.int64), best)
        m_new = tl.maximum(m, tmax)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
        e = tl.exp(logit - m_new[:, None])
        vv = _load_rows(v_ptr, stride_vk, stride_vd, offs_k, mask_k, offs_d, mask_d)
        acc = acc * alpha[:, None] + tl.dot(e, vv, input_precision="ieee")
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = acc / s[:, None]
    tl.store(
        out_ptr + offs_n[:, None].to(tl.int64) * D + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :],
    )  # fmt: skip
    lse = m + tl.log(s)
    if METRIC == 0:
        xsq = tl.load(xsq_ptr + offs_n, mask=mask_n, other=0.0)
        lse = lse - xsq * inv_tau
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(idx_ptr + offs_n, best, mask=mask_n)


@triton.jit
def _sq_tiles(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    v_ptr, stride_vk, stride_vd,
    go_ptr, lse_rel_ptr, delta_ptr,
    offs_n, mask_n, offs_k, mask_k, offs_d, D, inv_tau,
    METRIC: tl.constexpr,
):  # fmt: skip
    """(e [BN, BK] key weights, p [BN, BK] probabilities, go [BN, BD]) of soft_quantize's backward."""
    mask_d = offs_d < D
    logit, coef = _logits(
        x_ptr, stride_xn, stride_xd, xsq_ptr, offs_n, mask_n,
        c_ptr, stride_ck, stride_cd, csq_ptr, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
    )  # fmt: skip
    rel = tl.load(lse_rel_ptr + offs_n, mask=mask_n, other=float("inf"))
    delta = tl.load(delta_ptr + offs_n, mask=mask_n, other=0.0)
    p = tl.exp(logit - rel[:, None])
    go = tl.load(
        go_ptr + offs_n[:, None].to(tl.int64) * D + offs_d[None, :],
        mask=mask_n[:, None] & mask_d[None, :], other=0.0,
    )  # fmt: skip
    vv = _load_rows(v_ptr, stride_vk, stride_vd, offs_k, mask_k, offs_d, mask_d)
    gv = tl.dot(go, tl.trans(vv), input_precision="ieee")
    dl = tl.where(mask_n[:, None] & mask_k[None, :], p * (gv - delta[:, None]), 0.0)
    e = _e_factor(dl, coef, inv_tau, METRIC)
    return e, p, go


@triton.jit
def _sq_row_bwd_kernel(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    v_ptr, stride_vk, stride_vd,
    go_ptr, lse_rel_ptr, delta_ptr,
    gx_ptr,
    N, K, D, inv_tau,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    esum = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        e, p, go = _sq_tiles(
            x_ptr, stride_xn, stride_xd, xsq_ptr, c_ptr, stride_ck, stride_cd, csq_ptr,
            v_ptr, stride_vk, stride_vd, go_ptr, lse_rel_ptr, delta_ptr,
            offs_n, mask_n, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
        )  # fmt: skip
        cv = _load_rows(c_ptr, stride_ck, stride_cd, offs_k, mask_k, offs_d, mask_d)
        acc += tl.dot(e, cv, input_precision="ieee")
        esum += tl.sum(e, axis=1)
    _store_operand_grad(gx_ptr, acc, esum, x_ptr, stride_xn, stride_xd, offs_n, mask_n, offs_d,
                        mask_d, D, METRIC)  # fmt: skip


@triton.jit
def _sq_code_bwd_kernel(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    v_ptr, stride_vk, stride_vd,
    go_ptr, lse_rel_ptr, delta_ptr,
    gk_ptr, gv_ptr,
    N, K, D, inv_tau,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc_k = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    esum = tl.zeros([BLOCK_K], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        e, p, go = _sq_tiles(
            x_ptr, stride_xn, stride_xd, xsq_ptr, c_ptr, stride_ck, stride_cd, csq_ptr,
            v_ptr, stride_vk, stride_vd, go_ptr, lse_rel_ptr, delta_ptr,
            offs_n, mask_n, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
        )  # fmt: skip
        xv = _load_rows(x_ptr, stride_xn, stride_xd, offs_n, mask_n, offs_d, mask_d)
        acc_k += tl.dot(tl.trans(e), xv, input_precision="ieee")
        acc_v += tl.dot(tl.trans(p), go, input_precision="ieee")
        esum += tl.sum(e, axis=0)
    _store_operand_grad(gk_ptr, acc_k, esum, c_ptr, stride_ck, stride_cd, offs_k, mask_k, offs_d,
                        mask_d, D, METRIC)  # fmt: skip
    tl.store(  # the values enter the output linearly: their gradient has no own-operand term
        gv_ptr + offs_k[:, None].to(tl.int64) * D + offs_d[None, :], acc_v,
        mask=mask_k[:, None] & mask_d[None, :],
    )  # fmt: skip


# ------------------------------------------------------------------------------- launchers


@triton_op("vqkernels::soft_quantize_triton", mutates_args=())
def _soft_quantize_op(
    x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, temperature: float, metric: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = keys.shape[0]
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return out, lse, idx
    xsq, csq = _sq_norms(x), _sq_norms(keys)
    b = _blocks(d)
    (xa, sxn, sxd), (ca, sck, scd) = _args(x, keys)
    wrap_triton(_sq_row_fwd_kernel)[(triton.cdiv(n, b["BLOCK_N"]),)](
        xa, sxn, sxd, xsq, ca, sck, scd, csq, values, values.stride(0), values.stride(1),
        out, lse, idx, n, k, d, 1.0 / temperature, METRIC=_METRIC_IDS[metric], **b,
    )  # fmt: skip
    return out, lse, idx


@triton_op("vqkernels::soft_quantize_backward_triton", mutates_args=())
def _soft_quantize_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    out: torch.Tensor, logsumexp: torch.Tensor, temperature: float, metric: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    n, d = x.shape
    k = keys.shape[0]
    gx = torch.zeros((n, d), dtype=torch.float32, device=x.device)
    gk = torch.zeros((k, d), dtype=torch.float32, device=x.device)
    gv = torch.zeros((k, d), dtype=torch.float32, device=x.device)
    if n > 0:
        xsq, csq = _sq_norms(x), _sq_norms(keys)
        rel = _relative_lse(logsumexp, xsq, temperature, metric)
        go = grad_out.float().contiguous()
        delta = (go.double() * out.double()).sum(1).float()
        b = _blocks(d)
        (xa, sxn, sxd), (ca, sck, scd) = _args(x, keys)
        head = (xa, sxn, sxd, xsq, ca, sck, scd, csq, values, values.stride(0), values.stride(1))
        common = (n, k, d, 1.0 / temperature)
        mid = _METRIC_IDS[metric]
        wrap_triton(_sq_row_bwd_kernel)[(triton.cdiv(n, b["BLOCK_N"]),)](
            *head, go, rel, delta, gx, *common, METRIC=mid, **b
        )
        wrap_triton(_sq_code_bwd_kernel)[(triton.cdiv(k, b["BLOCK_K"]),)](
            *head, go, rel, delta, gk, gv, *common, METRIC=mid, **b
        )
    return gx.to(x.dtype), gk.to(keys.dtype), gv.to(values.dtype)


def _sq_setup(ctx, inputs, output):
    x, keys, values, temperature, metric = inputs
    out, lse, idx = output
    ctx.save_for_backward(x, keys, values, out, lse)
    ctx.temperature, ctx.metric = temperature, metric
    ctx.mark_non_differentiable(lse, idx)


def _sq_backward(ctx, grad_out, grad_lse, grad_idx):
    x, keys, values, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    gx, gk, gv = torch.ops.vqkernels.soft_quantize_backward_triton(
        grad_out, x, keys, values, out, lse, ctx.temperature, ctx.metric
    )
    return gx, gk, gv, None, None


_soft_quantize_op.register_autograd(_sq_backward, setup_context=_sq_setup)


def soft_quantize(x, keys, values, temperature, metric):
    """Flattened ``soft_quantize`` (see the contract above), differentiable."""
    _check(x, keys, metric)
    return torch.ops.vqkernels.soft_quantize_triton(x, keys, values, float(temperature), metric)
