"""Helpers for the tests of the vector-quantize-pytorch drop-ins against the installed package
(imported by the test modules of this folder; pytest puts the folder on ``sys.path``)."""

from __future__ import annotations

import torch

#: fp32 ulps: upstream and the drop-ins order a few elementwise operations differently
TOL = dict(rtol=1e-5, atol=1e-6)


def assert_same(theirs, ours, name="out", exact_ints=True, **tol):
    """Same nesting (tuple/list/namedtuple), shapes, dtypes; ints equal, floats close."""
    tol = tol or TOL
    if theirs is None or ours is None:
        assert theirs is None and ours is None, f"{name}: {theirs!r} vs {ours!r}"
        return
    if isinstance(theirs, (tuple, list)):
        assert isinstance(ours, (tuple, list)) and len(theirs) == len(ours), f"{name}: {type(theirs)} vs {type(ours)}"
        for i, (a, b) in enumerate(zip(theirs, ours)):
            assert_same(a, b, f"{name}[{i}]", exact_ints, **tol)
        return
    assert theirs.shape == ours.shape, f"{name}: shape {tuple(theirs.shape)} vs {tuple(ours.shape)}"
    assert theirs.dtype == ours.dtype, f"{name}: dtype {theirs.dtype} vs {ours.dtype}"
    if theirs.is_floating_point():
        torch.testing.assert_close(ours, theirs, msg=lambda m: f"{name}: {m}", **tol)
    elif exact_ints:
        assert torch.equal(theirs, ours), f"{name}: {int((theirs != ours).sum())} entries differ"


def strict_pair(upstream_cls, ours_cls, seed=0, **kwargs):
    """Build both with the same kwargs; copy upstream's weights into ours (strict) and back."""
    torch.manual_seed(seed)
    up = upstream_cls(**kwargs)
    ours = ours_cls(**kwargs)
    ours.load_state_dict(up.state_dict(), strict=True)
    up.load_state_dict(ours.state_dict(), strict=True)
    a, b = up.state_dict(), ours.state_dict()
    assert list(a) == list(b), (list(a), list(b))
    for k in a:
        assert a[k].shape == b[k].shape, k
    return up, ours


def twin_inputs(*shape, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    return x.clone().requires_grad_(), x.clone().requires_grad_()
