"""Grouped ``mean_probs`` of ``code_distribution`` (``groups=``, ``num_groups=``) on every backend.

``mean_probs[g]`` is the mean of ``p_i`` over the unmasked rows with ``groups_i = g`` (zeros for
an empty group): the oracle here is the *ungrouped* direct formula run on each group's rows
separately (fp64), so the grouped reference, the kernels and the functional weights are all
checked against an independent computation.  Tolerances follow test_codebook_softmax.py's rule
(at most 2x the error of the direct formula in fp32, plus one rounding of the logits).
"""

from __future__ import annotations

import pytest
import torch

# Same directory (pytest's default rootdir import): the shared oracle rule and the reference ops
# registered under a test namespace with vqkernels' schemas, fakes and autograd.
from test_codebook_softmax import _NS, _assert_rule, _logit_scale

import vqkernels
from vqkernels import dispatch, reference
from vqkernels.testing import make_inputs

METRICS = ("l2", "dot", "cosine", "euclidean")


def _require_op(backend):
    if backend.name not in dispatch.OP_TABLE["code_distribution"]:
        pytest.skip(f"code_distribution has no {backend.name} implementation")


def _per_group_direct(x, cb, tau, metric, mask, groups, num_groups, dtype):
    """``[G, K]``: the ungrouped direct formula's mean_probs over each group's kept rows (zeros for
    an empty group), at ``dtype`` (fp64: the oracle)."""
    xf = x.detach().reshape(-1, x.shape[-1]).cpu()
    g = groups.reshape(-1).cpu()
    keep = torch.ones_like(g, dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
    xo, co = xf.to(dtype), cb.detach().cpu().to(dtype)
    if metric == "cosine":
        xo = torch.nn.functional.normalize(xo, dim=-1, eps=1e-12)
        co = torch.nn.functional.normalize(co, dim=-1, eps=1e-12)
        metric = "dot"
    rows = []
    for grp in range(num_groups):
        sel = (g == grp) & keep
        n = int(sel.sum())
        if n == 0:
            rows.append(torch.zeros(cb.shape[0], dtype=dtype))
            continue
        w = torch.full((n,), 1.0 / n, dtype=dtype)
        rows.append(reference.code_distribution(xo[sel], co, w, tau, metric, compute_dtype=dtype)[2])
    return torch.stack(rows).to(torch.float64 if dtype == torch.float64 else torch.float32)


def _positions(shape, device):
    """groups = the sequence position n of an x of shape [B, N, D] (LR's diversity loss)."""
    b, n = shape
    return torch.arange(n, device=device).expand(b, n).contiguous()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_grouped_forward_matches_per_group_direct(backend, metric, tau):
    _require_op(backend)
    if backend.interpreted and not (tau == 1.0 and metric in ("l2", "dot")):
        pytest.skip("case left to the GPU run (Triton interpreter subset)")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 6, generator=g).to(backend.device)  # B = 5, positions 0..6
    cb = torch.randn(37, 6, generator=g).to(backend.device)
    groups = _positions((5, 7), backend.device)
    lse, ent, mp = vqkernels.code_distribution(
        x, cb, tau, metric, groups=groups, num_groups=7, backend=backend.name
    )
    assert mp.shape == (7, 37) and mp.dtype == torch.float32 and lse.shape == (5, 7)
    oracle = _per_group_direct(x, cb, tau, metric, None, groups, 7, torch.float64)
    direct32 = _per_group_direct(x, cb, tau, metric, None, groups, 7, torch.float32)
    _assert_rule(mp, oracle, direct32, "grouped mean_probs", _logit_scale(x, cb, tau, metric))
    torch.testing.assert_close(mp.sum(1).double().cpu(), torch.ones(7, dtype=torch.float64), atol=1e-5, rtol=0)
    # logsumexp and entropy do not depend on the grouping.
    lse0, ent0, _ = vqkernels.code_distribution(x, cb, tau, metric, backend=backend.name)
    assert torch.equal(lse, lse0) and torch.equal(ent, ent0)


