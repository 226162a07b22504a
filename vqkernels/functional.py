"""Public functional API: ``nearest_code``, ``cluster_stats``, ``ema_update_``, ``quantize``.

Each function validates its inputs (shape, dtype, device errors name the argument), flattens any
leading dims (``x: [..., D]`` -> ``[N, D]``), picks a backend (see :mod:`vqkernels.dispatch`) and
restores the leading dims on the way out.

Value checks (NaN/Inf in ``x``/``codebook``, indices outside ``[-1, K)``) cost one pass over the
inputs and, on a GPU, a host sync; they run when ``check_inputs=True`` (the default, overridable
process-wide with ``VQKERNELS_CHECK_INPUTS=0``) and are skipped while ``torch.compile`` traces.
Unchecked behaviour of the raw kernels (documented, not an error): a row of ``x`` containing NaN
gets some valid index and a NaN distance; a code containing NaN is never chosen by the fused
kernels (every comparison with NaN is false) whereas ``torch.argmin`` in the reference would
pick it - hence the check.
"""

from __future__ import annotations

import os

import torch

from . import (
    _ops,  # noqa: F401  (registers the schemas)
    dispatch,
    reference,
)
from .reference.quantize import ESTIMATORS
from .reference.sampling import MAX_SEED

__all__ = [
    "nearest_code",
    "cluster_stats",
    "ema_update_",
    "ema_blend_",
    "quantize",
    "code_distribution",
    "soft_quantize",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_METRICS = ("l2", "cosine")
_PRECISIONS = ("exact", "fast")


# ------------------------------------------------------------------------------------ checks


def _default_check() -> bool:
    return os.environ.get("VQKERNELS_CHECK_INPUTS", "1") not in ("0", "false", "False", "")


def _want_check(check_inputs: bool | None) -> bool:
    if torch.compiler.is_compiling():
        return False
    return _default_check() if check_inputs is None else bool(check_inputs)


def _require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16, got {t.dtype} (shape {tuple(t.shape)})"
        )


def _check_x(x, d_name: str = "x") -> torch.Tensor:
    x = _require_tensor(d_name, x)
    _require_float(d_name, x)
    if x.dim() < 1:
        raise ValueError(f"{d_name} must have shape [..., D] with at least 1 dim, got a 0-d tensor")
    return x


def _check_codebook(codebook, x: torch.Tensor | None, same_dtype: bool) -> torch.Tensor:
    """``codebook: [K, D]`` (x: ``[..., D]``) or multi-head ``[H, K, D]`` (x: ``[..., H, D]``)."""
    codebook = _require_tensor("codebook", codebook)
    _require_float("codebook", codebook)
    if codebook.dim() not in (2, 3):
        raise ValueError(
            f"codebook must have shape [K, D] (or [H, K, D] for one codebook per head), got shape "
            f"{tuple(codebook.shape)}"
        )
    k, d = codebook.shape[-2:]
    if k < 1 or d < 1 or codebook.shape[0] < 1:
        raise ValueError(
            f"codebook must have K >= 1 codes of D >= 1 dims (and H >= 1 heads), got shape "
            f"{tuple(codebook.shape)}"
        )
    if x is not None:
        if x.shape[-1] != d:
            raise ValueError(
                f"x has last dim D={x.shape[-1]} but codebook has D={d} "
                f"(x shape {tuple(x.shape)}, codebook shape {tuple(codebook.shape)})"
            )
        if codebook.dim() == 3:
            h = codebook.shape[0]
            if x.dim() < 2 or x.shape[-2] != h:
                raise ValueError(
                    f"a multi-head codebook [H={h}, K={k}, D={d}] needs x of shape [..., {h}, {d}] "
                    f"(head h is searched in codebook[h]), got x shape {tuple(x.shape)}"
                )
        if x.device != codebook.device:
            raise ValueError(f"x is on {x.device} but codebook is on {codebook.device}")
        if same_dtype and x.dtype != codebook.dtype:
            raise TypeError(
                f"x ({x.dtype}) and codebook ({codebook.dtype}) must have the same dtype; "
                f"cast one of them (e.g. codebook.to(x.dtype))"
            )
    return codebook


