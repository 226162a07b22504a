"""Tolerance policy and sample inputs shared by the tests and the benchmarks (DESIGN.md §3, §5).

Everything a backend is held to is written here once, so that the tests, the property tests and
the benchmarks' correctness checks apply the same rules:

* **fp32 index rule.**  A backend's indices equal ``reference.nearest_code``'s, except on rows
  where the *exact* (float64) gap between the best and the second-best code is below the
  tolerance :func:`index_tolerance`; on those rows (counted, see :class:`IndexReport`) the chosen
  code's exact distance must be within that tolerance of the optimum.  Distances are compared to
  the exact (float64) distance of the chosen code with the same tolerance.
* **bf16/fp16 rule** (the flash-attention rule).  The error of a backend run on low-precision
  inputs is at most twice the error of the reference *run at that precision*
  (``compute_dtype=x.dtype``) plus a small absolute floor (:data:`LOWP_FLOOR`).  For indices the
  error is the mean excess distance over the exact optimum, for distances the largest absolute
  deviation from the exact distance of the chosen code.
* **cluster statistics / EMA state.**  Counts are exact (small integers in fp32).  Sums may be
  accumulated in any order in fp32: each element is within a forward-error bound
  (:func:`sums_tolerance`) of the fp64-accumulated reference.  :class:`EmaTolerance` carries that
  bound through the EMA blend step by step.

Sample inputs (:func:`make_inputs`) are generated on the CPU with a seeded ``torch.Generator`` (the
same values on every machine and device) and then cast and moved; :func:`noncontiguous` and
:func:`channels_last_x` give the same values with unusual strides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import reference

__all__ = [
    "LargestAtenOutput",
    "U32",
    "LOWP_FLOOR",
    "CORE_SHAPES",
    "BENCH_SHAPES",
    "case_id",
    "dtype_name",
    "make_inputs",
    "noncontiguous",
    "channels_last_x",
    "exact_distances",
    "index_tolerance",
    "IndexReport",
    "check_indices",
    "check_distances",
    "mean_excess",
    "check_low_precision",
    "sums_tolerance",
    "check_cluster_stats",
    "EmaTolerance",
    "assert_bitwise_equal",
]

#: Unit roundoff of fp32 (round to nearest): every fp32 operation has relative error <= U32.
U32 = 2.0**-24
#: Unit roundoff of the inputs of a tf32 tensor-core product (``precision="fast"``).
U_TF32 = 2.0**-11
#: Absolute floor of the bf16/fp16 rule, in units of (squared) distance for sample inputs of unit
#: scale: a backend that accumulates in fp32 has errors orders of magnitude below it, and it keeps
#: the rule meaningful where the low-precision reference happens to make no error at all (K = 1).
LOWP_FLOOR = 1e-3

#: (N, K, D) shapes every backend is tested on: D not a power of two, N not a multiple of any
#: block size, K = 1, K > N, N = 0, D = 1, a large K with a tiny D (the "direct kernel" regime),
#: a few rows against many codes (kernels split the codes then) and a GEMM-sized case.
CORE_SHAPES: tuple[tuple[int, int, int], ...] = (
    (0, 5, 3),
    (1, 1, 1),
    (7, 1, 13),
    (5, 33, 7),
    (37, 16, 3),
    (100, 65, 17),
    (257, 130, 33),
    (300, 2049, 5),
    (3, 4099, 20),
    (513, 1025, 129),
    (1000, 512, 64),
)

#: The (N, D, K) shapes of the issue's performance targets (note the order: N, D, K).
BENCH_SHAPES: tuple[tuple[int, int, int], ...] = (
    (32768, 64, 512),
    (4096, 256, 1024),
    (16384, 8, 16384),
    (16384, 256, 16384),
    (65536, 16, 256),
)

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a float dtype: ``fp32``, ``bf16``, ``fp16``."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def case_id(n: int, k: int, d: int, dtype: torch.dtype = torch.float32) -> str:
    """Readable test id ``N{N}-K{K}-D{D}-{dtype}``."""
    return f"N{n}-K{k}-D{d}-{dtype_name(dtype)}"


# ------------------------------------------------------------------------------ sample inputs


def make_inputs(
    n: int,
    k: int,
    d: int,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    kind: str = "gaussian",
    noise: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded sample inputs ``x: [N, D]`` and ``codebook: [K, D]`` (both ``dtype``, on ``device``).

    ``kind``:

    * ``"gaussian"``: independent standard normal x and codes (with large K many rows have a
      near tie: the hard case for the index rule);
    * ``"clustered"``: x = a random code + ``noise``·N(0, 1), so each row has a clear winner
      (used where indices must match exactly, e.g. to compare gradients);
    * ``"integer"``: small integers in [-3, 3]: every product and sum is exact in fp32 whatever
      the summation order, so equal codes give bit-identical scores (exact ties).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        codebook = torch.randn(k, d, generator=g)
        x = torch.randn(n, d, generator=g)
    elif kind == "clustered":
        codebook = torch.randn(k, d, generator=g)
        assign = torch.randint(0, k, (n,), generator=g)
        x = codebook[assign] + noise * torch.randn(n, d, generator=g)
    elif kind == "integer":
        codebook = torch.randint(-3, 4, (k, d), generator=g).float()
        x = torch.randint(-3, 4, (n, d), generator=g).float()
    else:
        raise ValueError(f"kind must be 'gaussian', 'clustered' or 'integer', got {kind!r}")
    return x.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)


def noncontiguous(t: torch.Tensor, how: str = "transposed") -> torch.Tensor:
    """A non-contiguous 2-D tensor with the values of ``t: [R, C]``.

    ``how``: ``"transposed"`` (column-major storage, strides ``(1, R)``), ``"row-strided"`` (every
    other row of a twice-as-tall buffer) or ``"col-strided"`` (every other column, unit stride
    broken along D).
    """
    r, c = t.shape
    if how == "transposed":
        out = t.t().contiguous().t()
    elif how == "row-strided":
        buf = torch.full((2 * r, c), float("nan"), dtype=t.dtype, device=t.device)
        buf[::2] = t
        out = buf[::2]
    elif how == "col-strided":
        buf = torch.full((r, 2 * c), float("nan"), dtype=t.dtype, device=t.device)
        buf[:, ::2] = t
        out = buf[:, ::2]
    else:
        raise ValueError(f"how must be 'transposed', 'row-strided' or 'col-strided', got {how!r}")
    assert torch.equal(out, t) or t.numel() == 0
    return out


def channels_last_x(
    b: int, d: int, h: int, w: int, dtype=torch.float32, *, seed: int = 0, device="cpu"
) -> torch.Tensor:
    """A ``[B, H, W, D]`` view of a contiguous ``[B, D, H, W]`` feature map (what a conv encoder
    produces, permuted): the channel dim D has stride ``H·W`` and no flattening view exists."""
    g = torch.Generator().manual_seed(seed)
    fmap = torch.randn(b, d, h, w, generator=g).to(device=device, dtype=dtype)
    return fmap.permute(0, 2, 3, 1)


# -------------------------------------------------------------------------- exact distances


def exact_distances(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Distances ``[N, K] float64`` from the (upcast) input values, the yardstick of the rules.

    L2: squared Euclidean distance (float64 expansion, clamped >= 0; its rounding, ~1e-16
    relative, is far below any fp32 tolerance).  Cosine: ``1 − x̂·ĉ`` with the reference's
    normalization (norms clamped at 1e-12, so a zero row has distance 1 to every code).
    """
    x64 = x.detach().to(torch.float64).reshape(-1, codebook.shape[-1])
    c64 = codebook.detach().to(torch.float64)
    if metric == "l2":
        d = (x64 * x64).sum(1, keepdim=True) - 2.0 * (x64 @ c64.t()) + (c64 * c64).sum(1)
        return d.clamp_min(0.0)
    if metric == "cosine":
        xn = x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cn = c64 / c64.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return 1.0 - xn @ cn.t()
    raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")