def test_grouped_masks_and_empty_groups(backend):
    """Masked rows leave their group's mean; a group with no (kept) rows is all zeros; group ids
    need not be sorted or contiguous (rows of one group scattered over the batch)."""
    _require_op(backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 13, 5, generator=g).to(backend.device).transpose(0, 1)  # strided [13, 3, 5]
    cb = torch.randn(70, 5, generator=g).to(backend.device)
    groups = torch.randint(0, 6, (13, 3), generator=g)
    groups[groups == 4] = 5  # group 4: no rows at all
    mask = torch.rand(13, 3, generator=g) > 0.3
    mask[groups == 2] = False  # group 2: rows, all masked
    groups, mask = groups.to(backend.device), mask.to(backend.device)
    _, _, mp = vqkernels.code_distribution(
        x, cb, 0.4, "l2", mask, groups=groups, num_groups=6, backend=backend.name
    )
    oracle = _per_group_direct(x, cb, 0.4, "l2", mask, groups, 6, torch.float64)
    direct32 = _per_group_direct(x, cb, 0.4, "l2", mask, groups, 6, torch.float32)
    _assert_rule(mp, oracle, direct32, "masked grouped", _logit_scale(x, cb, 0.4, "l2"))
    assert torch.equal(mp[2].cpu(), torch.zeros(70)) and torch.equal(mp[4].cpu(), torch.zeros(70))
    # One group holding every row is the ungrouped result.
    _, _, mp1 = vqkernels.code_distribution(
        x, cb, 0.4, "l2", mask, groups=torch.zeros_like(groups), num_groups=1, backend=backend.name
    )
    _, _, mp_flat = vqkernels.code_distribution(x, cb, 0.4, "l2", mask, backend=backend.name)
    torch.testing.assert_close(mp1[0], mp_flat, rtol=1e-5, atol=1e-7)


def test_grouped_n0(backend):
    _require_op(backend)
    x, cb = make_inputs(0, 9, 4, device=backend.device)
    groups = torch.zeros(0, dtype=torch.int64, device=backend.device)
    lse, ent, mp = vqkernels.code_distribution(
        x, cb, groups=groups, num_groups=3, backend=backend.name
    )
    assert lse.shape == (0,) and torch.equal(mp.cpu(), torch.zeros(3, 9))


def _grouped_grads(x, cb, tau, metric, mask, groups, num_groups, dtype, a, b, c):
    """Gradients of Σa·lse + Σb·H + Σc·mean_probs[G, K] through the direct grouped formula."""
    xd = x.detach().cpu().to(dtype).requires_grad_()
    cd = cb.detach().cpu().to(dtype).requires_grad_()
    xo, co, m = xd, cd, metric
    if metric == "cosine":
        xo = torch.nn.functional.normalize(xd, dim=-1, eps=1e-12)
        co = torch.nn.functional.normalize(cd, dim=-1, eps=1e-12)
        m = "dot"
    g = groups.reshape(-1).cpu()
    keep = mask.reshape(-1).cpu().to(dtype)
    counts = torch.zeros(num_groups, dtype=dtype).index_add_(0, g, keep)
    w = keep / counts.clamp_min(1.0)[g]
    lse, ent, mp = reference.code_distribution(xo, co, w, tau, m, g, num_groups, compute_dtype=dtype)
    loss = (a.to(dtype) * lse).sum() + (b.to(dtype) * ent).sum() + (c.to(dtype) * mp).sum()
    return torch.autograd.grad(loss, (xd, cd))


