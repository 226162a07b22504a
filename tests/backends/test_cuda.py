"""The CUDA C++ backend (``vqkernels._C_cuda``, csrc/cuda) against the reference.

The shared op tests (test_nearest_code.py, test_cluster_stats.py, ...) already run the ``cuda``
backend through the ``backend`` fixture.  This file adds what is specific to the CUDA kernels:

* the K-split search (small N, large K: several blocks per row merged in split order), ties
  across code tiles and across splits (lowest index), D around the 16-dim tile edge;
* segments spanning many 64-row chunks (a collapsed codebook), ``-1`` rows, D > 256 (several
  thread blocks along D) in the deterministic sort + segmented sums;
* non-unit row strides (read in place, no copy: results bitwise equal to the contiguous call);
* bitwise reproducibility run to run of every op, fused gradients, no N x K memory;
* ``torch.library.opcheck`` of every op on CUDA tensors, and the binding's error messages.

GPU tests carry the ``cuda`` marker and skip without a GPU; with a GPU but without the built
extension they skip with the reason, unless ``VQKERNELS_REQUIRE_CUDA=1`` (set by
benchmarks/gpu_check.sh) turns that into a failure.  The last tests (no GPU needed) check
``.ci/compile_cuda.sh``; CI runs the script itself (scripts/test.sh), so the full compile here
runs only with ``VQKERNELS_TEST_NVCC=1``.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqkernels
from vqkernels import dispatch, reference
from vqkernels.testing import (
    CORE_SHAPES,
    EmaTolerance,
    case_id,
    check_cluster_stats,
    check_distances,
    check_indices,
    check_low_precision,
    make_inputs,
    noncontiguous,
)

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
OPS = torch.ops.vqkernels
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Shapes that exercise the CUDA tiling on top of the core table: N = 2 with K = 4096 splits K
# over 32 blocks; K = 16385 leaves a 1-code tile; D = 16/17 sit on the 16-dim tile edge;
# N = 128/129 on the 128-row block edge, K = 129 one past the 128-code tile.
CUDA_SHAPES = CORE_SHAPES + ((2, 4096, 16), (3, 16385, 17), (128, 128, 16), (129, 129, 1))


@pytest.fixture(scope="module")
def dev() -> torch.device:
    """The CUDA device, or skip (fail with VQKERNELS_REQUIRE_CUDA=1) with the reason."""
    if not HAS_CUDA:
        pytest.skip("no CUDA GPU on this machine")
    why = vqkernels.available_backends("cuda")["cuda"]
    if why:
        if os.environ.get("VQKERNELS_REQUIRE_CUDA") == "1":
            pytest.fail(f"VQKERNELS_REQUIRE_CUDA=1 but the cuda backend is unavailable: {why}")
        pytest.skip(f"cuda backend unavailable: {why}")
    return torch.device("cuda")


cuda = pytest.mark.cuda


def _ids(shapes):
    return [case_id(n, k, d) for n, k, d in shapes]


# ---------------------------------------------------------------------------- nearest_code


@cuda
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=_ids(CUDA_SHAPES))
def test_nearest_code_fp32(dev, shape, metric):
    n, k, d = shape
    x, cb = make_inputs(n, k, d, seed=n + k + d)
    idx, dist = OPS.nearest_code(x.to(dev), cb.to(dev), metric)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == (n,) and dist.shape == (n,) and idx.device == dev
    check_indices(x, cb, idx.cpu(), metric)
    check_distances(x, cb, idx.cpu(), dist.cpu(), metric)


@cuda
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape",
    [(257, 130, 33), (3, 16385, 17), (1000, 512, 64)],
    ids=_ids([(257, 130, 33), (3, 16385, 17), (1000, 512, 64)]),
)
def test_nearest_code_low_precision(dev, shape, dtype, metric):
    n, k, d = shape
    x, cb = make_inputs(n, k, d, dtype, seed=1)
    idx, dist = OPS.nearest_code(x.to(dev), cb.to(dev), metric)
    check_low_precision(x, cb, idx.cpu(), dist.cpu(), metric)


@cuda
@pytest.mark.parametrize("n", [2, 300], ids=["split-K", "row-blocks"])
def test_ties_go_to_lowest_index(dev, n):
    # Integer inputs: every score is exact in fp32 whatever the order, so duplicated codes tie
    # exactly.  Copies sit in other code tiles and (n = 2) in other K-splits, *after* the first.
    k, d = 4096, 19
    x, cb = make_inputs(n, k, d, kind="integer", seed=3)
    cb[1000] = cb[7]
    cb[4000] = cb[7]
    cb[2500:2600] = cb[100:200]
    x[0] = cb[7]
    x[1] = cb[150]
    idx, dist = OPS.nearest_code(x.to(dev), cb.to(dev), "l2")
    want, want_dist = reference.nearest_code(x, cb, "l2")
    assert torch.equal(idx.cpu(), want)
    assert int(idx[0]) == 7 and int(idx[1]) == 150
    assert torch.equal(dist.cpu(), want_dist)  # exact integer arithmetic
    # Cosine: identical codes give bit-identical scores in the kernel, so the first one wins.
    idx_c, _ = OPS.nearest_code(x.to(dev), cb.to(dev), "cosine")
    check_indices(x, cb, idx_c.cpu(), "cosine")
    assert int(idx_c[0]) <= 7


@cuda
@pytest.mark.parametrize("how", ["row-strided", "col-strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_strided_inputs_bitwise_equal(dev, how, dtype):
    x, cb = make_inputs(131, 257, 35, dtype, seed=5, device=dev)
    for metric in ("l2", "cosine"):
        idx, dist = OPS.nearest_code(x, cb, metric)
        idx_s, dist_s = OPS.nearest_code(noncontiguous(x, how), noncontiguous(cb, how), metric)
        # Same per-(row, code) FMA order whatever the strides: identical bits.
        assert torch.equal(idx, idx_s) and torch.equal(dist, dist_s)
    q, qi, loss = OPS.quantize(x, cb, 0.25, "l2", True)
    q_s, qi_s, loss_s = OPS.quantize(
        noncontiguous(x, how), noncontiguous(cb, how), 0.25, "l2", True
    )
    assert torch.equal(q, q_s) and torch.equal(qi, qi_s) and torch.equal(loss, loss_s)


@cuda
def test_public_api_dispatches_to_cuda(dev):
    assert dispatch.resolve("auto", dev) == "cuda"
    x, cb = make_inputs(6 * 7, 50, 12, seed=2)
    x4 = x.reshape(2, 3, 7, 12).to(dev)
    idx, dist = vqkernels.nearest_code(x4, cb.to(dev), return_distance=True, backend="cuda")
    assert idx.shape == (2, 3, 7) and dist.shape == (2, 3, 7)
    check_indices(x, cb, idx.reshape(-1).cpu())


@cuda
def test_no_n_by_k_buffer(dev):
    n, k, d = 4096, 65536, 32
    x, cb = make_inputs(n, k, d, seed=4, device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    OPS.nearest_code(x, cb, "l2")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated(dev) - base
    assert extra < n * k * 4 // 64, (
        f"nearest_code used {extra} extra bytes (N x K fp32 = {n * k * 4})"
    )


# --------------------------------------------------------------- cluster_stats / ema_update_


def _indices(n: int, k: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(0, k, (n,), generator=g)
    if kind == "masked":  # a third of the rows ignored
        idx = torch.randint(0, k, (n,), generator=g)
        idx[torch.rand(n, generator=g) < 1 / 3] = -1
        return idx
    if kind == "collapsed":  # most rows on one code: its segment spans many 64-row chunks
        idx = torch.randint(0, k, (n,), generator=g)
        idx[torch.rand(n, generator=g) < 0.9] = k // 2
        return idx
    if kind == "blocks":  # long sorted runs of a few codes, chunk edges inside and between them
        return (torch.arange(n) * 7 // max(n, 1)).clamp_max(k - 1).flip(0)
    raise ValueError(kind)


STATS_CASES = [
    (0, 5, 3, "uniform"),
    (1, 1, 1, "uniform"),
    (37, 100, 3, "uniform"),  # K > N
    (200, 1, 7, "masked"),  # one code, 200 rows: 4 chunks
    (1000, 64, 17, "collapsed"),
    (4099, 33, 5, "blocks"),
    (513, 130, 300, "masked"),  # D > 256: two thread blocks along D
    (3000, 7, 64, "collapsed"),
]


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "case", STATS_CASES, ids=[f"{case_id(n, k, d)}-{kind}" for n, k, d, kind in STATS_CASES]
)
def test_cluster_stats(dev, case, dtype):
    n, k, d, kind = case
    x, _ = make_inputs(n, 1, d, dtype, seed=n + d)
    idx = _indices(n, k, kind, seed=k)
    counts, sums = OPS.cluster_stats(x.to(dev), idx.to(dev), k)
    check_cluster_stats(x, idx, k, counts.cpu(), sums.cpu())
    # Sums accumulate in float64 and round once, like the reference: equal but for rare ulps.
    _, want = reference.cluster_stats(x, idx, k)
    assert float((sums.cpu() != want).float().mean() if sums.numel() else 0.0) < 0.01


@cuda
def test_cluster_stats_ignores_out_of_range_and_int32(dev):
    x, _ = make_inputs(50, 1, 4, seed=9, device=dev)
    idx = torch.arange(50, device=dev) % 6 - 1  # -1 .. 4 with K = 4: -1 and 4 ignored
    counts, sums = OPS.cluster_stats(x, idx, 4)
    keep = (idx >= 0) & (idx < 4)
    check_cluster_stats(x[keep].cpu(), idx[keep].cpu(), 4, counts.cpu(), sums.cpu())
    c32, s32 = OPS.cluster_stats(x, idx.to(torch.int32), 4)
    assert torch.equal(c32, counts) and torch.equal(s32, sums)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decay", [0.99, 0.5, 0.0])
def test_ema_update_matches_reference(dev, decay, dtype):
    k, d, eps = 70, 33, 1e-5
    g = torch.Generator().manual_seed(11)
    state = (torch.randn(k, d, generator=g), torch.rand(k, generator=g) + 0.5)
    state = (state[0], state[1], state[0] * state[1].unsqueeze(1))
    ref = tuple(t.clone() for t in state)
    got = tuple(t.clone().to(dev) for t in state)
    tol = EmaTolerance(k, d, eps)
    for step, kind in enumerate(["uniform", "masked", "collapsed"]):
        x, _ = make_inputs(700, 1, d, dtype, seed=step)
        idx = _indices(700, k, kind, seed=step)
        reference.ema_update_(*ref, x, idx, decay, eps)
        OPS.ema_update_(*got, x.to(dev), idx.to(dev), decay, eps)
        tol.step(x, idx, decay, ref[2])
        tol.check(got, ref)


@cuda
def test_ema_update_in_place_and_checked(dev):
    cb = torch.zeros(8, 4, device=dev)
    cs = torch.ones(8, device=dev)
    es = torch.zeros(8, 4, device=dev)
    ptrs = (cb.data_ptr(), cs.data_ptr(), es.data_ptr())
    x = torch.ones(16, 4, device=dev)
    idx = torch.arange(16, device=dev) % 8
    OPS.ema_update_(cb, cs, es, x, idx, 0.5, 1e-5)
    assert ptrs == (cb.data_ptr(), cs.data_ptr(), es.data_ptr())
    assert torch.allclose(cs, torch.full_like(cs, 1.5)) and torch.allclose(es, torch.ones_like(es))
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.ema_update_(cb.t().contiguous().t(), cs, es, x, idx, 0.5, 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        OPS.ema_update_(cb.half(), cs, es, x, idx, 0.5, 1e-5)


# ---------------------------------------------------------------------------------- quantize


def _reference_grads(x, cb, idx, beta, codebook_loss, grad_q, grad_loss):
    """Reference closed-form backward (on CPU) with the CUDA run's own indices."""
    gx, gcb = reference.quantize_backward(
        grad_q.cpu(),
        grad_loss.cpu(),
        x.detach().cpu(),
        cb.detach().cpu(),
        idx.cpu(),
        beta,
        codebook_loss,
    )
    return gx, gcb


