"""codebook_softmax family: ``code_distribution`` and ``soft_quantize`` on every backend.

The rule (DESIGN.md §3): against the direct formula in float64 (``reference`` with
``compute_dtype=float64`` on the same inputs), a backend's error is at most 2x the error of the same
direct formula run in fp32 (bf16/fp16 inputs: run at that precision), plus a small floor scaled to
the values (so that an exact-by-luck direct result does not demand bit equality).  Gradients follow
the same rule, with random upstream weights on all three outputs.  The reference itself is checked
with ``torch.autograd.gradcheck`` in fp64, and its closed-form backwards (what the kernels compute)
against autograd through its forwards.
"""

from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import _ops, dispatch, reference
from vqkernels.testing import U32, case_id, make_inputs, noncontiguous

METRICS = ("l2", "dot", "cosine", "euclidean")
# K = 1, K not a multiple of any tile, N = 0, D = 1, N not a multiple of a row block, K > N.
SHAPES = [(0, 5, 3), (1, 1, 1), (7, 1, 13), (5, 33, 7), (37, 70, 3), (65, 130, 17)]
CASES = [pytest.param(s, id=case_id(*s)) for s in SHAPES]
TEMPERATURES = (0.01, 0.3, 1.0, 10.0)


def _interpreted_subset(backend, keep: bool) -> None:
    """The Triton interpreter takes ~1-2 s per case on 2 cores: it runs a representative subset
    (every metric, τ = 0.01 and 1, the edge shapes); a GPU run covers the whole table."""
    if backend.interpreted and not keep:
        pytest.skip("case left to the GPU run (Triton interpreter subset)")


def _require_op(backend, op="code_distribution"):
    if backend.name not in dispatch.OP_TABLE[op]:
        pytest.skip(f"{op} has no {backend.name} implementation")


def _oracle_inputs(x, cb, metric):
    """fp64 operands of the direct formula for the public metric (cosine = dot of normalized)."""
    x64, c64 = x.detach().double().cpu(), cb.detach().double().cpu()
    if metric == "cosine":
        x64 = torch.nn.functional.normalize(x64, dim=-1, eps=1e-12)
        c64 = torch.nn.functional.normalize(c64, dim=-1, eps=1e-12)
        return x64, c64, "dot"
    return x64, c64, metric


def _direct(x, cb, tau, metric, weights, dtype):
    """The direct formula on the public metric, computed at ``dtype`` (float64: the oracle)."""
    xo, co = x.detach().cpu(), cb.detach().cpu()
    if metric == "cosine":
        xo = torch.nn.functional.normalize(xo.to(dtype), dim=-1, eps=1e-12)
        co = torch.nn.functional.normalize(co.to(dtype), dim=-1, eps=1e-12)
        metric = "dot"
    return reference.code_distribution(xo, co, weights.cpu(), tau, metric, compute_dtype=dtype)


def _err(got, want):
    if want.numel() == 0:
        return 0.0
    return float((got.detach().cpu().double() - want.double()).abs().max())