@pytest.mark.parametrize("metric", METRICS)
def test_grouped_gradients(backend, metric):
    _require_op(backend)
    if backend.interpreted and metric not in ("l2", "dot"):
        pytest.skip("case left to the GPU run (Triton interpreter subset)")
    n, k, d, G = 41, 67, 5, 5
    x, cb = make_inputs(n, k, d, seed=11, device=backend.device, kind="clustered", noise=0.5)
    gen = torch.Generator().manual_seed(2)
    groups = torch.randint(0, G - 1, (n,), generator=gen).to(backend.device)  # group 4 empty
    mask = (torch.arange(n) % 4 != 1).to(backend.device)
    a, b, c = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.randn(G, k, generator=gen)
    xg, cg = x.clone().requires_grad_(), cb.clone().requires_grad_()
    lse, ent, mp = vqkernels.code_distribution(
        xg, cg, 0.3, metric, mask, groups=groups, num_groups=G, backend=backend.name
    )
    dev = backend.device
    loss = (a.to(dev) * lse).sum() + (b.to(dev) * ent).sum() + (c.to(dev) * mp).sum()
    gx, gc = torch.autograd.grad(loss, (xg, cg))
    ox, oc = _grouped_grads(x, cb, 0.3, metric, mask, groups, G, torch.float64, a, b, c)
    rx, rc = _grouped_grads(x, cb, 0.3, metric, mask, groups, G, torch.float32, a, b, c)
    scale = _logit_scale(x, cb, 0.3, metric)
    _assert_rule(gx, ox, rx, "grad_x", scale)
    _assert_rule(gc, oc, rc, "grad_codebook", scale)
    # Only through mean_probs (the other gradients None: the kernels skip those terms).
    gx1, gc1 = torch.autograd.grad((c.to(dev) * vqkernels.code_distribution(
        xg, cg, 0.3, metric, mask, groups=groups, num_groups=G, backend=backend.name
    )[2]).sum(), (xg, cg))  # fmt: skip
    z = torch.zeros(n)
    ox1, oc1 = _grouped_grads(x, cb, 0.3, metric, mask, groups, G, torch.float64, z, z, c)
    rx1, rc1 = _grouped_grads(x, cb, 0.3, metric, mask, groups, G, torch.float32, z, z, c)
    _assert_rule(gx1, ox1, rx1, "grad_x (mean_probs only)", scale)
    _assert_rule(gc1, oc1, rc1, "grad_codebook (mean_probs only)", scale)


@pytest.mark.parametrize("metric", ["l2", "dot", "euclidean"])
def test_reference_grouped_gradcheck_and_closed_form(metric):
    n, k, d, G = 9, 11, 4, 3
    x, cb = make_inputs(n, k, d, seed=5)
    x, cb = x.double().requires_grad_(), cb.double().requires_grad_()
    groups = torch.tensor([2, 0, 2, 2, 1, 0, 2, 1, 2])
    w = torch.rand(n, generator=torch.Generator().manual_seed(1)).double()
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(s, generator=gen).double() for s in ((n,), (n,), (G, k)))

    def f(x, cb):
        lse, ent, mp = reference.code_distribution(
            x, cb, w, 0.7, metric, groups, G, compute_dtype=torch.float64
        )
        return (a * lse).sum() + (b * ent).sum() + (c * mp).sum()

    assert torch.autograd.gradcheck(f, (x, cb))
    lse, ent, mp = reference.code_distribution(x, cb, w, 0.7, metric, groups, G, torch.float64)
    ex, ec = torch.autograd.grad((a * lse).sum() + (b * ent).sum() + (c * mp).sum(), (x, cb))
    gx, gc = reference.code_distribution_backward(
        a, b, c, x, cb, w, lse, ent, 0.7, metric, groups, G
    )
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gc, ec)


def _grouped_opcheck_args():
    x, cb = make_inputs(37, 11, 6, seed=0)
    groups = torch.arange(37) % 4
    w = torch.rand(37, generator=torch.Generator().manual_seed(0))
    lse, ent, _ = reference.code_distribution(x, cb, w, 0.5, "l2", groups, 4)
    g = torch.Generator().manual_seed(1)
    gl, gm = torch.randn(37, generator=g), torch.randn(4, 11, generator=g)
    return [
        pytest.param(
            "code_distribution",
            (x.clone().requires_grad_(), cb.clone().requires_grad_(), w, 0.5, m, groups, 4),
            id=f"cd-grouped-{m}",
        )
        for m in ("l2", "dot", "euclidean")
    ] + [
        pytest.param(
            "code_distribution_backward",
            (gl, torch.empty(0), gm, x, cb, w, lse, ent, 0.5, "l2", groups, 4),
            id="cdb-grouped",
        )
    ]


