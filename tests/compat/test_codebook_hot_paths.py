"""Shortcuts in the hot paths of the VQ drop-ins (``compat/vector_quantize_pytorch/_codebook.py``
and ``_streamed.py``) against the plain formulas they replace.  The LR-vs-ours tests of this folder
check the same paths end to end; these pin the shortcut cases (exact-zero residual rows, replayed
residual-stack inputs) directly, on small shapes."""

from __future__ import annotations

import torch

from vqkernels.compat.vector_quantize_pytorch import _codebook, _streamed


def _plain_redecide(idx, near, flat, codes):
    out = idx.clone()
    for h in range(flat.shape[0]):
        rows = near[h].nonzero().squeeze(-1)
        if rows.numel():
            out[h, rows] = _streamed.logits(flat[h, rows], codes[h], "neg_cdist").argmax(dim=-1)
    return out


def test_redecide_near_rows_zero_rows_take_the_one_row_shortcut():
    # rows that are exactly 0 (residual = code) decide by -sqrt(clamp(‖c‖², 1e-8)) alone; codes
    # 3 and 6 are both exactly 0 (an exact tie: the lowest index wins, as LR's argmax), code 9
    # equals row 1 (a nonzero near row keeps the GEMM path)
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(2, 12, 5, generator=g)
    codes[0, 3] = 0.0
    codes[0, 6] = 0.0
    codes[1, 7] = 1e-5  # no exact-zero code in head 1: the smallest norm wins
    flat = torch.randn(2, 10, 5, generator=g)
    flat[:, [0, 4, 7]] = 0.0
    flat[0, 1] = codes[0, 9]
    near = torch.zeros(2, 10, dtype=torch.bool)
    near[0, [0, 1, 4, 7]] = True
    near[1, [4, 7, 8]] = True
    idx = torch.full((2, 10), 11, dtype=torch.long)
    want = _plain_redecide(idx, near, flat, codes)
    hs, ns = _codebook._redecide_near_rows_(idx, near, flat, codes)
    assert torch.equal(idx, want)
    assert idx[0, 0] == 3 and idx[0, 1] == 9 and idx[1, 4] == 7 and idx[0, 2] == 11
    assert torch.equal(torch.stack([hs, ns]), torch.stack(near.nonzero(as_tuple=True)))


def _naive_inputs(base, steps, patches):
    r, out = base.reshape(-1, base.shape[-1]), [base.reshape(-1, base.shape[-1])]
    for i, (idx, snap) in enumerate(steps):
        v = snap[idx]
        if i in patches:  # the rotation value patched on rows with ‖x‖ < 1e-6
            v = v.clone()
            v[patches[i][0]] = patches[i][1]
        r = r - v
        out.append(r)
    return out


def test_residual_chain_replay_keeps_inputs_for_lower_depths_bit_identical():
    # the backward asks for depth inputs in decreasing order; kept replayed inputs must give the
    # same bits as a replay from the base, in any request order, and be released once taken
    g = torch.Generator().manual_seed(0)
    depths, n, k, d = 8, 37, 5, 3
    base = torch.randn(n, d, generator=g)
    steps = [(torch.randint(0, k, (n,), generator=g), torch.randn(k, d, generator=g)) for _ in range(depths)]
    patches = {2: (torch.tensor([1, 4, 30]), torch.randn(3, d, generator=g))}
    want = _naive_inputs(base, steps, patches)
    empty, no_rows = torch.zeros(0, d), torch.zeros(0, dtype=torch.long)
    for order in (list(range(depths - 1, -1, -1)), [5, 7, 2, 6, 0, 3, 1, 4]):
        chain = _streamed.ResidualChain(base)
        for i, (idx, snap) in enumerate(steps):
            tiny, vals = patches.get(i, (no_rows, empty))
            chain.steps.append([idx, snap, None, True, tiny, vals])
        passes = []
        real_codes = chain.codes
        chain.codes = lambda i, passes=passes, real=real_codes: passes.append(i) or real(i)
        for depth in order:
            assert torch.equal(chain.input(depth), want[depth]), (order, depth)
        if order[0] == depths - 1:
            assert not chain._replayed  # every kept input was taken by its depth
            assert len(passes) <= 2 * depths < depths * (depths - 1) // 2


def _lr_rotation_value(x, q):
    # LR's rotate_to value, row by row (the formula _rotation_value applies to tiny rows)
    u, qh, w, s = _streamed._rotation_frame(x, q, x.norm(dim=-1, keepdim=True))
    return s * (x - 2.0 * w * _streamed._rowdot(x, w) + 2.0 * qh * _streamed._rowdot(x, u))


def test_rotation_value_patches_tiny_rows_and_zero_rows_give_lr_value():
    # rows with ‖x‖ < 1e-6 take LR's clamped value: exactly-zero rows skip the formula (their
    # value is 0), the other tiny rows use it; every other row is exactly q
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=g)
    q = torch.randn(9, 6, generator=g)
    x[2] = 0.0
    x[5] = 1e-8 * torch.randn(6, generator=g)
    x[7] = 0.0
    out, tiny, vals = _streamed._rotation_value(x, q, return_patch=True)
    assert tiny.tolist() == [2, 5, 7]
    keep = torch.ones(9, dtype=torch.bool)
    keep[tiny] = False
    assert torch.equal(out[keep], q[keep])
    want = _lr_rotation_value(x[tiny], q[tiny])
    assert torch.equal(out[tiny], want) and torch.equal(vals, want)
    assert torch.equal(out[[2, 7]], torch.zeros(2, 6)) and out[5].abs().sum() > 0


def test_residual_chain_backward_fused_kernel_matches_pytorch_formula():
    # the chain's backward runs the fused quantize_backward kernel on the cpu backend and the
    # PyTorch rotation formula on the reference backend: same indices, outputs and EMA state,
    # gradients equal to fp32 rounding (amplified by ‖q‖/‖x‖ on near-zero residuals)
    from vqkernels import dispatch
    from vqkernels.compat import ResidualVQ

    if dispatch.resolve("auto", torch.device("cpu"), "quantize", ("rotation",)) != "cpu":
        import pytest

        pytest.skip("the C++ cpu backend is not built")
    kw = dict(dim=8, num_quantizers=4, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=2)
    outs = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        rvq = ResidualVQ(**kw, backend=backend)
        x = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(3)
        q, idx, losses = rvq(x)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
        ((q * g).sum() + losses.sum()).backward()
        outs.append((q.detach(), idx, losses.detach(), x.grad, rvq.state_dict()))
    (q0, i0, l0, g0, s0), (q1, i1, l1, g1, s1) = outs
    assert torch.equal(i0, i1)
    torch.testing.assert_close(q0, q1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l0, l1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)
    for k in s0:
        torch.testing.assert_close(s0[k].float(), s1[k].float(), rtol=1e-5, atol=1e-6, msg=k)