def _floor(want, logit_scale):
    """What rounding the logits once costs: fp32 logits of magnitude L carry absolute errors
    ~U32·L, which move p by a relative U32·L and every output (values in [0, 1] or gradients) by
    about that fraction of its own size.  Without it the rule would demand the exact luck of the
    direct formula on a handful of rows at small τ (where L ~ 10³)."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    return 4.0 * U32 * (1.0 + scale) * (1.0 + logit_scale)


def _logit_scale(x, cb, tau, metric):
    """max |l_ik| in fp64 (0 when x is empty)."""
    xo, co, m = _oracle_inputs(x.reshape(-1, x.shape[-1]), cb, metric)
    if not xo.numel():
        return 0.0
    return float(reference.code_scores(xo, co, m).abs().max()) / tau


def _assert_rule(got, oracle, direct_lowp, what, logit_scale=0.0):
    e_got, e_ref = _err(got, oracle), _err(direct_lowp, oracle)
    bound = 2.0 * e_ref + _floor(oracle, logit_scale)
    assert e_got <= bound, (
        f"{what}: error {e_got:.3g} > 2 x direct {e_ref:.3g} + floor ({bound:.3g})"
    )


def _weights(n, mask=None):
    if mask is None:
        return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)
    keep = mask.reshape(n).double()
    return keep / keep.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", CASES)
def test_code_distribution_forward(backend, shape, metric, tau):
    _require_op(backend)
    _interpreted_subset(
        backend,
        (shape == (37, 70, 3) and tau in (0.01, 1.0))
        or (shape in [(0, 5, 3), (1, 1, 1), (7, 1, 13)] and tau == 1.0 and metric == "l2"),
    )
    n, k, d = shape
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=n + 7 * k, device=backend.device)
    lse, ent, mp = vqkernels.code_distribution(x, cb, tau, metric, backend=backend.name)
    assert lse.shape == (n,) and ent.shape == (n,) and mp.shape == (k,)
    assert lse.dtype == ent.dtype == mp.dtype == torch.float32
    w = _weights(n)
    oracle = _direct(x, cb, tau, metric, w, torch.float64)
    direct32 = _direct(x, cb, tau, metric, w, torch.float32)
    for got, o, r, what in zip(
        (lse, ent, mp), oracle, direct32, ("logsumexp", "entropy", "mean_probs")
    ):
        _assert_rule(got, o, r, what, _logit_scale(x, cb, tau, metric))
    if n:
        assert float(mp.sum()) == pytest.approx(1.0, abs=1e-5)
        assert (
            float(ent.min()) >= -1e-5
            and float(ent.max()) <= float(torch.log(torch.tensor(k))) + 1e-4
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("metric", METRICS)
def test_code_distribution_low_precision(backend, metric, dtype):
    """bf16/fp16 inputs, fp32 accumulation: within 2x the direct formula run at that precision."""
    _require_op(backend)
    _interpreted_subset(backend, metric in ("l2", "dot"))
    n, k, d = 37, 70, 9
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, dtype, seed=3, device=backend.device)
    lse, ent, mp = vqkernels.code_distribution(x, cb, 0.5, metric, backend=backend.name)
    w = _weights(n)
    oracle = _direct(x, cb, 0.5, metric, w, torch.float64)
    # The direct formula run at the inputs' precision (the flash-attention rule).
    lowp = _direct(x, cb, 0.5, metric, w, dtype)
    for got, o, r, what in zip(
        (lse, ent, mp), oracle, lowp, ("logsumexp", "entropy", "mean_probs")
    ):
        _assert_rule(got, o, r, what, _logit_scale(x, cb, 0.5, metric))


def test_code_distribution_mask_leading_dims_strided(backend):
    _require_op(backend)
    g = torch.Generator().manual_seed(5)
    x = (
        torch.randn(3, 4, 11, 6, generator=g).to(backend.device).permute(0, 2, 1, 3)
    )  # [3, 11, 4, 6]
    cb = noncontiguous(torch.randn(29, 6, generator=g), "col-strided").to(backend.device)
    mask = torch.rand(3, 11, 4, generator=g).to(backend.device) > 0.4
    lse, ent, mp = vqkernels.code_distribution(x, cb, 0.7, "l2", mask, backend=backend.name)
    assert lse.shape == ent.shape == (3, 11, 4)
    flat = x.reshape(-1, 6)
    oracle = _direct(flat, cb, 0.7, "l2", _weights(flat.shape[0], mask), torch.float64)
    direct32 = _direct(flat, cb, 0.7, "l2", _weights(flat.shape[0], mask), torch.float32)
    for got, o, r in zip((lse.reshape(-1), ent.reshape(-1), mp), oracle, direct32):
        _assert_rule(got, o, r, "masked", _logit_scale(flat, cb, 0.7, "l2"))
    # mean_probs is the mean over the kept rows only; an all-False mask gives zeros.
    kept = reference.code_distribution(
        flat[mask.reshape(-1)].double(), cb.double(), _weights(int(mask.sum())), 0.7, "l2",
        compute_dtype=torch.float64,
    )[2]  # fmt: skip
    torch.testing.assert_close(mp.double().cpu(), kept.cpu(), rtol=1e-5, atol=1e-6)
    _, _, mp0 = vqkernels.code_distribution(
        x, cb, 0.7, "l2", torch.zeros_like(mask), backend=backend.name
    )
    assert torch.equal(mp0.cpu(), torch.zeros(29))


# ----------------------------------------------------------------------------- gradients


def _loss_weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(k, generator=g)


def _grads_direct(x, cb, tau, metric, mask, dtype, a, b, c):
    """Gradients of Σa·lse + Σb·H + Σc·mean_probs through the direct formula at ``dtype``."""
    xd = x.detach().cpu().to(dtype).requires_grad_()
    cd = cb.detach().cpu().to(dtype).requires_grad_()
    xo, co, m = xd, cd, metric
    if metric == "cosine":
        xo = torch.nn.functional.normalize(xd, dim=-1, eps=1e-12)
        co = torch.nn.functional.normalize(cd, dim=-1, eps=1e-12)
        m = "dot"
    w = _weights(x.shape[0], mask)
    lse, ent, mp = reference.code_distribution(xo, co, w, tau, m, compute_dtype=dtype)
    loss = (
        (a.to(lse.dtype) * lse).sum() + (b.to(lse.dtype) * ent).sum() + (c.to(lse.dtype) * mp).sum()
    )
    return torch.autograd.grad(loss, (xd, cd))


@pytest.mark.parametrize("tau", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 33, 5), (65, 70, 17)], ids=lambda s: case_id(*s))
def test_code_distribution_gradients(backend, shape, metric, tau):
    _require_op(backend)
    _interpreted_subset(
        backend, (shape == (9, 33, 5) and tau == 0.05) or (shape == (1, 1, 1) and tau == 1.0)
    )
    n, k, d = shape
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=k, device=backend.device, kind="clustered", noise=0.5)
    mask = (torch.arange(n) % 3 != 1).to(backend.device)
    a, b, c = _loss_weights(n, k)
    xg, cg = x.clone().requires_grad_(), cb.clone().requires_grad_()
    lse, ent, mp = vqkernels.code_distribution(xg, cg, tau, metric, mask, backend=backend.name)
    dev = backend.device
    loss = (a.to(dev) * lse).sum() + (b.to(dev) * ent).sum() + (c.to(dev) * mp).sum()
    gx, gc = torch.autograd.grad(loss, (xg, cg))
    ox, oc = _grads_direct(x, cb, tau, metric, mask, torch.float64, a, b, c)
    rx, rc = _grads_direct(x, cb, tau, metric, mask, torch.float32, a, b, c)
    scale = _logit_scale(x, cb, tau, metric)
    _assert_rule(gx, ox, rx, "grad_x", scale)
    _assert_rule(gc, oc, rc, "grad_codebook", scale)


@pytest.mark.parametrize("which", ["lse", "entropy", "mean_probs"])
def test_code_distribution_single_output_gradients(backend, which):
    """Each output alone (the others' gradients are None: the kernels skip those terms)."""
    _require_op(backend)
    x, cb = make_inputs(20, 40, 6, seed=1, device=backend.device)
    xg, cg = x.clone().requires_grad_(), cb.clone().requires_grad_()
    out = dict(
        zip(
            ("lse", "entropy", "mean_probs"),
            vqkernels.code_distribution(xg, cg, 0.5, "l2", backend=backend.name),
        )
    )
    gx, gc = torch.autograd.grad((out[which] ** 2).sum(), (xg, cg))
    xr, cr = x.double().requires_grad_(), cb.double().requires_grad_()
    ref = dict(
        zip(
            ("lse", "entropy", "mean_probs"),
            reference.code_distribution(
                xr, cr, _weights(20), 0.5, "l2", compute_dtype=torch.float64
            ),
        )
    )
    ex, ec = torch.autograd.grad((ref[which] ** 2).sum(), (xr, cr))
    torch.testing.assert_close(gx.double().cpu(), ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gc.double().cpu(), ec, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "dot", "euclidean"])
