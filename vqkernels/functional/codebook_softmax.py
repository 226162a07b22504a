"""Public ``code_distribution`` and ``soft_quantize`` (family ``codebook_softmax``): a softmax of
every row over the whole codebook, streamed over code tiles (never N x K)."""

from __future__ import annotations

import torch

from .. import dispatch
from ._checks import (
    _check_codebook,
    _check_finite,
    _check_x,
    _flatten,
    _require_tensor,
    _want_check,
)

__all__ = ["code_distribution", "soft_quantize"]


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