@cuda
@pytest.mark.parametrize("codebook_loss", [True, False], ids=["cb-loss", "commit-only"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "shape",
    [(0, 5, 3), (1, 1, 1), (257, 130, 33), (3, 4096, 17), (2000, 16, 300)],
    ids=_ids([(0, 5, 3), (1, 1, 1), (257, 130, 33), (3, 4096, 17), (2000, 16, 300)]),
)
def test_quantize_forward_backward(dev, shape, dtype, metric, codebook_loss):
    n, k, d = shape
    beta = 0.25
    x0, cb0 = make_inputs(n, k, d, dtype, seed=7, kind="clustered")
    x = x0.to(dev).requires_grad_(True)
    cb = cb0.to(dev).requires_grad_(codebook_loss)
    q, idx, loss = vqkernels.quantize(x, cb, beta, metric, backend="cuda")
    assert q.dtype == dtype and q.shape == (n, d) and idx.shape == (n,) and loss.shape == ()
    assert loss.dtype == torch.float32
    if dtype == torch.float32:
        check_indices(x0, cb0, idx.cpu(), metric)
    else:
        check_low_precision(x0, cb0, idx.cpu(), None, metric)
    # The value is exactly the chosen codes.
    assert torch.equal(q.detach().cpu(), cb0[idx.cpu()])
    # Loss from the same indices, fp32 (the kernel sums in fp32 per row, fp64 across rows).
    numel = max(n * d, 1)
    s = ((x0.float() - cb0[idx.cpu()].float()) ** 2).sum().double()
    want = beta * s / numel + (s / numel if codebook_loss else 0.0)
    assert abs(float(loss.detach()) - float(want)) <= 1e-5 * abs(float(want)) + 1e-30
    if n == 0:
        assert float(loss.detach()) == 0.0
    # Backward through the registered autograd (quantize_backward kernel).
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, d, generator=g).to(device=dev, dtype=dtype)
    (loss * 3.0 + (q * w).float().sum()).backward()
    gx_ref, gcb_ref = _reference_grads(x0, cb0, idx, beta, codebook_loss, w, torch.tensor(3.0))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(x.grad.cpu(), gx_ref, **tol)
    if codebook_loss:
        torch.testing.assert_close(cb.grad.cpu(), gcb_ref, **tol)
    else:
        assert cb.grad is None