def test_reference_gradcheck_fp64(metric):
    x, cb = make_inputs(6, 9, 4, seed=2)
    x, cb = x.double().requires_grad_(), cb.double().requires_grad_()
    w = _weights(6)
    g = torch.Generator().manual_seed(0)
    a, b, c = (
        torch.randn(6, generator=g).double(),
        torch.randn(6, generator=g).double(),
        torch.randn(9, generator=g).double(),
    )

    def f(x, cb):
        lse, ent, mp = reference.code_distribution(
            x, cb, w, 0.7, metric, compute_dtype=torch.float64
        )
        return (a * lse).sum() + (b * ent).sum() + (c * mp).sum()

    def s(x, cb):
        v = torch.randn(9, 4, generator=torch.Generator().manual_seed(1)).double()
        out, _, _ = reference.soft_quantize(x, cb, cb + v, 0.7, metric, compute_dtype=torch.float64)
        return out

    assert torch.autograd.gradcheck(f, (x, cb))
    assert torch.autograd.gradcheck(s, (x, cb))


@pytest.mark.parametrize("metric", ["l2", "dot", "euclidean"])
def test_reference_closed_form_backwards_match_autograd(metric):
    n, k, d = 11, 13, 5
    x, cb = make_inputs(n, k, d, seed=4)
    x, cb = x.double().requires_grad_(), cb.double().requires_grad_()
    w = _weights(n)
    a, b, c = (t.double() for t in _loss_weights(n, k, seed=3))
    lse, ent, mp = reference.code_distribution(x, cb, w, 0.6, metric, compute_dtype=torch.float64)
    ex, ec = torch.autograd.grad((a * lse).sum() + (b * ent).sum() + (c * mp).sum(), (x, cb))
    gx, gc = reference.code_distribution_backward(a, b, c, x, cb, w, lse, ent, 0.6, metric)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gc, ec)
    v = (cb * 0.5 + 1.0).detach().requires_grad_()
    out, lse, _ = reference.soft_quantize(x, cb, v, 0.6, metric, compute_dtype=torch.float64)
    go = torch.randn(n, d, generator=torch.Generator().manual_seed(9)).double()
    ex, ek, ev = torch.autograd.grad((out * go).sum(), (x, cb, v))
    gx, gk, gv = reference.soft_quantize_backward(go, x, cb, v, out, lse, 0.6, metric)
    for got, want in ((gx, ex), (gk, ek), (gv, ev)):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- soft_quantize


