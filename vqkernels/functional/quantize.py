"""Public ``quantize``: fused search, straight-through/rotation estimator and commitment loss."""

from __future__ import annotations

import torch

from .. import dispatch
from ..reference.quantize import ESTIMATORS
from ._checks import (
    _check_codebook,
    _check_finite,
    _check_metric,
    _check_precision,
    _check_x,
    _flatten_heads,
    _want_check,
)

__all__ = ["quantize"]


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