def _flatten_heads(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [N, D]`` for one codebook, ``[..., H, D] -> [N, H, D]`` for H heads."""
    if codebook.dim() == 3:
        return x.reshape(-1, x.shape[-2], x.shape[-1])
    return _flatten(x)


def _check_sampling(sample_temperature, generator, seed) -> tuple[float, int]:
    """Validated temperature and the noise seed (drawn from ``generator`` when sampling and no
    explicit seed is given; 0 when not sampling)."""
    if isinstance(sample_temperature, bool) or not isinstance(sample_temperature, (int, float)):
        raise TypeError(f"sample_temperature must be a float >= 0, got {sample_temperature!r}")
    temp = float(sample_temperature)
    if not temp >= 0.0 or temp == float("inf"):
        raise ValueError(f"sample_temperature must be a finite float >= 0, got {sample_temperature!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2^63) or None, got {seed!r}")
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
    if temp == 0.0:
        return 0.0, 0
    if seed is None:
        # One draw per call from the torch generator (the default one when None): the noise of
        # every (row, code) pair is then a pure function of this seed (counter-based, see
        # vqkernels.reference.sampling), identical on every backend and thread count.
        seed = int(torch.randint(0, MAX_SEED, (), generator=generator, dtype=torch.int64))
    return temp, int(seed)


def _check_metric(metric) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric


def _check_precision(precision) -> str:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    return precision


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN/Inf value(s); pass finite values "
            f"(or check_inputs=False for the documented unchecked behaviour)"
        )


def _check_indices(indices, n: int, k: int, device: torch.device, check_values: bool) -> torch.Tensor:
    indices = _require_tensor("indices", indices)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 (or int32), got {indices.dtype}")
    if indices.numel() != n:
        raise ValueError(
            f"indices must have one entry per row of x ({n}), got shape {tuple(indices.shape)}"
        )
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but x is on {device}")
    indices = indices.reshape(n).to(torch.int64)
    if check_values and n:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= k:
            raise ValueError(
                f"indices must lie in [-1, {k}) (-1 = ignored row), got values in [{lo}, {hi}]"
            )
    return indices


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------------- the ops


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    return_distance: bool = False,
    *,
    sample_temperature: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    backend: str = "auto",
    precision: str = "exact",
    check_inputs: bool | None = None,
):
    """Index of the nearest (or a Gumbel-sampled) codebook entry per vector, without an N x K matrix.

    Args:
        x: ``[..., D]`` float32/bfloat16/float16, any strides; ``[..., H, D]`` with a multi-head
            codebook.
        codebook: ``[K, D]``, or ``[H, K, D]`` (one codebook per head: ``x[..., h, :]`` is
            searched in ``codebook[h]``, all heads in one kernel call); same dtype/device as x.
            (A codebook shared by the heads is the plain ``[K, D]`` case.)
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (codes are L2-normalized).
        return_distance: also return the distance to the chosen code.
        sample_temperature: ``0`` (default): the nearest code.  ``τ > 0``: Gumbel-max sampling
            fused into the search (vector-quantize-pytorch's ``stochastic_sample_codes``),
            ``argmax_k(logit_k/τ + g_k)`` with LR's logits: ``−‖x − c_k‖`` (the non-squared
            distance, ``sqrt(max(d², 1e-8))``) for l2, the cosine similarity for cosine.  The
            noise ``g`` is a counter-based hash of ``(seed, row, code)``
            (:mod:`vqkernels.reference.sampling`), so a seed gives the same codes on every
            backend, run and thread count.
        generator: ``torch.Generator`` the seed is drawn from (once per call) when sampling;
            ``None`` = torch's default generator (so ``torch.manual_seed`` reproduces a call).
        seed: an explicit noise seed in ``[0, 2^63)`` instead of a draw from ``generator``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        precision: ``"exact"`` (fp32 products) or ``"fast"`` (tensor-core products with fp32
            accumulation; Triton/CUDA only, the other backends treat it as ``"exact"``).
        check_inputs: validate finiteness (default on; see module docs).

    Returns:
        ``indices: [...] int64`` (``[..., H]`` multi-head; ties -> lowest index), and with
        ``return_distance`` ``distance`` of the same shape, float32 (squared L2 clamped >= 0, or
        ``1 - cosine``, to the chosen code).
    """
    x = _check_x(x)
    codebook = _check_codebook(codebook, x, same_dtype=True)
    _check_metric(metric)
    _check_precision(precision)
    temp, seed_value = _check_sampling(sample_temperature, generator, seed)
    if _want_check(check_inputs):
        _check_finite("x", x)
        _check_finite("codebook", codebook)
    multi_head = codebook.dim() == 3
    lead = x.shape[:-2] + (codebook.shape[0],) if multi_head else x.shape[:-1]
    features = (("heads",) if multi_head else ()) + (("sample",) if temp > 0 else ())
    indices, distance = dispatch.call(
        "nearest_code", backend, x.device, _flatten_heads(x, codebook), codebook, metric, temp,
        seed_value, precision, features=features,
    )  # fmt: skip
    indices = indices.reshape(lead)
    if return_distance:
        return indices, distance.reshape(lead)
    return indices


def cluster_stats(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    *,
    heads: int | None = None,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts and sums of assigned vectors (no one-hot matrix; deterministic).

    Args:
        x: ``[..., D]`` float; ``[..., H, D]`` when ``heads=H``.
        indices: ``[...]`` int64 with ``x.shape[:-1]`` elements, values in ``[-1, num_codes)``;
            ``-1`` marks a row to ignore (padding).  With ``heads``: ``[..., H]``, head h's
            index into its own codebook.
        num_codes: K >= 1 (per head).
        heads: ``None`` (one codebook) or H >= 1: statistics per head, in one kernel call.

    Returns:
        ``counts: [K] float32`` and ``sums: [K, D] float32``; with ``heads``: ``[H, K]`` and
        ``[H, K, D]``.
    """
    x = _check_x(x)
    if not isinstance(num_codes, int) or isinstance(num_codes, bool) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    check = _want_check(check_inputs)
    if heads is None:
        x2 = _flatten(x)
        if check:
            _check_finite("x", x2)
        idx = _check_indices(indices, x2.shape[0], num_codes, x.device, check)
        return dispatch.call("cluster_stats", backend, x.device, x2, idx, num_codes)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1 or None, got {heads!r}")
    if x.dim() < 2 or x.shape[-2] != heads:
        raise ValueError(f"with heads={heads}, x must have shape [..., {heads}, D], got {tuple(x.shape)}")
    x3 = x.reshape(-1, heads, x.shape[-1])
    if check:
        _check_finite("x", x3)
    idx = _check_indices(indices, x3.shape[0] * heads, num_codes, x.device, check)
    return dispatch.call(
        "cluster_stats", backend, x.device, x3, idx.reshape(-1, heads), num_codes,
        features=("heads",),
    )  # fmt: skip


def _check_ema_state(codebook, cluster_size, embed_sum) -> None:
    codebook = _require_tensor("codebook", codebook)
    if codebook.dim() not in (2, 3) or min(codebook.shape) < 1:
        raise ValueError(
            f"codebook must have shape [K, D] (or [H, K, D]) with K, D (H) >= 1, got "
            f"{tuple(codebook.shape)}"
        )
    lead = tuple(codebook.shape[:-1])  # (K,) or (H, K)
    for name, t, shape in (
        ("codebook", codebook, tuple(codebook.shape)),
        ("cluster_size", cluster_size, lead),
        ("embed_sum", embed_sum, tuple(codebook.shape)),
    ):
        _require_tensor(name, t)
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (EMA state stays fp32), got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != codebook.device:
            raise ValueError(f"{name} is on {t.device} but codebook is on {codebook.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} is updated in place and must be contiguous")


def _check_decay_eps(decay, eps) -> tuple[float, float]:
    if not isinstance(decay, (int, float)) or not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must be a float in [0, 1], got {decay!r}")
    if not isinstance(eps, (int, float)) or not float(eps) > 0.0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    return float(decay), float(eps)


def ema_update_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> None:
    """Exponential-moving-average codebook update, in place (returns nothing).

    ``cluster_size ← decay·cluster_size + (1−decay)·counts``;
    ``embed_sum ← decay·embed_sum + (1−decay)·S`` with ``S_k = Σ_{i: idx_i=k} x_i``;
    ``n = Σ cluster_size``; ``c_k = (cluster_size_k + eps)/(n + K·eps)·n`` (Laplace smoothing);
    ``codebook_k = embed_sum_k / c_k``.  Counts and sums are computed without a one-hot matrix and
    deterministically (same bits on every run and thread count).

    Multi-head (one codebook per head, all heads in one kernel call): the same update per head
    with the head's own ``n = Σ_k cluster_size[h, k]``.

    Args:
        codebook: ``[K, D] float32`` (or ``[H, K, D]``), contiguous, written.
        cluster_size: ``[K] float32`` (or ``[H, K]``), contiguous, written.
        embed_sum: ``[K, D] float32`` (or ``[H, K, D]``), contiguous, written.
        x: ``[..., D]`` float (accumulated in fp32); ``[..., H, D]`` multi-head.
        indices: ``[...]`` int64 with ``x.shape[:-1]`` elements in ``[-1, K)``; ``-1`` = ignore.
        decay: in ``[0, 1]``.  eps: ``> 0``.

    Edge case (documented, identical on every backend): when ``n = Σ cluster_size`` is 0 after the
    blend (an all-zero state and no kept rows, or ``decay = 0`` with every row ignored) the
    smoothing is 0/0 and the codebook becomes NaN, as in the usual formulation.  Start
    ``cluster_size`` above 0 (``VectorQuantizer`` starts it at 1) to rule this out.
    """
    _check_ema_state(codebook, cluster_size, embed_sum)
    x = _check_x(x)
    k, d = codebook.shape[-2:]
    if x.shape[-1] != d:
        raise ValueError(f"x has last dim D={x.shape[-1]} but codebook has D={d}")
    if x.device != codebook.device:
        raise ValueError(f"x is on {x.device} but codebook is on {codebook.device}")
    decay, eps = _check_decay_eps(decay, eps)
    multi_head = codebook.dim() == 3
    if multi_head and (x.dim() < 2 or x.shape[-2] != codebook.shape[0]):
        raise ValueError(
            f"a multi-head codebook {list(codebook.shape)} needs x of shape "
            f"[..., {codebook.shape[0]}, {d}], got {tuple(x.shape)}"
        )
    x2 = _flatten_heads(x, codebook)
    check = _want_check(check_inputs)
    if check:
        _check_finite("x", x2)
    idx = _check_indices(indices, x2.shape[:-1].numel(), k, x.device, check)
    idx = idx.reshape(x2.shape[:-1])
    dispatch.call(
        "ema_update_", backend, x.device, codebook, cluster_size, embed_sum, x2, idx, decay, eps,
        features=("heads",) if multi_head else (),
    )  # fmt: skip


def ema_blend_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> None:
    """Second half of :func:`ema_update_` from already-reduced ``counts: [K]``/``sums: [K, D]``
    (fp32; ``[H, K]``/``[H, K, D]`` multi-head), e.g. after an all-reduce across ranks.  Plain
    PyTorch (O(K·D), not a hot spot)."""
    _check_ema_state(codebook, cluster_size, embed_sum)
    decay, eps = _check_decay_eps(decay, eps)
    if tuple(counts.shape) != tuple(cluster_size.shape) or tuple(sums.shape) != tuple(embed_sum.shape):
        raise ValueError(
            f"counts/sums must have shapes {list(cluster_size.shape)}/{list(embed_sum.shape)}, "
            f"got {list(counts.shape)}/{list(sums.shape)}"
        )
    reference.ema_blend_(codebook, cluster_size, embed_sum, counts.float(), sums.float(), decay, eps)


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    metric: str = "l2",
    *,
    estimator: str = "ste",
    codebook_loss: bool | None = None,
    backend: str = "auto",
    precision: str = "exact",
    check_inputs: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused quantization (straight-through or rotation-trick gradient) with the VQ-VAE losses.

    Args:
        x: ``[..., D]`` float32/bfloat16/float16; ``[..., H, D]`` with a multi-head codebook.
        codebook: ``[K, D]`` or ``[H, K, D]`` (head h uses ``codebook[h]``), same dtype/device.
        beta: commitment weight (>= 0).
        metric: search metric; the loss is always the squared error to the chosen code.
        estimator: ``"ste"`` (straight-through: ``grad_x = grad_q``) or ``"rotation"`` (the
            rotation trick of Fifty et al. 2024, exactly vector-quantize-pytorch 1.32's
            ``rotate_to(x, q)`` gradient: with ``u = x/‖x‖``, ``q̂ = q/‖q‖``,
            ``w = (u + q̂)/‖u + q̂‖`` and ``s = ‖q‖/‖x‖`` (norms clamped at 1e-6, as LR's
            ``safe_div``), ``grad_x = s·(g − 2w(w·g) + 2u(q̂·g))``, O(D) per vector).  Either way
            the value is exactly ``q`` and the codebook gets no gradient through ``quantized``.
        codebook_loss: add ``mean((sg(x) − q)²)`` (gives the codebook a gradient); defaults to
            ``codebook.requires_grad``.

    Returns:
        ``quantized`` (shape and dtype of x; the chosen codes' values),
        ``indices: [...] int64`` (``[..., H]`` multi-head), ``loss: [] float32`` =
        ``beta·mean((x − sg(q))²) [+ mean((sg(x) − q)²)]`` (means over every element; 0 when x
        is empty).  Backward: ``grad_x = E(grad_q) + grad_loss·2·beta·(x − q)/numel`` (E the
        estimator's map); the codebook gets the segment-summed gradient of its loss.
    """
    x = _check_x(x)
    codebook = _check_codebook(codebook, x, same_dtype=True)
    _check_metric(metric)
    _check_precision(precision)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(beta, (int, float)) or float(beta) < 0:
        raise ValueError(f"beta must be a float >= 0, got {beta!r}")
    beta = float(beta)
    if codebook_loss is None:
        codebook_loss = codebook.requires_grad
    if _want_check(check_inputs):
        _check_finite("x", x)
        _check_finite("codebook", codebook)
    lead = x.shape
    multi_head = codebook.dim() == 3
    features = (("heads",) if multi_head else ()) + (("rotation",) if estimator == "rotation" else ())
    q, idx, loss = dispatch.call(
        "quantize", backend, x.device, _flatten_heads(x, codebook), codebook, beta, metric,
        bool(codebook_loss), estimator, precision, features=features,
    )  # fmt: skip
    return q.reshape(lead), idx.reshape(lead[:-1]), loss


# ------------------------------------------------------------------ codebook_softmax family

_SOFTMAX_METRICS = ("l2", "dot", "cosine", "euclidean")


def _check_softmax_args(x, codebook, temperature, metric):
    x = _check_x(x)
    codebook = _check_codebook(codebook, x, same_dtype=True)
    if metric not in _SOFTMAX_METRICS:
        raise ValueError(f"metric must be one of {_SOFTMAX_METRICS}, got {metric!r}")
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not 0.0 < float(temperature) < float("inf")
    ):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    return x, codebook, float(temperature)


def _softmax_operands(x2, codebook, metric):
    """(x, codebook, op metric): cosine is the dot product of fp32 L2-normalized vectors."""
    if metric == "cosine":
        # fp32 normalization (eps 1e-12 as F.normalize): the logits are then exact cosines up to
        # fp32 rounding whatever the input dtype; autograd carries the gradient through it.
        xn = torch.nn.functional.normalize(x2.float(), dim=-1, eps=1e-12)
        cn = torch.nn.functional.normalize(codebook.float(), dim=-1, eps=1e-12)
        return xn, cn, "dot"
    return x2, codebook, metric


def code_distribution(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float = 1.0,
    metric: str = "l2",
    mask: torch.Tensor | None = None,
    *,
    groups: torch.Tensor | None = None,
    num_groups: int | None = None,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax of every row over the whole codebook, streamed over code tiles (never N x K).

    Logits ``l_ik = s(x_i, c_k) / τ`` with ``s = −‖x − c‖²`` (``"l2"``), ``x·c`` (``"dot"``),
    ``cos(x, c)`` (``"cosine"``) or ``−sqrt(max(‖x − c‖², 1e-8))`` (``"euclidean"``,
    vector-quantize-pytorch's ``-cdist``); ``p_ik = softmax_k(l_ik)``.

    Args:
        x: ``[..., D]`` float32/bfloat16/float16, any strides (accumulated in fp32).
        codebook: ``[K, D]``, same dtype and device.
        temperature: τ > 0 (0.01 … 10 are tested; numerics are relative to the running max).
        metric: ``"l2"``, ``"dot"``, ``"cosine"`` or ``"euclidean"``.
        mask: optional bool ``x.shape[:-1]``; ``False`` rows are left out of ``mean_probs`` (their
            ``logsumexp``/``entropy`` are still computed).
        groups: optional int64 ``x.shape[:-1]`` with values in ``[0, num_groups)``: ``mean_probs``
            is then one distribution per group (e.g. the sequence position, for
            vector-quantize-pytorch's ``codebook_diversity_loss``).
        num_groups: ``G ≥ 1``, required with ``groups`` (and only with it).

    Returns:
        ``logsumexp: [...] float32`` (``log Σ_k exp l_ik``), ``entropy: [...] float32``
        (``−Σ_k p_ik log p_ik``, nats) and ``mean_probs: [K] float32`` (mean of ``p_i`` over the
        unmasked rows; all zeros when there are none) or, with ``groups``, ``[G, K] float32``
        (row ``g``: the mean of ``p_i`` over the unmasked rows with ``groups_i = g``; all zeros
        for an empty group).  All three are differentiable w.r.t. ``x`` and ``codebook``.
    """
    x, codebook, temperature = _check_softmax_args(x, codebook, temperature, metric)
    lead = x.shape[:-1]
    x2 = _flatten(x)
    n = x2.shape[0]
    if mask is not None:
        mask = _require_tensor("mask", mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(lead):
            raise ValueError(
                f"mask must be a bool tensor of shape {list(lead)} (x's shape without D), "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        keep = mask.reshape(n).to(torch.float32)
    else:
        keep = None
    row_group = _check_groups(groups, num_groups, lead, x.device, _want_check(check_inputs))
    if row_group is None:
        if keep is None:
            row_weight = torch.full((n,), 1.0 / max(n, 1), dtype=torch.float32, device=x.device)
        else:
            # 1/#kept on kept rows (0/1 = 0 when none are kept: mean_probs is then all zeros).
            row_weight = keep / keep.sum().clamp_min(1.0)
    else:
        keep = torch.ones(n, dtype=torch.float32, device=x.device) if keep is None else keep
        # 1/#kept rows of the row's group (integer counts, exact in fp32 below 2^24; an empty
        # group's row of mean_probs stays zero).
        counts = keep.new_zeros(num_groups).index_add_(0, row_group, keep)
        row_weight = keep / counts.clamp_min(1.0)[row_group]
    if _want_check(check_inputs):
        _check_finite("x", x)
        _check_finite("codebook", codebook)
    xo, co, op_metric = _softmax_operands(x2, codebook, metric)
    extra = () if row_group is None else (row_group, num_groups)
    lse, entropy, mean_probs = dispatch.call(
        "code_distribution", backend, x.device, xo, co, row_weight, temperature, op_metric, *extra
    )
    return lse.reshape(lead), entropy.reshape(lead), mean_probs


def _check_groups(groups, num_groups, lead, device, check_values: bool):
    """``groups`` flattened to ``[N]`` int64 (None when not grouped), validated."""
    if groups is None:
        if num_groups is not None:
            raise ValueError("num_groups is only used with groups (pass both or neither)")
        return None
    groups = _require_tensor("groups", groups)
    if num_groups is None:
        raise ValueError("groups needs num_groups (the number of groups G; values in [0, G))")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if groups.dtype != torch.int64 or tuple(groups.shape) != tuple(lead):
        raise ValueError(
            f"groups must be an int64 tensor of shape {list(lead)} (x's shape without D), "
            f"got {groups.dtype} {list(groups.shape)}"
        )
    if groups.device != device:
        raise ValueError(f"groups is on {groups.device} but x is on {device}")
    groups = groups.reshape(-1)
    if check_values and groups.numel():
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(
                f"groups must lie in [0, num_groups = {num_groups}), got values in [{lo}, {hi}]"
            )
    return groups


def soft_quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float = 1.0,
    metric: str = "dot",
    *,
    values: torch.Tensor | None = None,
    return_indices: bool = False,
    backend: str = "auto",
    check_inputs: bool | None = None,
):
    """Soft assignment ``Σ_k softmax_k(l_ik) · c_k`` (attention with keys = values = codebook),
    streamed over code tiles (never N x K); the logits as in :func:`code_distribution`.

    Args:
        x: ``[..., D]`` float32/bfloat16/float16.
        codebook: ``[K, D]``, same dtype/device (the keys of the logits).
        temperature: τ > 0.  metric: ``"dot"`` (default, IBQ), ``"l2"``, ``"cosine"``, ``"euclidean"``.
        values: the ``[K, D]`` vectors averaged (default: the raw codes ``codebook``, also for
            ``"cosine"``, whose logits use the normalized codes).  Index backpropagation passes
            ``codebook.detach()`` so that the codebook gets only the gradient of the assignment.
        return_indices: also return ``argmax_k l_ik`` (``[...] int64``, ties -> lowest index),
            found in the same streamed pass.

    Returns:
        ``[..., D]`` in x's dtype (accumulated in fp32), differentiable w.r.t. ``x``, ``codebook``
        and ``values``; with ``return_indices`` also the argmax indices.
    """
    x, codebook, temperature = _check_softmax_args(x, codebook, temperature, metric)
    if values is None:
        values = codebook
    else:
        values = _require_tensor("values", values)
        if values.shape != codebook.shape or values.device != codebook.device:
            raise ValueError(
                f"values must have the codebook's shape {list(codebook.shape)} and device, got "
                f"{list(values.shape)} on {values.device}"
            )
        if values.dtype != codebook.dtype:
            raise TypeError(f"values must have the codebook's dtype {codebook.dtype}, got {values.dtype}")
    if _want_check(check_inputs):
        _check_finite("x", x)
        _check_finite("codebook", codebook)
    x2 = _flatten(x)
    xo, keys, op_metric = _softmax_operands(x2, codebook, metric)
    out, _, indices = dispatch.call(
        "soft_quantize", backend, x.device, xo, keys, values.to(keys.dtype), temperature, op_metric
    )
    out = out.to(x.dtype).reshape(x.shape)
    if return_indices:
        return out, indices.reshape(x.shape[:-1])
    return out