def _soft_direct(x, cb, tau, metric, dtype):
    xd = x.detach().cpu().to(dtype).requires_grad_()
    cd = cb.detach().cpu().to(dtype).requires_grad_()
    xo, ko, m = xd, cd, metric
    if metric == "cosine":
        xo = torch.nn.functional.normalize(xd, dim=-1, eps=1e-12)
        ko = torch.nn.functional.normalize(cd, dim=-1, eps=1e-12)
        m = "dot"
    out, _, _ = reference.soft_quantize(xo, ko, cd, tau, m, compute_dtype=dtype)
    return out, xd, cd


@pytest.mark.parametrize("tau", [0.01, 1.0, 10.0])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", CASES)
def test_soft_quantize_forward_backward(backend, shape, metric, tau):
    _require_op(backend, "soft_quantize")
    _interpreted_subset(
        backend,
        (shape == (37, 70, 3) and (tau == 0.01 or metric == "dot"))
        or (shape in [(0, 5, 3), (1, 1, 1)] and tau == 1.0 and metric == "l2"),
    )
    n, k, d = shape
    backend.require_small(n, k, d)
    x, cb = make_inputs(n, k, d, seed=n + k, device=backend.device, kind="clustered", noise=0.5)
    xg, cg = x.clone().requires_grad_(), cb.clone().requires_grad_()
    out = vqkernels.soft_quantize(xg, cg, tau, metric, backend=backend.name)
    assert out.shape == x.shape and out.dtype == x.dtype
    go = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    results = {}
    for dt in (torch.float64, torch.float32):
        o, xd, cd = _soft_direct(x, cb, tau, metric, dt)
        gx, gc = torch.autograd.grad((o * go.to(dt)).sum(), (xd, cd)) if n else (xd * 0, cd * 0)
        results[dt] = (o, gx, gc)
    if n:
        gx, gc = torch.autograd.grad((out * go.to(backend.device)).sum(), (xg, cg))
    else:
        gx, gc = torch.zeros_like(x), torch.zeros_like(cb)
    for got, o, r, what in zip(
        (out, gx, gc),
        results[torch.float64],
        results[torch.float32],
        ("out", "grad_x", "grad_codebook"),
    ):
        _assert_rule(got, o, r, what, _logit_scale(x, cb, tau, metric))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_soft_quantize_low_precision(backend, dtype):
    _require_op(backend, "soft_quantize")
    _interpreted_subset(backend, dtype == torch.bfloat16)
    x, cb = make_inputs(37, 70, 9, dtype, seed=2, device=backend.device)
    out = vqkernels.soft_quantize(x, cb, 0.5, "dot", backend=backend.name)
    assert out.dtype == dtype
    oracle, _, _ = _soft_direct(x, cb, 0.5, "dot", torch.float64)
    lowp, _, _ = _soft_direct(x, cb, 0.5, "dot", dtype)
    _assert_rule(out, oracle, lowp, "out", _logit_scale(x, cb, 0.5, "dot"))


