"""Bad inputs raise ValueError/TypeError whose message names the argument (issue 2 item 6):
no crash, no silent answer.  Validation runs in vqkernels.functional before any backend, so the
cases run with every available backend (a backend must not bypass it)."""

from __future__ import annotations

import re

import pytest
import torch

import vqkernels
from vqkernels import BackendUnavailableError
from vqkernels.testing import make_inputs


def _good(device="cpu"):
    x, cb = make_inputs(10, 6, 4, seed=0, device=device)
    idx = torch.arange(10, device=device) % 6
    return x, cb, idx


def _raises(exc, pattern, fn, *args, **kw):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kw)
    return str(info.value)


# ------------------------------------------------------------------ nearest_code / quantize

BAD_X_CB = [
    # (id, make(x, cb) -> (x, cb), exception, regex naming the argument)
    ("x-int", lambda x, cb: (x.to(torch.int32), cb), TypeError, r"^x must be float"),
    ("x-float64", lambda x, cb: (x.double(), cb), TypeError, r"^x must be float"),
    ("x-list", lambda x, cb: (x.tolist(), cb), TypeError, r"^x must be a torch.Tensor"),
    ("x-0d", lambda x, cb: (x[0, 0], cb), ValueError, r"^x must have shape"),
    ("codebook-int", lambda x, cb: (x, cb.long()), TypeError, r"^codebook must be float"),
    ("codebook-1d", lambda x, cb: (x, cb[0]), ValueError, r"^codebook must have shape \[K, D\]"),
    ("codebook-4d", lambda x, cb: (x, cb[None, None]), ValueError, r"^codebook must have shape"),
    # a 3-D codebook is multi-head [H, K, D]: x must then be [..., H, D]
    ("codebook-3d-heads-mismatch", lambda x, cb: (x, cb[None].expand(3, -1, -1)), ValueError,
     r"^a multi-head codebook \[H=3"),
    ("codebook-empty", lambda x, cb: (x, cb[:0]), ValueError, r"^codebook must have K >= 1"),
    ("codebook-D0", lambda x, cb: (x[:, :0], cb[:, :0]), ValueError, r"^codebook must have K"),
    ("D-mismatch", lambda x, cb: (x[:, :3], cb), ValueError, r"x has last dim D=3 but codebook"),
    ("dtype-mismatch", lambda x, cb: (x, cb.half()), TypeError, r"x .* and codebook .* same dtype"),
    ("device-mismatch", lambda x, cb: (x.to("meta"), cb), ValueError, r"x is on meta but codebook"),
    ("x-nan", lambda x, cb: (x.index_fill(0, torch.tensor([3]), float("nan")), cb), ValueError,
     r"^x contains 4 NaN/Inf"),
    ("codebook-inf", lambda x, cb: (x, cb.index_fill(1, torch.tensor([2]), float("inf"))),
     ValueError, r"^codebook contains 6 NaN/Inf"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make, exc, pattern", [c[1:] for c in BAD_X_CB], ids=[c[0] for c in BAD_X_CB]
)
def test_nearest_code_and_quantize_bad_inputs(backend, make, exc, pattern):
    x, cb, _ = _good()
    bx, bcb = make(x, cb)
    if isinstance(bx, torch.Tensor) and bx.device.type != "meta":
        bx = bx.to(backend.device)
    bcb = bcb.to(backend.device)
    _raises(exc, pattern, vqkernels.nearest_code, bx, bcb, backend=backend.name)
    _raises(exc, pattern, vqkernels.quantize, bx, bcb, backend=backend.name)


def test_bad_options(backend):
    x, cb, _ = _good(backend.device)
    b = backend.name
    _raises(ValueError, r"^metric must be one of", vqkernels.nearest_code, x, cb, "l1", backend=b)
    _raises(
        ValueError, r"^metric must be one of", vqkernels.quantize, x, cb, 0.25, "dot", backend=b
    )
    _raises(
        ValueError,
        r"^precision must be",
        vqkernels.nearest_code,
        x,
        cb,
        precision="tf32",
        backend=b,
    )
    _raises(ValueError, r"^beta must be a float >= 0", vqkernels.quantize, x, cb, -0.1, backend=b)
    _raises(ValueError, r"^beta must be", vqkernels.quantize, x, cb, "0.25", backend=b)


def test_nan_checks_can_be_disabled(backend, monkeypatch):
    """check_inputs=False (or VQKERNELS_CHECK_INPUTS=0) skips the finiteness pass: no error, and
    the documented unchecked behaviour (a valid index, a NaN distance)."""
    x, cb, _ = _good(backend.device)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="^x contains"):
        vqkernels.nearest_code(x, cb, backend=backend.name)
    idx, dist = vqkernels.nearest_code(
        x, cb, return_distance=True, backend=backend.name, check_inputs=False
    )
    assert 0 <= int(idx[2]) < 6 and torch.isnan(dist[2])
    monkeypatch.setenv("VQKERNELS_CHECK_INPUTS", "0")
    vqkernels.nearest_code(x, cb, backend=backend.name)
    with pytest.raises(ValueError, match="^x contains"):  # an explicit True still checks
        vqkernels.nearest_code(x, cb, backend=backend.name, check_inputs=True)


