"""Building blocks of the Triton codebook_softmax kernels (``codebook_softmax.py`` and
``codebook_softmax_soft.py``), as ``csrc/cpu/codebook_softmax_tiles.h`` is for the C++ ones: the
strided fp32 tile load, the logits tile per metric, the ∂L/∂logit -> code-weight factor, and the
launchers' shared helpers.  ``@triton.jit`` helpers are inlined into each kernel (same codegen).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._search import interpreting

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
def _store_operand_grad(out_ptr, acc, esum, u_ptr, stride_r, stride_d, offs_r, mask_r, offs_d,
                        mask_d, D, METRIC: tl.constexpr):  # fmt: skip
    """The epilogue of every gradient pass: l2 and euclidean logits depend on u − v, so the
    gradient w.r.t. the pass's own operand u (x in a row pass, the codes in a code pass) is
    ``acc − u·esum`` with ``acc = Σ e·v`` and ``esum = Σ e`` accumulated over the streamed tiles
    (the u term applied once, here, not per tile); dot logits (METRIC 1) have no u term.  Stores
    the [rows, BLOCK_D] fp32 tile into the contiguous [rows, D] output."""
    if METRIC != 1:
        acc = acc - _load_rows(u_ptr, stride_r, stride_d, offs_r, mask_r, offs_d, mask_d) * esum[:, None]
    tl.store(
        out_ptr + offs_r[:, None].to(tl.int64) * D + offs_d[None, :], acc,
        mask=mask_r[:, None] & mask_d[None, :],
    )  # fmt: skip


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
