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

Files (the seams of csrc/cpu): this one holds code_distribution; ``codebook_softmax_soft.py``
soft_quantize's kernels; ``codebook_softmax_tiles.py`` the blocks and launch helpers both share.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .codebook_softmax_soft import soft_quantize
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

__all__ = ["code_distribution", "soft_quantize"]


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
    # Broadcast to [BN, BK] here: both constexpr branches must return the same shape (the
    # compiler rejects [1, BK] vs [BN, BK]; the interpreter does not check).
    g = tl.load(gm_ptr + offs_k, mask=mask_k, other=0.0)
    return tl.where(mask_n[:, None], g[None, :], 0.0)


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
    _store_operand_grad(gx_ptr, acc, esum, x_ptr, stride_xn, stride_xd, offs_n, mask_n, offs_d,
                        mask_d, D, METRIC)  # fmt: skip


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
    _store_operand_grad(gc_ptr, acc, esum, c_ptr, stride_ck, stride_cd, offs_k, mask_k, offs_d,
                        mask_d, D, METRIC)  # fmt: skip


# ------------------------------------------------------------------------------- launchers


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
    num_groups: int = 0, need_grad_codebook: bool = True, need_grad_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    n, d = x.shape
    k = codebook.shape[0]
    # Without need_grad_codebook: an empty [0] grad_codebook and no code-backward kernel (a second
    # full streamed pass over every logits tile); need_grad_x likewise for the row-backward one.
    gx = torch.zeros((n, d) if need_grad_x else (0,), dtype=torch.float32, device=x.device)
    gc = torch.zeros((k, d) if need_grad_codebook else (0,), dtype=torch.float32, device=x.device)
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
        if need_grad_x:
            wrap_triton(_cd_row_bwd_kernel)[(triton.cdiv(n, b["BLOCK_N"]),)](
                xa, sxn, sxd, xsq, ca, sck, scd, csq, *tail, gx, *common, METRIC=mid,
                HAS_GROUPS=grouped, **b,
            )  # fmt: skip
        if need_grad_codebook:
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
    # False for an EMA codebook (or a detached x): that gradient's pass is skipped
    need_grad_x, need_grad_codebook = ctx.needs_input_grad[:2]
    gx, gc = torch.ops.vqkernels.code_distribution_backward_triton(
        *grads, x, codebook, row_weight, lse, ent, ctx.temperature, ctx.metric, row_group,
        ctx.num_groups, need_grad_codebook, need_grad_x,
    )  # fmt: skip
    gx, gc = gx if need_grad_x else None, gc if need_grad_codebook else None
    return (gx, gc) + (None,) * (ctx.num_inputs - 2)


_code_distribution_op.register_autograd(_cd_backward, setup_context=_cd_setup)


def code_distribution(x, codebook, row_weight, temperature, metric, row_group=None, num_groups=0):
    """Flattened ``code_distribution`` (see the contract above), differentiable."""
    _check(x, codebook, metric)
    return torch.ops.vqkernels.code_distribution_triton(
        x, codebook, row_weight, float(temperature), metric, row_group, int(num_groups)
    )