# --------------------------------------------------------------------------- cluster_stats


def test_cluster_stats_bad_inputs(backend):
    x, _, idx = _good(backend.device)
    b = backend.name
    cs = vqkernels.cluster_stats
    _raises(ValueError, r"^indices must lie in \[-1, 6\).*\[-2, ", cs, x, idx - 2, 6, backend=b)
    _raises(ValueError, r"^indices must lie in \[-1, 6\).*, 6\]", cs, x, idx + 1, 6, backend=b)
    _raises(TypeError, r"^indices must be int64", cs, x, idx.float(), 6, backend=b)
    _raises(TypeError, r"^indices must be a torch.Tensor", cs, x, idx.tolist(), 6, backend=b)
    _raises(
        ValueError,
        r"^indices must have one entry per row of x \(10\)",
        cs,
        x,
        idx[:9],
        6,
        backend=b,
    )
    _raises(ValueError, r"^num_codes must be an int >= 1", cs, x, idx, 0, backend=b)
    _raises(ValueError, r"^num_codes must be an int >= 1", cs, x, idx, 6.0, backend=b)
    _raises(ValueError, r"^num_codes must be an int >= 1", cs, x, idx, True, backend=b)
    _raises(TypeError, r"^x must be float", cs, x.long(), idx, 6, backend=b)
    xn = x.clone()
    xn[0, 0] = float("inf")
    _raises(ValueError, r"^x contains 1 NaN/Inf", cs, xn, idx, 6, backend=b)


# ----------------------------------------------------------------------------- ema_update_


def _state(device):
    cb = torch.randn(6, 4, device=device)
    return [cb.clone(), torch.ones(6, device=device), cb.clone()]


