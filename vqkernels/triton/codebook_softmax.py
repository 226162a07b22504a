"""Triton codebook_softmax family: streamed softmax over the codebook, recompute in the backward.

┌─ contract (as vqkernels/reference/codebook_softmax.py) ──────────────────────────────────────┐
│ code_distribution(x [N, D], codebook [K, D], row_weight [N] f32, τ, metric,                   │
│                   row_group [N] i64 | None, num_groups G)                                     │
│     -> logsumexp [N] f32, entropy [N] f32, mean_probs [K] f32 ([G, K] grouped)  (autograd)    │
│ soft_quantize(x [N, D], keys [K, D], values [K, D], τ, metric)                               │
│     -> out [N, D] (dtype of x), logsumexp [N] f32, indices [N] i64 (argmax)   (autograd)     │
│ metric: "l2" | "dot" | "euclidean"; logits s/τ; D ≤ 1024 (one D tile per program).            │
└──────────────────────────────────────────────────────────────────────────────────────────────┘

Kernels (never an N x K buffer; fp32 accumulation, products in fp32 ("ieee") whatever the
input dtype):
  row forward   grid over row blocks, loop over code tiles: online max m, S = Σ e^{logit−m},
                T = Σ e^{logit−m}(logit−m) (rescaled when m grows); lse, entropy = log S − T/S
                (soft_quantize: the rescaled Σ e^{logit−m}·v and the running argmax instead of T);
  code forward  grid over code tiles, loop over row blocks: mean_probs_k = Σ_i w_i p_ik;
                grouped: grid over (code tile, group), each program walks its group's rows
                (a stable sort of the rows by group, gathered through the permutation);
  row backward  grad_x (plus a ḡ_i = Σ_k p_ik g_k row pass when mean_probs has a gradient);
  code backward grad_codebook (and grad_values).
Every output element is owned by one program, which walks the other axis in a fixed order: no
atomics, deterministic.  l2 logits are relative to the row constant −‖x‖²/τ (only lse adds it
back), as in the C++ kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .nearest_code import interpreting

__all__ = ["code_distribution", "soft_quantize"]

_METRIC_IDS = {"l2": 0, "dot": 1, "euclidean": 2}
_EUCLID_EPS = 1e-8
_MAX_D = 1024


@triton.jit
def _load_rows(ptr, stride_r, stride_d, offs_r, mask_r, offs_d, mask_d):
    """The [rows, BLOCK_D] tile of a strided 2-D tensor, in fp32 (masked lanes read 0, which adds
    nothing to any product or sum); int64 row offsets so N·stride cannot overflow int32."""
    return tl.load(
        ptr + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d,
        mask=mask_r[:, None] & mask_d[None, :], other=0.0,
    ).to(tl.float32)  # fmt: skip


@triton.jit
def _logits(
    x_ptr, stride_xn, stride_xd, xsq_ptr, offs_n, mask_n,
    c_ptr, stride_ck, stride_cd, csq_ptr, offs_k, mask_k,
    offs_d, D, inv_tau,
    METRIC: tl.constexpr,
):  # fmt: skip
    """(logits [BN, BK] with −inf on codes ≥ K, coef [BN, BK]: the euclidean sqrt factor)."""
    mask_d = offs_d < D
    xv = _load_rows(x_ptr, stride_xn, stride_xd, offs_n, mask_n, offs_d, mask_d)
    cv = _load_rows(c_ptr, stride_ck, stride_cd, offs_k, mask_k, offs_d, mask_d)
    dot = tl.dot(xv, tl.trans(cv), input_precision="ieee")
    csq = tl.load(csq_ptr + offs_k, mask=mask_k, other=0.0)
    coef = tl.full(dot.shape, 1.0, tl.float32)
    if METRIC == 0:
        logit = (2.0 * dot - csq[None, :]) * inv_tau
    elif METRIC == 1:
        logit = dot * inv_tau
    else:
        xsq = tl.load(xsq_ptr + offs_n, mask=mask_n, other=0.0)
        d2 = (xsq[:, None] - 2.0 * dot) + csq[None, :]
        s = tl.sqrt(tl.maximum(d2, 1e-8))
        logit = -s * inv_tau
        coef = tl.where(d2 > 1e-8, 1.0 / s, 0.0)
    logit = tl.where(mask_k[None, :], logit, float("-inf"))
    return logit, coef


@triton.jit
def _e_factor(dl, coef, inv_tau, METRIC: tl.constexpr):
    """∂L/∂logit -> weight e of c_k in grad_x (and of x_i in grad_c)."""
    if METRIC == 0:
        e = dl * (2.0 * inv_tau)
    elif METRIC == 1:
        e = dl * inv_tau
    else:
        e = (dl * inv_tau) * coef
    return e


@triton.jit
def _cd_row_fwd_kernel(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    lse_rel_ptr, lse_ptr, ent_ptr,
    N, K, D, inv_tau,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        logit, coef = _logits(
            x_ptr, stride_xn, stride_xd, xsq_ptr, offs_n, mask_n,
            c_ptr, stride_ck, stride_cd, csq_ptr, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(logit, axis=1))
        first = m == float("-inf")
        delta = tl.where(first, 0.0, m - m_new)
        alpha = tl.where(first, 0.0, tl.exp(delta))
        # Codes past K have logit = −inf: keep them out of e·z (0·−inf) explicitly.
        z = tl.where(mask_k[None, :], logit - m_new[:, None], 0.0)
        e = tl.where(mask_k[None, :], tl.exp(z), 0.0)
        t = alpha * (t + delta * s) + tl.sum(e * z, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    log_s = tl.log(s)
    rel = m + log_s
    ent = tl.maximum(log_s - t / s, 0.0)
    lse = rel
    if METRIC == 0:
        xsq = tl.load(xsq_ptr + offs_n, mask=mask_n, other=0.0)
        lse = rel - xsq * inv_tau
    tl.store(lse_rel_ptr + offs_n, rel, mask=mask_n)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(ent_ptr + offs_n, ent, mask=mask_n)


@triton.jit
def _cd_code_fwd_kernel(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    lse_rel_ptr, w_ptr, mp_ptr, perm_ptr, seg_ptr,
    N, K, D, inv_tau,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
):  # fmt: skip
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_K], tl.float32)
    if HAS_GROUPS:
        # Group g = program_id(1) owns sorted positions [seg[g], seg[g + 1]) of perm.
        grp = tl.program_id(1)
        start = tl.load(seg_ptr + grp)
        end = tl.load(seg_ptr + grp + 1)
    else:
        grp = 0
        start = 0
        end = N
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < end
        if HAS_GROUPS:
            offs_n = tl.load(perm_ptr + pos, mask=mask_n, other=0)
        else:
            offs_n = pos
        logit, coef = _logits(
            x_ptr, stride_xn, stride_xd, xsq_ptr, offs_n, mask_n,
            c_ptr, stride_ck, stride_cd, csq_ptr, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
        )  # fmt: skip
        rel = tl.load(lse_rel_ptr + offs_n, mask=mask_n, other=float("inf"))
        w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0)
        p = tl.exp(logit - rel[:, None]) * w[:, None]
        acc += tl.sum(p, axis=0)
    tl.store(mp_ptr + grp * K + offs_k, acc, mask=mask_k)


@triton.jit
def _dl_tile(
    logit, offs_n, mask_n, offs_k, mask_k,
    lse_rel_ptr, gl_ptr, gh_ptr, ent_ptr, w_ptr, gm_ptr, gbar_ptr, grp_ptr, K,
    HAS_GROUPS: tl.constexpr,
):  # fmt: skip
    """∂L/∂logit of code_distribution (see reference.code_distribution_backward); 0 off the tile."""
    rel = tl.load(lse_rel_ptr + offs_n, mask=mask_n, other=0.0)
    gl = tl.load(gl_ptr + offs_n, mask=mask_n, other=0.0)
    gh = tl.load(gh_ptr + offs_n, mask=mask_n, other=0.0)
    h = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0)
    gb = tl.load(gbar_ptr + offs_n, mask=mask_n, other=0.0)
    g = _grad_mp_tile(gm_ptr, grp_ptr, K, offs_n, mask_n, offs_k, mask_k, HAS_GROUPS)
    z = tl.maximum(logit - rel[:, None], -1e30)
    p = tl.exp(z)
    dl = p * ((gl[:, None] - gh[:, None] * (z + h[:, None])) + w[:, None] * (g - gb[:, None]))
    return tl.where(mask_n[:, None] & mask_k[None, :], dl, 0.0)


@triton.jit
def _grad_mp_tile(gm_ptr, grp_ptr, K, offs_n, mask_n, offs_k, mask_k, HAS_GROUPS: tl.constexpr):
    """g_ik = grad_mean_probs[group_i, k] as a [BN, BK] tile (ungrouped: g_k broadcast)."""
    if HAS_GROUPS:
        grp = tl.load(grp_ptr + offs_n, mask=mask_n, other=0)
        return tl.load(
            gm_ptr + grp[:, None] * K + offs_k[None, :],
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        )  # fmt: skip
    return tl.load(gm_ptr + offs_k, mask=mask_k, other=0.0)[None, :]


@triton.jit
def _cd_row_gbar_kernel(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    lse_rel_ptr, gm_ptr, gbar_ptr, grp_ptr,
    N, K, D, inv_tau,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    rel = tl.load(lse_rel_ptr + offs_n, mask=mask_n, other=0.0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        logit, coef = _logits(
            x_ptr, stride_xn, stride_xd, xsq_ptr, offs_n, mask_n,
            c_ptr, stride_ck, stride_cd, csq_ptr, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
        )  # fmt: skip
        g = _grad_mp_tile(gm_ptr, grp_ptr, K, offs_n, mask_n, offs_k, mask_k, HAS_GROUPS)
        acc += tl.sum(tl.exp(logit - rel[:, None]) * g, axis=1)
    tl.store(gbar_ptr + offs_n, acc, mask=mask_n)


@triton.jit
def _cd_row_bwd_kernel(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    lse_rel_ptr, gl_ptr, gh_ptr, ent_ptr, w_ptr, gm_ptr, gbar_ptr, grp_ptr,
    gx_ptr,
    N, K, D, inv_tau,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
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
        logit, coef = _logits(
            x_ptr, stride_xn, stride_xd, xsq_ptr, offs_n, mask_n,
            c_ptr, stride_ck, stride_cd, csq_ptr, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
        )  # fmt: skip
        dl = _dl_tile(
            logit, offs_n, mask_n, offs_k, mask_k,
            lse_rel_ptr, gl_ptr, gh_ptr, ent_ptr, w_ptr, gm_ptr, gbar_ptr, grp_ptr, K, HAS_GROUPS,
        )  # fmt: skip
        e = _e_factor(dl, coef, inv_tau, METRIC)
        cv = _load_rows(c_ptr, stride_ck, stride_cd, offs_k, mask_k, offs_d, mask_d)
        acc += tl.dot(e, cv, input_precision="ieee")
        esum += tl.sum(e, axis=1)
    if METRIC != 1:
        xv = _load_rows(x_ptr, stride_xn, stride_xd, offs_n, mask_n, offs_d, mask_d)
        acc = acc - xv * esum[:, None]
    tl.store(
        gx_ptr + offs_n[:, None].to(tl.int64) * D + offs_d[None, :], acc,
        mask=mask_n[:, None] & mask_d[None, :],
    )  # fmt: skip


@triton.jit
def _cd_code_bwd_kernel(
    x_ptr, stride_xn, stride_xd, xsq_ptr,
    c_ptr, stride_ck, stride_cd, csq_ptr,
    lse_rel_ptr, gl_ptr, gh_ptr, ent_ptr, w_ptr, gm_ptr, gbar_ptr, grp_ptr,
    gc_ptr,
    N, K, D, inv_tau,
    METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
):  # fmt: skip
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    esum = tl.zeros([BLOCK_K], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        logit, coef = _logits(
            x_ptr, stride_xn, stride_xd, xsq_ptr, offs_n, mask_n,
            c_ptr, stride_ck, stride_cd, csq_ptr, offs_k, mask_k, offs_d, D, inv_tau, METRIC,
        )  # fmt: skip
        dl = _dl_tile(
            logit, offs_n, mask_n, offs_k, mask_k,
            lse_rel_ptr, gl_ptr, gh_ptr, ent_ptr, w_ptr, gm_ptr, gbar_ptr, grp_ptr, K, HAS_GROUPS,
        )  # fmt: skip
        e = _e_factor(dl, coef, inv_tau, METRIC)
        xv = _load_rows(x_ptr, stride_xn, stride_xd, offs_n, mask_n, offs_d, mask_d)
        acc += tl.dot(tl.trans(e), xv, input_precision="ieee")
        esum += tl.sum(e, axis=0)
    if METRIC != 1:
        cv = _load_rows(c_ptr, stride_ck, stride_cd, offs_k, mask_k, offs_d, mask_d)
        acc = acc - cv * esum[:, None]
    tl.store(
        gc_ptr + offs_k[:, None].to(tl.int64) * D + offs_d[None, :], acc,
        mask=mask_k[:, None] & mask_d[None, :],
    )  # fmt: skip


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
    if METRIC != 1:
        xv = _load_rows(x_ptr, stride_xn, stride_xd, offs_n, mask_n, offs_d, mask_d)
        acc = acc - xv * esum[:, None]
    tl.store(
        gx_ptr + offs_n[:, None].to(tl.int64) * D + offs_d[None, :], acc,
        mask=mask_n[:, None] & mask_d[None, :],
    )  # fmt: skip


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
    if METRIC != 1:
        cv = _load_rows(c_ptr, stride_ck, stride_cd, offs_k, mask_k, offs_d, mask_d)
        acc_k = acc_k - cv * esum[:, None]
    off = offs_k[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(gk_ptr + off, acc_k, mask=mask_k[:, None] & mask_d[None, :])
    tl.store(gv_ptr + off, acc_v, mask=mask_k[:, None] & mask_d[None, :])


# ------------------------------------------------------------------------------- launchers


def _blocks(d: int) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    if interpreting():
        return dict(BLOCK_N=16, BLOCK_K=16, BLOCK_D=block_d)
    return dict(BLOCK_N=32, BLOCK_K=64 if block_d <= 128 else 32, BLOCK_D=block_d)


def _sq_norms(t: torch.Tensor) -> torch.Tensor:
    """‖t_i‖² in fp64, rounded to fp32 (as the C++ kernels)."""
    return t.double().square().sum(1).float()


def _check(x, codebook, metric):
    if metric not in _METRIC_IDS:
        raise ValueError(f"metric must be one of {tuple(_METRIC_IDS)}, got {metric!r}")
    if x.shape[1] > _MAX_D:
        raise ValueError(
            f"the triton codebook_softmax kernels take D <= {_MAX_D}, got {x.shape[1]}"
        )


def _args(x, c):
    return (x, x.stride(0), x.stride(1)), (c, c.stride(0), c.stride(1))


def _relative_lse(lse, xsq, temperature, metric):
    if metric == "l2":
        return (lse.double() + xsq.double() / temperature).float()
    return lse.float()


def _group_segments(row_group: torch.Tensor, num_groups: int):
    """(perm [N] i64: the rows stably sorted by group, seg [G + 1] i64: group g's rows are
    perm[seg[g]:seg[g + 1]]); a stable sort keeps each group's rows in increasing order, so the
    code pass sums them in a fixed order (deterministic)."""
    perm = torch.sort(row_group, stable=True).indices
    counts = torch.bincount(row_group, minlength=num_groups)
    seg = torch.zeros(num_groups + 1, dtype=torch.int64, device=row_group.device)
    seg[1:] = torch.cumsum(counts, 0)
    return perm, seg


@triton_op("vqkernels::code_distribution_triton", mutates_args=())
def _code_distribution_op(
    x: torch.Tensor, codebook: torch.Tensor, row_weight: torch.Tensor, temperature: float,
    metric: str, row_group: torch.Tensor | None = None, num_groups: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    n, d = x.shape
    k = codebook.shape[0]
    grouped = row_group is not None
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    ent = torch.empty(n, dtype=torch.float32, device=x.device)
    mp = torch.zeros((num_groups, k) if grouped else (k,), dtype=torch.float32, device=x.device)
    if n == 0:
        return lse, ent, mp
    rel = torch.empty(n, dtype=torch.float32, device=x.device)
    xsq, csq = _sq_norms(x), _sq_norms(codebook)
    b = _blocks(d)
    (xa, sxn, sxd), (ca, sck, scd) = _args(x, codebook)
    common = (n, k, d, 1.0 / temperature)
    mid = _METRIC_IDS[metric]
    wrap_triton(_cd_row_fwd_kernel)[(triton.cdiv(n, b["BLOCK_N"]),)](
        xa, sxn, sxd, xsq, ca, sck, scd, csq, rel, lse, ent, *common, METRIC=mid, **b
    )
    if grouped:
        perm, seg = _group_segments(row_group, num_groups)
    else:
        perm = seg = torch.zeros(1, dtype=torch.int64, device=x.device)
    wrap_triton(_cd_code_fwd_kernel)[(triton.cdiv(k, b["BLOCK_K"]), num_groups if grouped else 1)](
        xa, sxn, sxd, xsq, ca, sck, scd, csq, rel, row_weight.float().contiguous(), mp, perm, seg,
        *common, METRIC=mid, HAS_GROUPS=grouped, **b,
    )  # fmt: skip
    return lse, ent, mp


@triton_op("vqkernels::code_distribution_backward_triton", mutates_args=())
def _code_distribution_backward_op(
    grad_logsumexp: torch.Tensor, grad_entropy: torch.Tensor, grad_mean_probs: torch.Tensor,
    x: torch.Tensor, codebook: torch.Tensor, row_weight: torch.Tensor, logsumexp: torch.Tensor,
    entropy: torch.Tensor, temperature: float, metric: str, row_group: torch.Tensor | None = None,
    num_groups: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    n, d = x.shape
    k = codebook.shape[0]
    gx = torch.zeros((n, d), dtype=torch.float32, device=x.device)
    gc = torch.zeros((k, d), dtype=torch.float32, device=x.device)
    if n > 0:
        zn = torch.zeros(n, dtype=torch.float32, device=x.device)
        gl = grad_logsumexp.float().contiguous() if grad_logsumexp.numel() else zn
        gh = grad_entropy.float().contiguous() if grad_entropy.numel() else zn
        has_m = grad_mean_probs.numel() > 0
        gm = grad_mean_probs.float().contiguous() if has_m else torch.zeros(k, device=x.device)
        # Without a mean_probs gradient the grouped lookup reads zeros: take the ungrouped path.
        grouped = row_group is not None and has_m
        grp = row_group.contiguous() if grouped else torch.zeros(1, dtype=torch.int64, device=x.device)
        xsq, csq = _sq_norms(x), _sq_norms(codebook)
        rel = _relative_lse(logsumexp, xsq, temperature, metric)
        w = row_weight.float().contiguous()
        ent = entropy.float().contiguous()
        gbar = torch.zeros(n, dtype=torch.float32, device=x.device)
        b = _blocks(d)
        (xa, sxn, sxd), (ca, sck, scd) = _args(x, codebook)
        common = (n, k, d, 1.0 / temperature)
        mid = _METRIC_IDS[metric]
        if has_m:
            wrap_triton(_cd_row_gbar_kernel)[(triton.cdiv(n, b["BLOCK_N"]),)](
                xa, sxn, sxd, xsq, ca, sck, scd, csq, rel, gm, gbar, grp, *common, METRIC=mid,
                HAS_GROUPS=grouped, **b,
            )  # fmt: skip
        tail = (rel, gl, gh, ent, w, gm, gbar, grp)
        wrap_triton(_cd_row_bwd_kernel)[(triton.cdiv(n, b["BLOCK_N"]),)](
            xa, sxn, sxd, xsq, ca, sck, scd, csq, *tail, gx, *common, METRIC=mid,
            HAS_GROUPS=grouped, **b,
        )  # fmt: skip
        wrap_triton(_cd_code_bwd_kernel)[(triton.cdiv(k, b["BLOCK_K"]),)](
            xa, sxn, sxd, xsq, ca, sck, scd, csq, *tail, gc, *common, METRIC=mid,
            HAS_GROUPS=grouped, **b,
        )  # fmt: skip
    return gx.to(x.dtype), gc.to(codebook.dtype)


def _cd_setup(ctx, inputs, output):
    x, codebook, row_weight, temperature, metric = inputs[:5]
    row_group = inputs[5] if len(inputs) > 5 else None
    ctx.num_groups = inputs[6] if len(inputs) > 6 else 0
    ctx.num_inputs = len(inputs)
    lse, ent, _ = output
    ctx.save_for_backward(x, codebook, row_weight, lse, ent, row_group)
    ctx.temperature, ctx.metric = temperature, metric


def _cd_backward(ctx, grad_lse, grad_ent, grad_mp):
    x, codebook, row_weight, lse, ent, row_group = ctx.saved_tensors
    empty = x.new_empty((0,), dtype=torch.float32)
    grads = [empty if g is None else g for g in (grad_lse, grad_ent, grad_mp)]
    gx, gc = torch.ops.vqkernels.code_distribution_backward_triton(
        *grads, x, codebook, row_weight, lse, ent, ctx.temperature, ctx.metric, row_group,
        ctx.num_groups,
    )  # fmt: skip
    return (gx, gc) + (None,) * (ctx.num_inputs - 2)


_code_distribution_op.register_autograd(_cd_backward, setup_context=_cd_setup)


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


def code_distribution(x, codebook, row_weight, temperature, metric, row_group=None, num_groups=0):
    """Flattened ``code_distribution`` (see the contract above), differentiable."""
    _check(x, codebook, metric)
    return torch.ops.vqkernels.code_distribution_triton(
        x, codebook, row_weight, float(temperature), metric, row_group, int(num_groups)
    )


def soft_quantize(x, keys, values, temperature, metric):
    """Flattened ``soft_quantize`` (see the contract above), differentiable."""
    _check(x, keys, metric)
    return torch.ops.vqkernels.soft_quantize_triton(x, keys, values, float(temperature), metric)
