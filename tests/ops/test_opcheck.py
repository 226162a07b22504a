"""torch.library.opcheck for every op (DESIGN.md §4): schema (mutation declared, no aliasing),
fake impl vs real outputs (shapes, dtypes, strides), autograd registration, AOT dispatch.

* ``vqkernels::*`` on the C++ CPU backend (skipped when ``vqkernels._C`` is not built);
* the reference ops, registered here under a test namespace with the SAME schemas and the SAME
  fake impls and autograd formulas as ``vqkernels._ops``: this checks the fake impls against the
  specification itself, whatever backend is built;
* not the Triton ops on CPU: under the interpreter opcheck fails in fake-tensor tracing
  (DESIGN.md §5); tests/backends/test_triton.py and tests/backends/test_cuda.py opcheck the GPU ops on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from vqkernels import _ops, reference
from vqkernels.testing import make_inputs, noncontiguous

OPS = _ops.OP_NAMES


def _cases(device="cpu"):
    """(op name, args, id) for every op: fp32/bf16, l2/cosine, -1 rows, N = 0, K = 1, strided."""
    x, cb = make_inputs(37, 11, 6, seed=0, device=device)
    xb, cbb = x.bfloat16(), cb.bfloat16()
    x0 = x[:0]
    idx = torch.randint(-1, 11, (37,), generator=torch.Generator().manual_seed(0)).to(device)
    qidx = idx.clamp_min(0)
    state = (cb.clone(), torch.rand(11, device=device) + 0.5, cb.clone())
    xt = noncontiguous(x, "transposed")
    gq = torch.randn(37, 6, device=device)
    gl = torch.tensor(1.7, device=device)
    cases = []
    for metric in ("l2", "cosine"):
        cases += [
            ("nearest_code", (x, cb, metric), f"nearest_code-{metric}"),
            ("nearest_code", (xb, cbb, metric), f"nearest_code-{metric}-bf16"),
        ]
    cases += [
        ("nearest_code", (x0, cb, "l2"), "nearest_code-N0"),
        ("nearest_code", (x, cb[:1], "l2"), "nearest_code-K1"),
        ("nearest_code", (xt, cb, "l2"), "nearest_code-strided"),
        ("cluster_stats", (x, idx, 11), "cluster_stats"),
        ("cluster_stats", (xb, idx, 11), "cluster_stats-bf16"),
        ("cluster_stats", (x0, idx[:0], 11), "cluster_stats-N0"),
        ("ema_update_", (*state, x, idx, 0.9, 1e-5), "ema_update_"),
        ("ema_update_", (*state, xb, idx, 0.5, 1e-3), "ema_update_-bf16"),
    ]
    for cb_loss in (False, True):
        tag = "codebook-loss" if cb_loss else "commit"
        cases += [
            (
                "quantize",
                (
                    x.clone().requires_grad_(),
                    cb.clone().requires_grad_(cb_loss),
                    0.25,
                    "l2",
                    cb_loss,
                ),
                f"quantize-{tag}",
            ),
            (
                "quantize",
                (
                    xb.clone().requires_grad_(),
                    cbb.clone().requires_grad_(cb_loss),
                    0.5,
                    "cosine",
                    cb_loss,
                ),
                f"quantize-{tag}-bf16-cosine",
            ),  # fmt: skip
            ("quantize_backward", (gq, gl, x, cb, qidx, 0.25, cb_loss), f"quantize_backward-{tag}"),
        ]
    cases.append(("quantize", (x0.clone().requires_grad_(), cb, 0.25, "l2", False), "quantize-N0"))
    # Issue 10: Gumbel sampling, the rotation-trick estimator, multi-head [H, K, D] codebooks.
    x3 = x[:36].reshape(12, 3, 6)
    cb3 = torch.stack([cb, cb.flip(0), cb * 0.5])  # [3, 11, 6]
    idx3 = idx[:36].reshape(12, 3)
    state3 = (cb3.clone(), torch.rand(3, 11, device=device) + 0.5, cb3.clone())
    cases += [
        ("nearest_code", (x, cb, "l2", 0.7, 5), "nearest_code-sample-l2"),
        ("nearest_code", (xb, cbb, "cosine", 2.0, 2**40), "nearest_code-sample-cosine-bf16"),
        ("nearest_code", (x3, cb3, "l2"), "nearest_code-heads"),
        ("nearest_code", (x3, cb3, "cosine", 0.5, 3), "nearest_code-heads-sample"),
        ("cluster_stats", (x3, idx3, 11), "cluster_stats-heads"),
        ("ema_update_", (*state3, x3, idx3, 0.9, 1e-5), "ema_update_-heads"),
        (
            "quantize",
            (x.clone().requires_grad_(), cb.clone().requires_grad_(), 0.25, "l2", True, "rotation"),
            "quantize-rotation",
        ),
        (
            "quantize",
            (x3.clone().requires_grad_(), cb3.clone().requires_grad_(), 0.25, "l2", True, "rotation"),
            "quantize-heads-rotation",
        ),
        ("quantize_backward", (gq, gl, x, cb, qidx, 0.25, True, "rotation"), "quantize_backward-rotation"),
        (
            "quantize_backward",
            (gq[:36].reshape(12, 3, 6), gl, x3, cb3, idx3.clamp_min(0), 0.25, True, "ste"),
            "quantize_backward-heads",
        ),
    ]  # fmt: skip
    return [pytest.param(name, args, id=i) for name, args, i in cases]


def test_every_op_has_a_case():
    assert {c.values[0] for c in _cases()} == set(OPS)


# ------------------------------------------------------------------------------ C++ CPU ops


@pytest.mark.parametrize("name, args", _cases())
def test_opcheck_cpu(cpu_backend, name, args):
    op = getattr(torch.ops.vqkernels, name).default
    torch.library.opcheck(op, args)


# --------------------------------------------------------------- reference ops, same contract

_NS = "vqkernels_reftest"
_lib = torch.library.Library(_NS, "DEF")
for _name in OPS:
    _schema = str(getattr(torch.ops.vqkernels, _name).default._schema)
    _lib.define(_schema.split("::", 1)[1])


def _ref_quantize_backward(
    grad_q, grad_loss, x, codebook, indices, beta, codebook_loss, estimator="ste"
):
    grad_x, grad_cb = reference.quantize_backward(
        grad_q, grad_loss, x, codebook, indices, beta, codebook_loss, estimator
    )
    if grad_cb is None:
        grad_cb = codebook.new_empty((0,))
    return grad_x, grad_cb


def _ref_quantize(x, codebook, beta, metric, codebook_loss, estimator="ste"):
    return reference.quantize(x, codebook, beta, metric, codebook_loss, estimator)


def _ref_nearest_code(x, codebook, metric, sample_temperature=0.0, seed=0):
    return reference.nearest_code(
        x, codebook, metric, sample_temperature=sample_temperature, seed=seed
    )


_IMPLS = {
    "nearest_code": _ref_nearest_code,
    "cluster_stats": reference.cluster_stats,
    "ema_update_": reference.ema_update_,
    "quantize": _ref_quantize,
    "quantize_backward": _ref_quantize_backward,
}
_FAKES = {
    "nearest_code": _ops._nearest_code_fake,
    "cluster_stats": _ops._cluster_stats_fake,
    "ema_update_": _ops._ema_update_fake,
    "quantize": _ops._quantize_fake,
    "quantize_backward": _ops._quantize_backward_fake,
}
for _name in OPS:
    _lib.impl(_name, _IMPLS[_name], "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_NS}::{_name}", _FAKES[_name], lib=_lib)


def _ref_backward(ctx, grad_quantized, grad_indices, grad_loss):
    # Same as vqkernels._ops._quantize_backward, calling the reference backward op.
    x, codebook, indices = ctx.saved_tensors
    if grad_quantized is None:
        grad_quantized = torch.zeros_like(x)
    if grad_loss is None:
        grad_loss = x.new_zeros((), dtype=torch.float32)
    grad_x, grad_cb = torch.ops.vqkernels_reftest.quantize_backward(
        grad_quantized.contiguous(), grad_loss, x, codebook, indices, ctx.beta, ctx.codebook_loss,
        ctx.estimator,
    )  # fmt: skip
    return grad_x, (grad_cb if ctx.codebook_loss else None), None, None, None, None


torch.library.register_autograd(
    f"{_NS}::quantize", _ref_backward, setup_context=_ops._quantize_setup_context, lib=_lib
)


@pytest.mark.parametrize("name, args", _cases())
def test_opcheck_reference_contract(name, args):
    """The fake impls of vqkernels._ops agree with the reference (the spec) on every case."""
    op = getattr(torch.ops.vqkernels_reftest, name).default
    torch.library.opcheck(op, args)


def test_opcheck_catches_a_wrong_fake():
    """opcheck is not vacuous: a fake impl with a wrong output dtype is reported."""
    lib = torch.library.Library("vqkernels_badfake", "DEF")
    lib.define("nearest_code(Tensor x, Tensor codebook, str metric) -> (Tensor, Tensor)")
    lib.impl("nearest_code", reference.nearest_code, "CompositeExplicitAutograd")

    def bad_fake(x, codebook, metric):
        n = x.shape[0]
        return x.new_empty((n,), dtype=torch.int32), x.new_empty((n,), dtype=torch.float32)

    torch.library.register_fake("vqkernels_badfake::nearest_code", bad_fake, lib=lib)
    x, cb = make_inputs(9, 4, 3)
    with pytest.raises(Exception, match="(?i)dtype|fake"):
        torch.library.opcheck(torch.ops.vqkernels_badfake.nearest_code.default, (x, cb, "l2"))