EMA_BAD = [
    # (id, mutate(args) in place, exception, regex)
    ("codebook-fp16", lambda a: a.__setitem__(0, a[0].half()), TypeError, r"^codebook must be float32"),
    ("codebook-1d", lambda a: a.__setitem__(0, a[0][0]), ValueError, r"^codebook must have shape \[K, D\]"),
    ("cluster_size-shape", lambda a: a.__setitem__(1, a[1][:5]), ValueError, r"^cluster_size must have shape \[6\]"),
    ("cluster_size-int", lambda a: a.__setitem__(1, a[1].long()), TypeError, r"^cluster_size must be float32"),
    ("embed_sum-shape", lambda a: a.__setitem__(2, a[2][:, :3]), ValueError, r"^embed_sum must have shape \[6, 4\]"),
    ("embed_sum-strided", lambda a: a.__setitem__(2, a[2].t().contiguous().t()), ValueError,
     r"^embed_sum is updated in place and must be contiguous"),
    ("embed_sum-list", lambda a: a.__setitem__(2, a[2].tolist()), TypeError, r"^embed_sum must be a torch.Tensor"),
    ("x-D", lambda a: a.__setitem__(3, a[3][:, :2]), ValueError, r"^x has last dim D=2 but codebook has D=4"),
    ("x-int", lambda a: a.__setitem__(3, a[3].int()), TypeError, r"^x must be float"),
    ("x-nan", lambda a: a[3].__setitem__((1, 1), float("nan")), ValueError, r"^x contains 1 NaN/Inf"),
    ("indices-range", lambda a: a.__setitem__(4, a[4] + 1), ValueError, r"^indices must lie in \[-1, 6\)"),
    ("indices-count", lambda a: a.__setitem__(4, a[4][1:]), ValueError, r"^indices must have one entry"),
    ("decay", lambda a: a.__setitem__(5, 1.5), ValueError, r"^decay must be a float in \[0, 1\]"),
    ("decay-negative", lambda a: a.__setitem__(5, -0.1), ValueError, r"^decay must be"),
    ("eps", lambda a: a.__setitem__(6, 0.0), ValueError, r"^eps must be a float > 0"),
    ("device-mismatch", lambda a: a.__setitem__(3, a[3].to("meta")), ValueError, r"^x is on meta"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, exc, pattern", [c[1:] for c in EMA_BAD], ids=[c[0] for c in EMA_BAD]
)
def test_ema_update_bad_inputs_leave_state_untouched(backend, mutate, exc, pattern):
    x, _, idx = _good(backend.device)
    state = _state(backend.device)
    before = [t.clone() for t in state]
    args = [*state, x.clone(), idx.clone(), 0.9, 1e-5]
    mutate(args)
    _raises(exc, pattern, vqkernels.ema_update_, *args, backend=backend.name)
    for t, t0 in zip(state, before):
        assert torch.equal(t, t0), "a rejected call must not modify the EMA state"


def test_ema_blend_bad_inputs():
    state = _state("cpu")
    _raises(ValueError, r"^counts/sums must have shapes \[6\]/\[6, 4\]", vqkernels.ema_blend_,
            *state, torch.zeros(5), torch.zeros(6, 4))  # fmt: skip
    _raises(ValueError, r"^decay must be", vqkernels.ema_blend_, *state, torch.zeros(6),
            torch.zeros(6, 4), 2.0)  # fmt: skip


# -------------------------------------------------------------------------------- backends


def test_unknown_backend():
    x, cb, idx = _good()
    for fn, args in (
        (vqkernels.nearest_code, (x, cb)),
        (vqkernels.quantize, (x, cb)),
        (vqkernels.cluster_stats, (x, idx, 6)),
        (vqkernels.ema_update_, (*_state("cpu"), x, idx)),
    ):
        msg = _raises(ValueError, r"^backend must be 'auto' or one of", fn, *args, backend="gpu")
        assert "'gpu'" in msg and "reference" in msg
        _raises(TypeError, r"^backend must be a str", fn, *args, backend=None)


def test_unavailable_backend_says_why():
    """Every backend unavailable for CPU tensors here raises BackendUnavailableError (a
    RuntimeError) naming the backend and giving the reason available_backends() reports."""
    x, cb, idx = _good()
    reasons = {b: why for b, why in vqkernels.available_backends("cpu").items() if why}
    assert "cuda" in reasons or torch.cuda.is_available()
    for b, why in reasons.items():
        for fn, args in (
            (vqkernels.nearest_code, (x, cb)),
            (vqkernels.quantize, (x, cb)),
            (vqkernels.cluster_stats, (x, idx, 6)),
            (vqkernels.ema_update_, (*_state("cpu"), x, idx)),
        ):
            with pytest.raises(BackendUnavailableError) as info:
                fn(*args, backend=b)
            msg = str(info.value)
            assert isinstance(info.value, RuntimeError)
            assert f"backend {b!r}" in msg and why in msg, msg
            assert len(why) > 20  # a reason, not just "unavailable"


def test_cpu_backend_refuses_cuda_tensors():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    x, cb, _ = _good("cuda")
    with pytest.raises(BackendUnavailableError, match="the cpu backend runs on CPU tensors"):
        vqkernels.nearest_code(x, cb, backend="cpu")


def test_triton_refuses_cpu_tensors_without_interpreter(monkeypatch):
    """The Triton backend on CPU tensors needs TRITON_INTERPRET=1; the error says so."""
    if vqkernels.available_backends()["triton"]:
        pytest.skip(f"triton unavailable: {vqkernels.available_backends()['triton']}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, cb, _ = _good()
    with pytest.raises(BackendUnavailableError, match=re.escape("TRITON_INTERPRET=1")):
        vqkernels.nearest_code(x, cb, backend="triton")


def test_raw_cpu_ops_reject_bad_shapes(cpu_backend):
    """The C++ kernels check their own inputs (TORCH_CHECK) instead of reading out of bounds."""
    x, cb, idx = _good()
    ops = torch.ops.vqkernels
    with pytest.raises(RuntimeError):
        ops.nearest_code(x[:, :3], cb, "l2")
    with pytest.raises(RuntimeError):
        ops.nearest_code(x[0], cb, "l2")
    with pytest.raises(RuntimeError):
        ops.nearest_code(x, cb, "manhattan")
    with pytest.raises(RuntimeError):
        ops.cluster_stats(x, idx[:5], 6)
    with pytest.raises(RuntimeError):
        ops.quantize(x, cb[:, :2], 0.25, "l2", False)