@pytest.mark.parametrize("metric", METRICS)
def test_soft_quantize_indices_and_detached_values(backend, metric):
    """return_indices gives the argmax of the logits (same streamed pass); values=codebook.detach()
    leaves the codebook only the gradient through the keys (index backpropagation's split)."""
    _require_op(backend, "soft_quantize")
    _interpreted_subset(backend, metric in ("l2", "dot"))
    tau = 0.3
    x, cb = make_inputs(40, 50, 6, seed=3, device=backend.device)
    cbg = cb.clone().requires_grad_()
    out, idx = vqkernels.soft_quantize(
        x, cbg, tau, metric, values=cbg.detach(), return_indices=True, backend=backend.name
    )
    assert idx.shape == (40,) and idx.dtype == torch.int64
    xo, co, m = _oracle_inputs(x, cb, metric)
    l64 = reference.code_scores(xo, co, m) / tau
    chosen = l64.gather(1, idx.cpu()[:, None]).squeeze(1)
    tol = 8 * U32 * (1.0 + float(l64.abs().max()))
    assert float((l64.max(1).values - chosen).max()) <= tol
    assert float((idx.cpu() == l64.argmax(1)).double().mean()) >= 0.95
    if metric == "cosine":
        return
    go = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    (gc,) = torch.autograd.grad((out * go.to(backend.device)).sum(), cbg)
    o64, lse64, _ = reference.soft_quantize(xo, co, co, tau, m, compute_dtype=torch.float64)
    _, gk, _ = reference.soft_quantize_backward(go.double(), xo, co, co, o64, lse64, tau, m)
    torch.testing.assert_close(gc.double().cpu(), gk, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- registration, errors


def _opcheck_cases():
    x, cb = make_inputs(37, 11, 6, seed=0)
    w = _weights(37).float()
    xb, cbb = x.bfloat16(), cb.bfloat16()
    g = torch.Generator().manual_seed(0)
    gl, gh, gm = (
        torch.randn(37, generator=g),
        torch.randn(37, generator=g),
        torch.randn(11, generator=g),
    )
    empty = torch.empty(0)
    lse, ent, _ = reference.code_distribution(x, cb, w, 0.5, "l2")
    out, slse, _ = reference.soft_quantize(x, cb, cb, 0.5, "dot")
    go = torch.randn(37, 6, generator=g)
    xt = noncontiguous(x, "transposed")
    cases = []
    for m in ("l2", "dot", "euclidean"):
        cases += [
            (
                "code_distribution",
                (x.clone().requires_grad_(), cb.clone().requires_grad_(), w, 0.5, m),
                f"cd-{m}",
            ),
            (
                "soft_quantize",
                (
                    x.clone().requires_grad_(),
                    cb.clone().requires_grad_(),
                    cb.clone().requires_grad_(),
                    0.5,
                    m,
                ),
                f"sq-{m}",
            ),
        ]
    flagged = (gl, gh, gm, x, cb, w, lse, ent, 0.5, "l2", None, 0)
    cases += [
        ("code_distribution", (xb, cbb, w, 2.0, "l2"), "cd-bf16"),
        ("code_distribution", (x[:0], cb, w[:0], 1.0, "l2"), "cd-N0"),
        ("code_distribution", (x, cb[:1], w, 1.0, "dot"), "cd-K1"),
        ("code_distribution", (x.clone().requires_grad_(), cb, w, 0.5, "l2"), "cd-frozen-cb"),
        ("code_distribution", (xt, cb, w, 0.01, "l2"), "cd-strided-tau0.01"),
        ("code_distribution_backward", (gl, gh, gm, x, cb, w, lse, ent, 0.5, "l2"), "cdb"),
        (
            "code_distribution_backward",
            (gl, empty, empty, x, cb, w, lse, ent, 0.5, "l2"),
            "cdb-lse-only",
        ),
        # need_grad_codebook / need_grad_x False (an EMA codebook / a detached x): [0] grads
        ("code_distribution_backward", (*flagged, False), "cdb-no-grad-codebook"),
        ("code_distribution_backward", (*flagged, True, False), "cdb-no-grad-x"),
        ("soft_quantize", (xb, cbb, cbb, 1.0, "dot"), "sq-bf16"),
        ("soft_quantize_backward", (go, x, cb, cb, out, slse, 0.5, "dot"), "sqb"),
    ]
    return [pytest.param(name, args, id=i) for name, args, i in cases]


@pytest.mark.parametrize("name, args", _opcheck_cases())
def test_opcheck_cpu(cpu_backend, name, args):
    if "cpu" not in dispatch.OP_TABLE[name.replace("_backward", "")]:
        pytest.skip("no cpu kernel for this op")
    torch.library.opcheck(getattr(torch.ops.vqkernels, name).default, args)


# The reference under a test namespace with the SAME schemas, fake impls and autograd as
# vqkernels._ops: checks the fakes and the autograd wiring against the specification.
_NS = "vqkernels_softmax_reftest"
_lib = torch.library.Library(_NS, "DEF")
for _name in _ops.CODEBOOK_SOFTMAX_OP_NAMES:
    _lib.define(str(getattr(torch.ops.vqkernels, _name).default._schema).split("::", 1)[1])
_lib.impl("code_distribution", reference.code_distribution, "CompositeExplicitAutograd")
_lib.impl(
    "code_distribution_backward", reference.code_distribution_backward, "CompositeExplicitAutograd"
)
_lib.impl("soft_quantize", reference.soft_quantize, "CompositeExplicitAutograd")
_lib.impl("soft_quantize_backward", reference.soft_quantize_backward, "CompositeExplicitAutograd")
for _name, _fake in (
    ("code_distribution", _ops._code_distribution_fake),
    ("code_distribution_backward", _ops._code_distribution_backward_fake),
    ("soft_quantize", _ops._soft_quantize_fake),
    ("soft_quantize_backward", _ops._soft_quantize_backward_fake),
):
    torch.library.register_fake(f"{_NS}::{_name}", _fake, lib=_lib)
torch.library.register_autograd(
    f"{_NS}::code_distribution", _ops.code_distribution_autograd(_NS),
    setup_context=_ops._code_distribution_setup_context, lib=_lib,
)  # fmt: skip
torch.library.register_autograd(
    f"{_NS}::soft_quantize", _ops.soft_quantize_autograd(_NS),
    setup_context=_ops._soft_quantize_setup_context, lib=_lib,
)  # fmt: skip


@pytest.mark.parametrize("name, args", _opcheck_cases())
def test_opcheck_reference_contract(name, args):
    torch.library.opcheck(getattr(getattr(torch.ops, _NS), name).default, args)


def test_compile_fullgraph_matches_eager():
    """An entropy loss on the op compiles with fullgraph=True (custom op, no graph break)."""
    backend = (
        "cpu"
        if "cpu" in dispatch.OP_TABLE["code_distribution"]
        and not vqkernels.available_backends("cpu")["cpu"]
        else "reference"
    )
    torch._dynamo.reset()

    def step(x, cb):
        lse, ent, mp = vqkernels.code_distribution(x, cb, 0.5, "l2", backend=backend)
        soft = vqkernels.soft_quantize(x, cb, 0.5, "dot", backend=backend)
        return (
            ent.mean()
            - (-(mp * mp.clamp_min(1e-12).log()).sum())
            + lse.mean()
            + soft.square().mean()
        )

    x, cb = make_inputs(33, 40, 6, seed=8)
    xa, ca = x.clone().requires_grad_(), cb.clone().requires_grad_()
    xb, cbb = x.clone().requires_grad_(), cb.clone().requires_grad_()
    la = step(xa, ca)
    la.backward()
    lb = torch.compile(step, fullgraph=True)(xb, cbb)
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cbb.grad, ca.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metric="hamming"), "metric must be one of"),
        (dict(temperature=0.0), "temperature must be a finite float > 0"),
        (dict(temperature=float("inf")), "temperature must be a finite float > 0"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), "mask must be a bool tensor of shape"),
        (dict(mask=torch.ones(5)), "mask must be a bool tensor of shape"),
    ],
)
def test_errors(kwargs, match):
    x, cb = make_inputs(5, 3, 2)
    with pytest.raises(ValueError, match=match):
        vqkernels.code_distribution(x, cb, **kwargs)