def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n·u / (1 − n·u): bound on the relative error of n roundings."""
    return n * u / (1.0 - n * u)


def index_tolerance(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", precision: str = "exact"
) -> torch.Tensor:
    """The stated epsilon of the fp32 index rule, per row: ``[N] float64``, in distance units.

    L2: a backend compares ``s_k = ‖c_k‖² − 2·x·c_k`` in fp32, summing the D products in any
    order (blocked, SIMD, FMA or not).  Each score's error is at most
    ``gamma_{D+2}·(‖c_k‖² + 2·Σ|x_d·c_kd|) <= gamma_{D+2}·(‖x‖² + 2·‖c_k‖²)`` (because
    ``2|ab| <= a² + b²``), and the comparison of two scores can be off by twice that::

        eps_row = 2·(gamma_{D+2} + 2·u_in)·(‖x‖² + 2·max_k ‖c_k‖²)

    where ``u_in`` is the rounding of the product inputs: 0 in ``"exact"`` mode (fp32 products
    of fp32/bf16/fp16 values), ``2^-11`` for tf32 tensor-core products (``"fast"``).  The same
    bound covers the reported distance ``s + ‖x‖²`` (one more rounding, absorbed by D+2).  This is
    a worst-case bound (linear in D); real errors grow like sqrt(D) and are ~100x smaller, so the
    rule never flags a correct fp32 kernel but still flags any wrong choice of code whose
    distance is not within rounding of the optimum.

    Cosine: scores ``x·ĉ`` with ``ĉ`` normalized in fp32 (norm, sqrt, divide: gamma_{D+3});
    ``|x·ĉ|`` is at most ``‖x‖``, so in distance units (divided by ``‖x‖``) each score is off by
    at most ``gamma_{D+3} + gamma_{D}`` plus input rounding, and the comparison by twice that::

        eps_row = 4·(gamma_{D+4} + 2·u_in)
    """
    if precision not in ("exact", "fast"):
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    d = codebook.shape[-1]
    u_in = U_TF32 if precision == "fast" else 0.0
    x64 = x.detach().to(torch.float64).reshape(-1, d)
    c64 = codebook.detach().to(torch.float64)
    if metric == "l2":
        c_sq_max = float((c64 * c64).sum(1).max()) if c64.shape[0] else 0.0
        scale = (x64 * x64).sum(1) + 2.0 * c_sq_max
        return 2.0 * (_gamma(d + 2, U32) + 2.0 * u_in) * scale
    if metric == "cosine":
        eps = 4.0 * (_gamma(d + 4, U32) + 2.0 * u_in)
        return torch.full((x64.shape[0],), eps, dtype=torch.float64, device=x64.device)
    raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")


@dataclass
class IndexReport:
    """What :func:`check_indices` found (all counts over rows).

    ``near_ties``: rows whose exact best/second-best gap is below the tolerance (where a
    different index than the reference's is allowed); ``mismatches``: rows whose index differs
    from the reference's (all of them near ties, or the check failed); ``max_excess``: the largest
    exact excess distance of a chosen code over the optimum.
    """

    rows: int
    near_ties: int
    mismatches: int
    max_excess: float


def _check_index_tensor(indices: torch.Tensor, n: int, k: int) -> torch.Tensor:
    assert isinstance(indices, torch.Tensor), f"indices is a {type(indices).__name__}"
    assert indices.dtype == torch.int64, f"indices must be int64, got {indices.dtype}"
    flat = indices.reshape(-1)
    assert flat.numel() == n, f"expected {n} indices, got shape {tuple(indices.shape)}"
    if n:
        lo, hi = int(flat.min()), int(flat.max())
        assert 0 <= lo and hi < k, f"indices outside [0, {k}): values in [{lo}, {hi}]"
    return flat


def check_indices(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    metric: str = "l2",
    *,
    ref_indices: torch.Tensor | None = None,
    precision: str = "exact",
) -> IndexReport:
    """Assert the fp32 index rule for ``indices: [...] int64`` (one per row of ``x: [..., D]``).

    ``ref_indices`` defaults to ``reference.nearest_code(x, codebook, metric)`` (fp32).  Raises
    ``AssertionError`` listing the offending rows, returns an :class:`IndexReport`.
    """
    k, d = codebook.shape
    x2 = x.detach().reshape(-1, d)
    n = x2.shape[0]
    flat = _check_index_tensor(indices, n, k).cpu()
    if ref_indices is None:
        ref_indices, _ = reference.nearest_code(x2, codebook.detach(), metric)
    ref = ref_indices.reshape(-1).cpu()
    if n == 0:
        return IndexReport(0, 0, 0, 0.0)
    dist = exact_distances(x2, codebook, metric).cpu()
    eps = index_tolerance(x2, codebook, metric, precision).cpu()
    best = dist.min(1).values
    if k > 1:
        gap = dist.topk(2, dim=1, largest=False).values.diff(dim=1).squeeze(1)
    else:
        gap = torch.full_like(best, math.inf)
    near = gap < eps
    excess = dist.gather(1, flat.unsqueeze(1)).squeeze(1) - best
    mismatch = flat != ref
    bad = mismatch & ~(near & (excess <= eps))
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)[:8].tolist()
        details = "; ".join(
            f"row {r}: got {int(flat[r])} (excess {float(excess[r]):.3g}), reference "
            f"{int(ref[r])}, exact gap {float(gap[r]):.3g}, eps {float(eps[r]):.3g}"
            for r in rows
        )
        raise AssertionError(
            f"{int(bad.sum())}/{n} indices differ from the reference outside the near-tie "
            f"tolerance ({metric}, {precision}): {details}"
        )
    return IndexReport(n, int(near.sum()), int(mismatch.sum()), float(excess.max()))


def check_distances(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    distance: torch.Tensor,
    metric: str = "l2",
    *,
    precision: str = "exact",
) -> float:
    """Assert ``distance: [...] float32`` is within :func:`index_tolerance` of the exact distance
    of the chosen codes (and >= 0 for L2); returns the largest deviation."""
    k, d = codebook.shape
    x2 = x.detach().reshape(-1, d)
    n = x2.shape[0]
    assert distance.dtype == torch.float32, f"distance must be float32, got {distance.dtype}"
    assert distance.shape == indices.shape, (
        f"distance shape {tuple(distance.shape)} != indices shape {tuple(indices.shape)}"
    )
    if n == 0:
        return 0.0
    flat = _check_index_tensor(indices, n, k).cpu()
    dist = distance.detach().reshape(-1).cpu().to(torch.float64)
    assert bool(torch.isfinite(dist).all()), "distance contains NaN/Inf for finite inputs"
    if metric == "l2":
        assert bool((dist >= 0).all()), f"negative L2 distance {float(dist.min())}"
    want = exact_distances(x2, codebook, metric).cpu().gather(1, flat.unsqueeze(1)).squeeze(1)
    eps = index_tolerance(x2, codebook, metric, precision).cpu()
    dev = (dist - want).abs()
    bad = dev > eps
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())}/{n} distances off by more than the tolerance: row {r} got "
            f"{float(dist[r]):.9g}, exact {float(want[r]):.9g}, eps {float(eps[r]):.3g}"
        )
    return float(dev.max())


def mean_excess(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric="l2"):
    """Index error of the bf16/fp16 rule: mean over rows of the exact distance of the chosen code
    minus the exact optimum (float; 0 for N = 0)."""
    d = codebook.shape[-1]
    x2 = x.detach().reshape(-1, d)
    if x2.shape[0] == 0:
        return 0.0
    dist = exact_distances(x2, codebook, metric).cpu()
    flat = indices.reshape(-1).cpu()
    chosen = dist.gather(1, flat.unsqueeze(1)).squeeze(1)
    return float((chosen - dist.min(1).values).mean())


def check_low_precision(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    distance: torch.Tensor | None = None,
    metric: str = "l2",
    *,
    floor: float = LOWP_FLOOR,
) -> dict[str, float]:
    """Assert the bf16/fp16 rule for a backend's ``indices`` (and ``distance``) on low-precision
    ``x``/``codebook``: error <= 2 x (error of the reference run at ``x.dtype``) + ``floor``.

    Returns the four errors (``index``, ``index_ref``, ``distance``, ``distance_ref``).
    """
    k, d = codebook.shape
    x2 = x.detach().reshape(-1, d)
    flat = _check_index_tensor(indices, x2.shape[0], k)
    ref_idx, ref_dist = reference.nearest_code(x2, codebook.detach(), metric, compute_dtype=x.dtype)
    out = {
        "index": mean_excess(x2, codebook, flat, metric),
        "index_ref": mean_excess(x2, codebook, ref_idx, metric),
    }
    assert out["index"] <= 2.0 * out["index_ref"] + floor, (
        f"low-precision ({dtype_name(x.dtype)}) index error {out['index']:.4g} exceeds 2 x the "
        f"reference's own error {out['index_ref']:.4g} + floor {floor}"
    )
    if distance is not None and x2.shape[0]:
        assert distance.dtype == torch.float32, f"distance must be float32, got {distance.dtype}"
        exact = exact_distances(x2, codebook, metric).cpu()

        def dev(idx, dst):
            want = exact.gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
            return float((dst.reshape(-1).cpu().double() - want).abs().max())

        out["distance"] = dev(flat, distance)
        out["distance_ref"] = dev(ref_idx, ref_dist)
        assert out["distance"] <= 2.0 * out["distance_ref"] + floor, (
            f"low-precision ({dtype_name(x.dtype)}) distance error {out['distance']:.4g} "
            f"exceeds 2 x the reference's own error {out['distance_ref']:.4g} + floor {floor}"
        )
    return out


# -------------------------------------------------------------------- cluster stats and EMA


def sums_tolerance(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Per-element bound ``[K, D] float64`` on |fp32 sums − reference sums| for ``cluster_stats``.

    Summing the n_k rows of code k in fp32 in any order has error at most
    ``gamma_{n_k}·Σ_i |x_id|``; the reference (fp64 accumulation, one final rounding) adds
    ``U32·|sum|``.  Doubled for slack, plus one ulp of the absolute sum.
    """
    d = x.shape[-1]
    x2 = x.detach().reshape(-1, d).to(torch.float64)
    idx = indices.reshape(-1).to(x2.device)
    keep = idx >= 0
    abs_sums = torch.zeros(num_codes, d, dtype=torch.float64, device=x2.device)
    abs_sums.index_add_(0, idx[keep], x2[keep].abs())
    counts = torch.zeros(num_codes, dtype=torch.float64, device=x2.device)
    counts.index_add_(0, idx[keep], torch.ones_like(idx[keep], dtype=torch.float64))
    gamma = (counts + 1.0) * U32 / (1.0 - (counts + 1.0) * U32)
    return (2.0 * gamma.unsqueeze(1) + 2.0 * U32) * abs_sums


def check_cluster_stats(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    counts: torch.Tensor,
    sums: torch.Tensor,
) -> None:
    """Assert a backend's ``counts: [K] f32`` (exact) and ``sums: [K, D] f32`` (within
    :func:`sums_tolerance`) against ``reference.cluster_stats``."""
    d = x.shape[-1]
    x2 = x.detach().reshape(-1, d)
    idx = indices.reshape(-1)
    want_counts, want_sums = reference.cluster_stats(x2, idx, num_codes)
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32, (
        f"counts/sums must be float32, got {counts.dtype}/{sums.dtype}"
    )
    assert tuple(counts.shape) == (num_codes,), f"counts shape {tuple(counts.shape)}"
    assert tuple(sums.shape) == (num_codes, d), f"sums shape {tuple(sums.shape)}"
    assert torch.equal(counts.cpu(), want_counts.cpu()), (
        f"counts differ: max |diff| {float((counts.cpu() - want_counts.cpu()).abs().max())}"
    )
    tol = sums_tolerance(x2, idx, num_codes).cpu()
    dev = (sums.cpu().double() - want_sums.cpu().double()).abs()
    bad = dev > tol
    assert not bool(bad.any()), (
        f"{int(bad.sum())} sums off by more than the fp32 summation bound "
        f"(max excess {float((dev - tol).max()):.3g})"
    )


class EmaTolerance:
    """Carries the error bound of an fp32 EMA state through successive updates.

    After each update, with ``t_S`` the :func:`sums_tolerance` of that step's sums:
    ``tol_embed ← decay·tol_embed + (1 − decay)·t_S + 4·U32·|embed_sum|`` (the blend's own
    roundings); the codebook ``embed_sum / c`` adds the relative error of ``c`` (a sum of K
    cluster sizes in any order: gamma_K, plus a few roundings) and of the division.
    ``cluster_size`` (blended integer counts) is within ``8·U32·|cluster_size|`` (its error
    does not accumulate: each step scales the previous error by ``decay``).
    """

    def __init__(self, num_codes: int, dim: int, eps: float):
        self.k = num_codes
        self.eps = eps
        self.embed = torch.zeros(num_codes, dim, dtype=torch.float64)

    def step(self, x: torch.Tensor, indices: torch.Tensor, decay: float, embed_sum: torch.Tensor):
        """Account for one update (``embed_sum``: the reference state after it)."""
        t_s = sums_tolerance(x, indices, self.k).cpu()
        self.embed = (
            decay * self.embed + (1.0 - decay) * t_s + 4.0 * U32 * embed_sum.cpu().double().abs()
        )

    def check(self, got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
        """Assert ``got == want`` within the bound; both are ``(codebook, cluster_size,
        embed_sum)``."""
        cb, cs, es = (t.detach().cpu().double() for t in got)
        wcb, wcs, wes = (t.detach().cpu().double() for t in want)
        # With n = Σ cluster_size = 0 (an empty EMA: zero sizes and no kept rows, or decay 0
        # and an empty batch) the smoothed sizes are 0 and the reference's codebook is 0/0 =
        # NaN: undefined, so only the sizes and sums are checked then.
        n = wcs.sum()
        checked = (("cluster_size", cs, wcs), ("embed_sum", es, wes))
        if n > 0:
            checked = (("codebook", cb, wcb),) + checked
        for name, g, w in checked:
            assert g.shape == w.shape, f"{name} shape {tuple(g.shape)} != {tuple(w.shape)}"
            assert bool(torch.isfinite(g).all()), f"{name} has NaN/Inf"
        cs_tol = 8.0 * U32 * wcs.abs() + 1e-30
        assert bool(((cs - wcs).abs() <= cs_tol).all()), (
            f"cluster_size off by {float((cs - wcs).abs().max()):.3g}"
        )
        assert bool(((es - wes).abs() <= self.embed + 1e-30).all()), (
            f"embed_sum off by {float((es - wes).abs().max()):.3g} "
            f"(bound {float(self.embed.max()):.3g})"
        )
        if n == 0:
            return
        # The smoothed cluster sizes c_k of the reference state (float64).
        c = ((wcs + self.eps) / (n + self.k * self.eps) * n).unsqueeze(1)
        rel_c = 4.0 * _gamma(self.k + 8, U32)
        cb_tol = self.embed / c + (rel_c + 2.0 * U32) * wcb.abs() + 1e-30
        dev = (cb - wcb).abs()
        assert bool((dev <= cb_tol).all()), (
            f"codebook off by {float(dev.max()):.3g} (max excess {float((dev - cb_tol).max()):.3g})"
        )


def assert_bitwise_equal(a, b, what: str = "tensor") -> None:
    """Assert two tensors (or tuples of tensors) have identical dtype, shape and bits (NaNs
    compare equal when their bit patterns do)."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} outputs"
        for i, (u, v) in enumerate(zip(a, b)):
            assert_bitwise_equal(u, v, f"{what}[{i}]")
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    )
    if a.dtype.is_floating_point:
        view = {torch.float64: torch.int64, torch.float32: torch.int32}.get(a.dtype, torch.int16)
        a, b = a.contiguous().view(view), b.contiguous().view(view)
    assert torch.equal(a.cpu(), b.cpu()), f"{what}: not bitwise identical"


def require_feature(backend, op: str, *features: str) -> None:
    """Skip the running test when ``backend`` (a tests/conftest.py ``Backend``) does not implement
    ``features`` of ``op`` (see ``vqkernels.dispatch.OP_FEATURES``), with the dispatcher's reason:
    coverage grows by itself as kernels land."""
    import pytest

    from . import dispatch

    why = dispatch._op_refusal(backend.name, op, tuple(features))
    if why:
        pytest.skip(why)


class LargestAtenOutput(TorchDispatchMode):
    """While active, records in ``largest`` the element count of the largest tensor any aten op
    produces (forward and backward): how the tests show a layer never materializes an N×K (or
    N×2^d) matrix, whatever its code path."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