@cuda
def test_quantize_backward_raw(dev):
    n, k, d = 1500, 10, 9  # ~150 rows per code: several chunks per segment
    x, cb = make_inputs(n, k, d, seed=8, device=dev, kind="clustered")
    idx, _ = OPS.nearest_code(x, cb, "l2")
    gq = torch.randn(n, d, device=dev)
    gl = torch.tensor(0.7, device=dev)
    gx, gcb = OPS.quantize_backward(gq, gl, x, cb, idx, 0.4, True)
    gx_ref, gcb_ref = _reference_grads(x, cb, idx, 0.4, True, gq, gl)
    # grad_x: the same fp32 operations elementwise as the reference.
    torch.testing.assert_close(gx.cpu(), gx_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gcb.cpu(), gcb_ref, rtol=1e-5, atol=1e-7)
    gx2, gcb2 = OPS.quantize_backward(gq, gl, x, cb, idx, 0.4, False)
    assert torch.equal(gx2, gx) and gcb2.shape == (0,) and gcb2.dtype == cb.dtype


# ------------------------------------------------------------------------------- determinism


@cuda
def test_bitwise_reproducible(dev):
    n, k, d = 20000, 512, 64
    x, cb = make_inputs(n, k, d, seed=12, device=dev)
    runs = [OPS.nearest_code(x, cb, "l2") for _ in range(3)]
    assert all(torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1]) for r in runs)
    idx = _indices(n, k, "collapsed").to(dev)
    stats = [OPS.cluster_stats(x, idx, k) for _ in range(3)]
    assert all(torch.equal(s[1], stats[0][1]) and torch.equal(s[0], stats[0][0]) for s in stats)
    states = []
    for _ in range(3):
        st = (cb.clone(), torch.ones(k, device=dev), cb.clone())
        OPS.ema_update_(*st, x, idx, 0.99, 1e-5)
        states.append(st)
    assert all(all(torch.equal(a, b) for a, b in zip(s, states[0])) for s in states)
    outs = []
    for _ in range(3):
        xx = x.clone().requires_grad_(True)
        cc = cb.clone().requires_grad_(True)
        q, _, loss = OPS.quantize(xx, cc, 0.25, "l2", True)
        (loss + q.sum()).backward()
        outs.append((loss.detach(), xx.grad, cc.grad))
    assert all(all(torch.equal(a, b) for a, b in zip(o, outs[0])) for o in outs)