def test_errors_shapes_and_dtypes():
    x, cb = make_inputs(5, 3, 2)
    with pytest.raises(ValueError, match="codebook has D=4"):
        vqkernels.soft_quantize(x, torch.randn(3, 4))
    with pytest.raises(TypeError, match="same dtype"):
        vqkernels.code_distribution(x, cb.double().float().half())
    with pytest.raises(TypeError, match="x must be float32"):
        vqkernels.soft_quantize(x.long(), cb)


@pytest.mark.parametrize("d", [9, 70], ids=["D9", "D70-gemm-logits"])
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_deterministic_across_threads_and_isas(
    cpu_backend, restore_threads, monkeypatch, isa, d
):
    """Same bits on every run, thread count and SIMD path: every output element is owned by one
    task with a fixed summation order, the exp/fma arithmetic is the same on every ISA, and the
    BLAS tile products run single-threaded on fixed, aligned tiles (D = 70 also takes the BLAS
    logits path)."""
    x, cb = make_inputs(70, 150, d, seed=6)

    def run():
        xg, cg = x.clone().requires_grad_(), cb.clone().requires_grad_()
        lse, ent, mp = vqkernels.code_distribution(xg, cg, 0.2, "l2", backend="cpu")
        soft = vqkernels.soft_quantize(xg, cg, 0.5, "dot", backend="cpu")
        (lse.sum() + ent.sum() + (mp * mp).sum() + soft.square().sum()).backward()
        return [t.detach().clone() for t in (lse, ent, mp, soft, xg.grad, cg.grad)]

    torch.set_num_threads(2)
    base = run()
    torch.set_num_threads(1)
    monkeypatch.setenv("VQKERNELS_CPU_ISA", isa)
    for a, b in zip(base, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("d", [5, 70])
def test_cpu_blas_and_hand_tile_products_agree(cpu_backend, monkeypatch, d):
    """VQKERNELS_CPU_GEMM=0 (hand-vectorized tile products) and the BLAS path compute the same
    numbers up to fp32 summation order (each is held to the fp64 oracle by the tests above)."""

    def run():
        xg, cg = x.clone().requires_grad_(), cb.clone().requires_grad_()
        lse, ent, mp = vqkernels.code_distribution(xg, cg, 0.3, "l2", backend="cpu")
        soft = vqkernels.soft_quantize(xg, cg, 0.5, "dot", backend="cpu")
        (lse.sum() + ent.sum() + (mp * mp).sum() + soft.square().sum()).backward()
        return [t.detach().clone() for t in (lse, ent, mp, soft, xg.grad, cg.grad)]

    x, cb = make_inputs(45, 130, d, seed=7)
    blas = run()
    monkeypatch.setenv("VQKERNELS_CPU_GEMM", "0")
    for a, b in zip(blas, run()):
        # Relative to the tensor's scale: gradients are differences of sums (Σ e·c − x·Σ e) whose
        # rounding follows the summation order, so small elements carry the large ones' error.
        assert float((a - b).abs().max()) <= 1e-4 * (1.0 + float(a.abs().max()))