@pytest.mark.parametrize("name, args", _grouped_opcheck_args())
def test_grouped_opcheck_cpu(cpu_backend, name, args):
    torch.library.opcheck(getattr(torch.ops.vqkernels, name).default, args)


@pytest.mark.parametrize("name, args", _grouped_opcheck_args())
def test_grouped_opcheck_reference_contract(name, args):
    torch.library.opcheck(getattr(getattr(torch.ops, _NS), name).default, args)


def test_grouped_compile_fullgraph_matches_eager():
    """LR's diversity-loss shape (entropy of the per-position mean) compiles without a break."""
    backend = "cpu" if not vqkernels.available_backends("cpu")["cpu"] else "reference"
    torch._dynamo.reset()

    def step(x, cb, groups):
        _, _, mp = vqkernels.code_distribution(
            x, cb, 0.5, "l2", groups=groups, num_groups=7, backend=backend
        )
        return (mp * mp.clamp_min(1e-5).log()).sum(-1).mean()

    x, cb = torch.randn(4, 7, 6), torch.randn(40, 6)
    groups = _positions((4, 7), "cpu")
    xa, ca = x.clone().requires_grad_(), cb.clone().requires_grad_()
    xb, cbb = x.clone().requires_grad_(), cb.clone().requires_grad_()
    la = step(xa, ca, groups)
    la.backward()
    lb = torch.compile(step, fullgraph=True)(xb, cbb, groups)
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cbb.grad, ca.grad, rtol=1e-4, atol=1e-6)


def test_grouped_cpu_deterministic_across_threads(cpu_backend, restore_threads):
    x, cb = make_inputs(70, 150, 9, seed=6)
    groups = torch.randint(0, 5, (70,), generator=torch.Generator().manual_seed(0))

    def run():
        xg, cg = x.clone().requires_grad_(), cb.clone().requires_grad_()
        lse, ent, mp = vqkernels.code_distribution(
            xg, cg, 0.2, "l2", groups=groups, num_groups=5, backend="cpu"
        )
        (lse.sum() + ent.sum() + (mp * mp).sum()).backward()
        return [t.detach().clone() for t in (mp, xg.grad, cg.grad)]

    torch.set_num_threads(2)
    base = run()
    torch.set_num_threads(1)
    for a, b in zip(base, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(groups=torch.zeros(5, dtype=torch.int64)), ValueError, "groups needs num_groups"),
        (dict(num_groups=3), ValueError, "num_groups is only used with groups"),
        (dict(groups=torch.zeros(5, dtype=torch.int64), num_groups=0), ValueError, ">= 1"),
        (dict(groups=torch.zeros(5, dtype=torch.int64), num_groups=2.0), TypeError, "an int"),
        (dict(groups=torch.zeros(5, dtype=torch.int32), num_groups=2), ValueError, "int64 tensor"),
        (dict(groups=torch.zeros(4, dtype=torch.int64), num_groups=2), ValueError, "of shape"),
        (dict(groups=torch.tensor([0, 1, 2, 1, 0]), num_groups=2), ValueError, r"lie in \[0, "),
        (dict(groups=torch.tensor([0, -1, 0, 1, 0]), num_groups=2), ValueError, r"lie in \[0, "),
        (dict(groups=[0, 0, 0, 0, 0], num_groups=1), TypeError, "groups must be a torch.Tensor"),
    ],
)
def test_grouped_errors(kwargs, exc, match):
    x, cb = make_inputs(5, 3, 2)
    with pytest.raises(exc, match=match):
        vqkernels.code_distribution(x, cb, **kwargs)


def test_grouped_cpu_kernel_checks_range(cpu_backend):
    """The raw op checks the group ids itself (functional's check can be turned off)."""
    x, cb = make_inputs(5, 3, 2)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.vqkernels.code_distribution(
            x, cb, torch.ones(5), 1.0, "l2", torch.tensor([0, 1, 2, 0, 0]), 2
        )