# ----------------------------------------------------------------------------------- opcheck


@cuda
def test_opcheck(dev):
    x, cb = make_inputs(37, 16, 5, seed=13, device=dev, kind="clustered")
    idx = _indices(37, 16, "masked").to(dev)
    for metric in ("l2", "cosine"):
        torch.library.opcheck(OPS.nearest_code.default, (x, cb, metric))
    torch.library.opcheck(OPS.cluster_stats.default, (x, idx, 16))
    state = (cb.clone(), torch.ones(16, device=dev), cb.clone())
    torch.library.opcheck(OPS.ema_update_.default, (*state, x, idx, 0.9, 1e-5))
    for cb_loss in (True, False):
        xr = x.clone().requires_grad_(True)
        cr = cb.clone().requires_grad_(cb_loss)
        torch.library.opcheck(OPS.quantize.default, (xr, cr, 0.25, "l2", cb_loss))
    qidx, _ = OPS.nearest_code(x, cb, "l2")
    gq = torch.randn_like(x)
    gl = torch.tensor(1.5, device=dev)
    for cb_loss in (True, False):
        torch.library.opcheck(OPS.quantize_backward.default, (gq, gl, x, cb, qidx, 0.25, cb_loss))


@cuda
def test_binding_errors(dev):
    x, cb = make_inputs(4, 3, 2, seed=0, device=dev)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        OPS.nearest_code(x, cb.cpu(), "l2")
    with pytest.raises(RuntimeError, match="same dtype"):
        OPS.nearest_code(x, cb.half(), "l2")
    with pytest.raises(RuntimeError, match="metric"):
        OPS.nearest_code(x, cb, "l1")
    with pytest.raises(RuntimeError, match="D="):
        OPS.quantize(x, cb[:, :1], 0.25, "l2", False)
    with pytest.raises(RuntimeError, match="one entry per row"):
        OPS.cluster_stats(x, torch.zeros(3, dtype=torch.int64, device=dev), 3)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        OPS.nearest_code(x.double(), cb.double(), "l2")


# -------------------------------------------- the kernels on a host emulator (no GPU needed)
#
# csrc/cuda/host_emulation.h runs the CUDA kernels' own code on CPU threads (one OS thread per
# CUDA thread, real barriers and warp shuffles; see its header).  The launchers are driven
# through ctypes on CPU tensors and compared with the reference, so the index arithmetic, tiling,
# K-split merging, workspace carving, sort + segmented sums and rounding steps are exercised in
# CI, where nothing CUDA can run.  The emulator is slow: the shapes stay small.

