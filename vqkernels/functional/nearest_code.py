"""Public ``nearest_code``: the fused nearest-code search (and Gumbel-max sampling)."""

from __future__ import annotations

import torch

from .. import dispatch
from ._checks import (
    _check_codebook,
    _check_finite,
    _check_metric,
    _check_precision,
    _check_sampling,
    _check_x,
    _flatten_heads,
    _want_check,
)

__all__ = ["nearest_code"]


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