_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_VP, _I64, _INT, _SZ, _DBL = (
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int,
    ctypes.c_size_t,
    ctypes.c_double,
)
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_METRIC = {"l2": 0, "cosine": 1}


def _cuda_include() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return str(Path(home) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(nvcc).resolve().parents[2] / "include"
        if (inc / "cuda_fp16.h").exists():
            return str(inc)
    return None


def _emulator_sources(out: Path) -> list[str]:
    """Each csrc/cuda/*.cu rewritten for the host emulator into ``out/<name>.cpp``: launches
    become ``vqk_emu::launch`` calls, the CUB include goes, the runtime calls it stands in for
    are renamed.  ``#line`` keeps compiler and sanitizer reports pointing at the .cu file."""
    srcs = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text = cu.read_text().replace("#include <cub/device/device_radix_sort.cuh>", "")
        text = _LAUNCH.sub(lambda m: f"vqk_emu::launch({m.group(2)}, {m.group(1)}, ", text)
        assert "<<<" not in text, f"unconverted launch in {cu.name}"
        text = text.replace("cudaGetLastError()", "vqk_emu::get_last_error()")
        text = text.replace("cudaMemsetAsync(", "vqk_emu::memset_async(")
        dst = out / f"{cu.stem}.cpp"
        dst.write_text(f'#include "host_emulation.h"\n#line 1 "{cu}"\n{text}')
        srcs.append(str(dst))
    return srcs


def _emulator_toolchain() -> tuple[str, str]:
    """``(g++, CUDA include dir)`` for building the host emulator, or skip."""
    inc = _cuda_include()
    cxx = shutil.which("g++")
    if inc is None or cxx is None:
        pytest.skip("host emulation needs the CUDA headers (cuda_fp16.h) and g++")
    return cxx, inc


def _emulator_build(out: Path, *flags: str, extra_sources: tuple[str, ...] = ()) -> None:
    """Compile the emulator-translated kernels (plus ``extra_sources``) into ``out``, or skip.

    C++20 for <barrier>; -ffp-contract=off so that each of the kernels' _rn intrinsics stays a
    separately rounded host operation (no contraction into an FMA)."""
    cxx, inc = _emulator_toolchain()
    srcs = _emulator_sources(out.parent)
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-w", *flags,
           f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{ROOT / 'csrc'}", f"-I{inc}", *srcs, *extra_sources,
           "-o", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "barrier: No such file" in res.stderr:
        pytest.skip("host emulation needs a C++20 standard library with <barrier> (GCC >= 11)")
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The CUDA launchers compiled for the host emulator (ctypes library), or skip."""
    lib_path = tmp_path_factory.mktemp("cuda_emu") / "libvq_emu.so"
    # e.g. VQKERNELS_EMU_CFLAGS="-fsanitize=address" (with LD_PRELOAD=libasan.so) for bounds checks
    _emulator_build(
        lib_path, "-fPIC", "-shared", *os.environ.get("VQKERNELS_EMU_CFLAGS", "").split()
    )
    lib = ctypes.CDLL(str(lib_path))
    sigs = {
        "vq_nearest_code_workspace_bytes": (_SZ, [_I64, _I64, _INT]),
        "vq_nearest_code": (_INT, [_VP, _I64, _VP, _I64, _I64, _I64, _I64, _INT, _INT, _INT,
                                   _VP, _VP, _VP, _VP]),
        "vq_cluster_stats_workspace_bytes": (_SZ, [_I64, _I64, _I64]),
        "vq_cluster_stats": (_INT, [_VP, _I64, _VP, _I64, _I64, _I64, _INT, _VP, _VP, _VP, _VP]),
        "vq_ema_update_workspace_bytes": (_SZ, [_I64, _I64, _I64]),
        "vq_ema_update": (_INT, [_VP, _VP, _VP, _VP, _I64, _VP, _I64, _I64, _I64, _INT, _DBL,
                                 _DBL, _VP, _VP]),
        "vq_quantize_workspace_bytes": (_SZ, [_I64, _I64, _INT]),
        "vq_quantize": (_INT, [_VP, _I64, _VP, _I64, _I64, _I64, _I64, _INT, _INT, _DBL,
                               ctypes.c_bool, _INT, _VP, _VP, _VP, _VP, _VP]),
        "vq_quantize_backward_workspace_bytes": (_SZ, [_I64, _I64, _I64, ctypes.c_bool]),
        "vq_quantize_backward": (_INT, [_VP, _I64, _VP, _VP, _I64, _VP, _I64, _VP, _I64, _I64,
                                        _I64, _INT, _DBL, ctypes.c_bool, _VP, _VP, _VP, _VP]),
        "vq_nearest_code_sample": (_INT, [_VP, _I64, _VP, _I64, _I64, _I64, _I64, _INT, _INT,
                                          _DBL, ctypes.c_uint64, _I64, _I64, _VP, _VP, _VP]),
        "vq_quantize_backward_rotation": (_INT, [_VP, _I64, _VP, _VP, _I64, _VP, _I64, _VP, _I64,
                                                 _I64, _I64, _INT, _DBL, ctypes.c_bool, _VP, _VP,
                                                 _VP, _VP]),
    }  # fmt: skip
    for name, (res_t, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res_t, args
    return lib


def _p(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _ws(nbytes: int) -> torch.Tensor:
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8)


def _emu_nearest(lib, x, cb, metric, sms):
    n, d = x.shape
    k = cb.shape[0]
    idx = torch.empty(n, dtype=torch.int64)
    dist = torch.empty(n, dtype=torch.float32)
    ws = _ws(lib.vq_nearest_code_workspace_bytes(n, k, sms))
    err = lib.vq_nearest_code(_p(x), x.stride(0), _p(cb), cb.stride(0), n, k, d, _DT[x.dtype],
                              _METRIC[metric], sms, _p(ws), _p(idx), _p(dist), None)  # fmt: skip
    assert err == 0, f"launcher returned CUDA error {err}"
    return idx, dist


def _emu_quantize(lib, x, cb, beta, metric, cb_loss, sms):
    n, d = x.shape
    k = cb.shape[0]
    q = torch.empty(n, d, dtype=x.dtype)
    idx = torch.empty(n, dtype=torch.int64)
    loss = torch.empty((), dtype=torch.float32)
    ws = _ws(lib.vq_quantize_workspace_bytes(n, k, sms))
    err = lib.vq_quantize(_p(x), x.stride(0), _p(cb), cb.stride(0), n, k, d, _DT[x.dtype],
                          _METRIC[metric], beta, cb_loss, sms, _p(ws), _p(q), _p(idx), _p(loss),
                          None)  # fmt: skip
    assert err == 0, f"launcher returned CUDA error {err}"
    return q, idx, loss


def _emu_backward(lib, gq, gl, x, cb, idx, beta, cb_loss, rotation=False):
    n, d = x.shape
    k = cb.shape[0]
    gx = torch.empty(n, d, dtype=x.dtype)
    gcb = torch.empty(k, d, dtype=cb.dtype) if cb_loss else None
    ws = _ws(lib.vq_quantize_backward_workspace_bytes(n, k, d, cb_loss))
    launcher = lib.vq_quantize_backward_rotation if rotation else lib.vq_quantize_backward
    err = launcher(_p(gq), gq.stride(0), _p(gl), _p(x), x.stride(0), _p(cb),
                                   cb.stride(0), _p(idx), n, k, d, _DT[x.dtype], beta, cb_loss,
                                   _p(ws), _p(gx), _p(gcb), None)  # fmt: skip
    assert err == 0, f"launcher returned CUDA error {err}"
    return gx, gcb


EMU_SHAPES = [(1, 1, 1), (7, 1, 13), (37, 16, 3), (2, 300, 16), (130, 129, 35)]


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=_ids(EMU_SHAPES))
def test_emulated_nearest_code(emu, shape):
    n, k, d = shape
    x, cb = make_inputs(n, k, d, seed=n + k + d)
    for metric in ("l2", "cosine"):
        # 1 SM: no K-split; 132 SMs: K split in 128-code slices.  Same bits either way.
        idx, dist = _emu_nearest(emu, x, cb, metric, sms=1)
        idx_s, dist_s = _emu_nearest(emu, x, cb, metric, sms=132)
        assert torch.equal(idx, idx_s) and torch.equal(dist, dist_s)
        check_indices(x, cb, idx, metric)
        check_distances(x, cb, idx, dist, metric)
    xb, cbb = x.to(torch.bfloat16), cb.to(torch.bfloat16)
    idx, dist = _emu_nearest(emu, xb, cbb, "l2", sms=132)
    check_low_precision(xb, cbb, idx, dist, "l2")


def test_emulated_ties_and_strides(emu):
    k, d = 300, 19
    x, cb = make_inputs(3, k, d, kind="integer", seed=3)
    cb[290] = cb[7]
    cb[200:230] = cb[100:130]
    x[0], x[1] = cb[7], cb[120]
    idx, dist = _emu_nearest(emu, x, cb, "l2", sms=132)  # codes 7 and 290: different splits
    want, want_dist = reference.nearest_code(x, cb, "l2")
    assert torch.equal(idx, want) and torch.equal(dist, want_dist)
    assert idx[:2].tolist() == [7, 120]
    xs, cbs = noncontiguous(x, "row-strided"), noncontiguous(cb, "row-strided")
    idx_s, dist_s = _emu_nearest(emu, xs, cbs, "l2", sms=132)
    assert torch.equal(idx_s, idx) and torch.equal(dist_s, dist)


def test_emulated_nan_rules(emu):
    # Unchecked behaviour documented in vqkernels/functional/__init__.py: a NaN row gets a valid index and a NaN
    # distance; a code containing NaN is never chosen (every comparison with NaN is false).
    x, cb = make_inputs(20, 9, 4, seed=14)
    x[5, 2] = float("nan")
    cb[3, 1] = float("nan")
    for metric in ("l2", "cosine"):
        idx, dist = _emu_nearest(emu, x, cb, metric, sms=132)
        assert 0 <= int(idx[5]) < 9 and torch.isnan(dist[5])
        keep_rows = torch.arange(20) != 5
        keep_codes = torch.arange(9) != 3
        want, _ = reference.nearest_code(x[keep_rows], cb[keep_codes], metric)
        assert torch.equal(idx[keep_rows], keep_codes.nonzero().squeeze(1)[want])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_emulated_cluster_stats_and_ema(emu, dtype):
    k, d = 9, 40
    for n, kind in ((0, "uniform"), (300, "collapsed"), (200, "blocks"), (150, "masked")):
        x, _ = make_inputs(n, 1, d, dtype, seed=n)
        idx = _indices(n, k, kind, seed=n)
        counts = torch.empty(k)
        sums = torch.empty(k, d)
        ws = _ws(emu.vq_cluster_stats_workspace_bytes(n, k, d))
        err = emu.vq_cluster_stats(_p(x), x.stride(0), _p(idx), n, k, d, _DT[dtype], _p(ws),
                                   _p(counts), _p(sums), None)  # fmt: skip
        assert err == 0
        check_cluster_stats(x, idx, k, counts, sums)
        g = torch.Generator().manual_seed(n)
        cs0 = torch.rand(k, generator=g) + 0.5
        es0 = torch.randn(k, d, generator=g)
        ref = (torch.zeros(k, d), cs0.clone(), es0.clone())
        got = (torch.zeros(k, d), cs0.clone(), es0.clone())
        reference.ema_update_(*ref, x, idx, 0.9, 1e-5)
        ws = _ws(emu.vq_ema_update_workspace_bytes(n, k, d))
        err = emu.vq_ema_update(_p(got[0]), _p(got[1]), _p(got[2]), _p(x), x.stride(0), _p(idx),
                                n, k, d, _DT[dtype], 0.9, 1e-5, _p(ws), None)  # fmt: skip
        assert err == 0
        tol = EmaTolerance(k, d, 1e-5)
        tol.step(x, idx, 0.9, ref[2])
        tol.check(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_quantize(emu, dtype):
    n, k, d, beta = 150, 6, 20, 0.3  # ~25 rows per code; 3 chunks of 64 sorted rows
    x, cb = make_inputs(n, k, d, dtype, seed=21, kind="clustered")
    for cb_loss in (True, False):
        q, idx, loss = _emu_quantize(emu, x, cb, beta, "l2", cb_loss, sms=132)
        rq, ridx, rloss = reference.quantize(x, cb, beta, "l2", cb_loss)
        assert torch.equal(idx, ridx) and torch.equal(q, rq)
        torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=0)
    _, _, loss0 = _emu_quantize(emu, x[:0], cb, beta, "l2", True, sms=132)
    assert float(loss0) == 0.0
    gq = torch.randn(n, d).to(dtype)
    gl = torch.tensor(1.7)
    for cb_loss in (True, False):
        gx, gcb = _emu_backward(emu, gq, gl, x, cb, idx, beta, cb_loss)
        rgx, rgcb = reference.quantize_backward(gq, gl, x, cb, idx, beta, cb_loss)
        assert torch.equal(gx, rgx)  # the same fp32 operations elementwise
        if cb_loss:
            torch.testing.assert_close(gcb, rgcb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (40, 37, 5), (9, 70, 33)], ids=_ids([(1, 1, 1), (40, 37, 5), (9, 70, 33)]))
def test_emulated_sampling(emu, shape, metric):
    """Gumbel-max sampling (sampling.cu) against the reference's draws with the same seed: equal
    except where two perturbed scores are within float rounding (none expected at these sizes)."""
    n, k, d = shape
    x, cb = make_inputs(n, k, d, seed=k, kind="gaussian")
    for temp, seed in ((0.5, 3), (5.0, 2**40 + 1)):
        idx = torch.empty(n, dtype=torch.int64)
        dist = torch.empty(n, dtype=torch.float32)
        err = emu.vq_nearest_code_sample(_p(x), x.stride(0), _p(cb), cb.stride(0), n, k, d,
                                         _DT[x.dtype], _METRIC[metric], temp, seed, 0, 1,
                                         _p(idx), _p(dist), None)  # fmt: skip
        assert err == 0
        ridx, rdist = reference.nearest_code(x, cb, metric, sample_temperature=temp, seed=seed)
        assert int((idx != ridx).sum()) <= max(1, n // 50)
        same = idx == ridx
        torch.testing.assert_close(dist[same], rdist[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 5, 3), (70, 9, 45)], ids=_ids([(1, 1, 1), (37, 5, 3), (70, 9, 45)]))
def test_emulated_rotation_backward(emu, shape, dtype):
    """estimator="rotation": the warp-per-row kernel against the reference (LR's rotate_to
    gradient, itself tested against LR in tests/ops/test_rotation.py); a zero row included."""
    n, k, d = shape
    x, cb = make_inputs(n, k, d, dtype, seed=n + d, kind="clustered", noise=0.4)
    x[0] = 0
    idx, _ = reference.nearest_code(x, cb)
    gq = torch.randn(n, d).to(dtype)
    gl = torch.tensor(0.9)
    for cb_loss in (True, False):
        gx, gcb = _emu_backward(emu, gq, gl, x, cb, idx, 0.25, cb_loss, rotation=True)
        rgx, rgcb = reference.quantize_backward(gq, gl, x, cb, idx, 0.25, cb_loss, "rotation")
        tol = 1e-5 if dtype == torch.float32 else 2.0**-7
        scale = float(rgx.float().abs().max())
        assert float((gx.float() - rgx.float()).abs().max()) <= tol * scale
        if cb_loss:
            torch.testing.assert_close(gcb, rgcb, rtol=1e-5, atol=1e-7)


# The host emulator runs each block's threads as OS threads, so ThreadSanitizer sees what
# compute-sanitizer's racecheck would on a GPU: two threads of a block touching the same shared or
# global location with no __syncthreads (or shuffle) between them.  tests/backends/emu_race_driver.cpp
# calls every launcher on shapes that take every tile, split and segment path.  Measured: ~40 s
# (2 cores); deleting the __syncthreads that ends a search step in search.cu makes it report the
# race at the shared-tile read.


def _tsan_works(cxx: str, tmp: Path) -> bool:
    src = tmp / "probe.cpp"
    src.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); }\n")
    exe = tmp / "probe"
    built = subprocess.run([cxx, "-fsanitize=thread", "-pthread", str(src), "-o", str(exe)],
                           capture_output=True, timeout=120)  # fmt: skip
    return built.returncode == 0 and subprocess.run([str(exe)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_emulated_kernels_have_no_data_races(tmp_path):
    cxx, _ = _emulator_toolchain()
    if not _tsan_works(cxx, tmp_path):
        pytest.skip("g++ -fsanitize=thread does not build or run here (no libtsan)")
    exe = tmp_path / "emu_race_driver"
    _emulator_build(exe, "-g", "-fsanitize=thread",
                    extra_sources=(str(ROOT / "tests" / "backends" / "emu_race_driver.cpp"),))  # fmt: skip
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66 history_size=4")
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900, env=env)
    report = res.stdout[-3000:] + res.stderr[:6000]
    assert "ThreadSanitizer" not in res.stderr, report
    assert res.returncode == 0 and "done, 0 failure(s)" in res.stdout, report


# ----------------------------------------------------------------- nvcc compile (no GPU needed)

SCRIPT = ROOT / ".ci" / "compile_cuda.sh"


def test_compile_script_skips_cleanly_without_nvcc(tmp_path):
    # A PATH holding only `dirname` (the script's first external command): no nvcc to find.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "dirname").symlink_to(shutil.which("dirname"))
    env = {k: v for k, v in os.environ.items() if k not in ("NVCC", "CUDA_HOME")}
    env["PATH"] = str(bindir)
    res = subprocess.run(
        [shutil.which("bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SKIP: nvcc not found" in res.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.skipif(
    os.environ.get("VQKERNELS_TEST_NVCC") != "1",
    reason="CI runs .ci/compile_cuda.sh directly (scripts/test.sh); set VQKERNELS_TEST_NVCC=1",
)
def test_compile_script_compiles_every_cu():
    res = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        assert f"ok   csrc/cuda/{cu.name}" in res.stdout, res.stdout
    assert "IEEE fp32 (no .ftz / .approx ops)" in res.stdout, res.stdout


def test_cuda_extension_is_built_with_ieee_fp32():
    """setup.py's nvcc flags keep IEEE fp32: --use_fast_math (or -ftz/-prec-*/-fmad flags) would
    flush subnormals in every fp32 op, the _rn intrinsics included, and the GPU would no longer
    compute what the reference and the host emulator compute.  (.ci/compile_cuda.sh checks the
    PTX of its own build for .ftz/.approx ops; this keeps the extension's flags in line.)"""
    text = (ROOT / "setup.py").read_text()
    m = re.search(r"nvcc_flags\s*=\s*\[([^\]]*)\]", text)
    assert m, "setup.py: nvcc_flags = [...] not found"
    flags = re.findall(r'"([^"]*)"', m.group(1))
    assert "-O3" in flags, flags
    bad = [f for f in flags if re.match(r"-?-(use_fast_math|ftz|prec-div|prec-sqrt|fmad)", f)]
    assert not bad, f"setup.py builds the CUDA extension with non-IEEE fp32 flags: {bad}"
