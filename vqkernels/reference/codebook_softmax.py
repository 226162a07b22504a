"""Reference ``codebook_softmax`` family: ``code_distribution`` and ``soft_quantize`` (the spec).

A softmax over the whole codebook, per row ``i`` of ``x: [N, D]`` over the codes ``c_k``
(``codebook`` / ``keys: [K, D]``), with logits ``l_ik = s(x_i, c_k) / τ`` and the *op-level* scores

* ``"l2"``:        ``s = −‖x − c‖²``, evaluated as ``−‖x‖² + 2·x·c − ‖c‖²``;
* ``"dot"``:       ``s = x·c``;
* ``"euclidean"``: ``s = −sqrt(max(‖x‖² − 2·x·c + ‖c‖², 1e-8))`` (vector-quantize-pytorch's
  ``-cdist``, its clamp included; the clamp's gradient is 0 below 1e-8).

``"cosine"`` is not an op-level metric: :mod:`vqkernels.functional` L2-normalizes ``x`` and the codes
(fp32, ``F.normalize`` eps 1e-12) and calls ``"dot"``.

``code_distribution(x, codebook, row_weight, τ, metric, row_group=None, num_groups=0)
-> (logsumexp [N], entropy [N], mean_probs [K] or [G, K])``
    ``p_ik = softmax_k(l_ik)``; ``logsumexp_i = log Σ_k exp l_ik``; ``entropy_i = −Σ_k p_ik log p_ik``
    (nats); ``mean_probs_k = Σ_i row_weight_i · p_ik`` (the functional layer passes ``1/#rows`` on
    unmasked rows and 0 on masked ones).  Grouped (``row_group: [N] int64`` in ``[0, G)``,
    ``num_groups = G ≥ 1``): ``mean_probs_gk = Σ_{i: row_group_i = g} row_weight_i · p_ik`` (the
    functional layer passes ``1/#unmasked rows of the group``), ``[G, K]``.  All fp32.
``soft_quantize(x, keys, values, τ, metric) -> (out [N, D] in x's dtype, logsumexp [N] fp32,
indices [N] int64)``
    ``out_i = Σ_k p_ik · values_k``; ``indices_i = argmax_k l_ik`` (ties -> lowest index; the hard
    code of index backpropagation, found in the same streamed pass) (attention with queries x, keys ``keys`` and values ``values``;
    the public function passes the codebook as both, or normalized keys for cosine).

These functions materialize the N x K logits (they are the specification, the gradcheck target and
the baseline, not a fast path).  ``compute_dtype`` lets tests run them at fp64 (the oracle) or at the
input precision.  The closed-form backwards below are what the fused kernels compute; they are
tested against autograd through the forwards.
"""

from __future__ import annotations

import torch

__all__ = [
    "EUCLIDEAN_EPS",
    "OP_METRICS",
    "code_scores",
    "code_distribution",
    "code_distribution_backward",
    "soft_quantize",
    "soft_quantize_backward",
]

#: vector-quantize-pytorch's ``cdist`` clamps the squared distance at this value before the sqrt.
EUCLIDEAN_EPS = 1e-8
OP_METRICS = ("l2", "dot", "euclidean")


def code_scores(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """``s(x_i, c_k)`` as an ``[N, K]`` matrix in the dtype of the (already cast) inputs."""
    if metric == "dot":
        return x @ codebook.T
    if metric not in ("l2", "euclidean"):
        raise ValueError(f"metric must be one of {OP_METRICS}, got {metric!r}")
    d2 = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ codebook.T) + (codebook * codebook).sum(-1)
    if metric == "l2":
        return -d2
    return -d2.clamp_min(EUCLIDEAN_EPS).sqrt()


def code_distribution(
    x: torch.Tensor,
    codebook: torch.Tensor,
    row_weight: torch.Tensor,
    temperature: float = 1.0,
    metric: str = "l2",
    row_group: torch.Tensor | None = None,
    num_groups: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct ``(logsumexp [N], entropy [N], mean_probs [K] or [G, K])`` (see the module
    docstring); float32 outputs (``compute_dtype`` when that is float64)."""
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    logits = code_scores(x.to(compute_dtype), codebook.to(compute_dtype), metric) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    log_p = logits - lse.unsqueeze(-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    weighted = row_weight.to(compute_dtype).unsqueeze(-1) * p
    if row_group is None:
        mean_probs = weighted.sum(0)
    else:
        # Row i adds into its group's row (index_add: sequential on the CPU, no G x N x K).
        mean_probs = weighted.new_zeros((num_groups, p.shape[1])).index_add(0, row_group, weighted)
    return lse.to(out_dtype), entropy.to(out_dtype), mean_probs.to(out_dtype)


def _chain_scores(ds, x, codebook, metric, need_grad_codebook=True, need_grad_x=True):
    """Gradients of ``Σ_ik ds_ik · s(x_i, c_k)`` w.r.t. x and the codebook (fp64/fp32 as given);
    each is ``None`` without its ``need_grad_*`` flag (its product is skipped)."""
    if metric == "dot":
        return (
            ds @ codebook if need_grad_x else None,
            ds.T @ x if need_grad_codebook else None,
        )
    if metric == "l2":
        # s = −‖x‖² + 2·x·c − ‖c‖²: ∂s/∂x = 2(c − x), ∂s/∂c = 2(x − c).
        e = 2.0 * ds
    else:
        d2 = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ codebook.T) + (codebook * codebook).sum(-1)
        # s = −sqrt(d²) above the clamp: ∂s/∂x = (c − x)/sqrt(d²); 0 where the clamp is active.
        e = torch.where(d2 > EUCLIDEAN_EPS, ds / d2.clamp_min(EUCLIDEAN_EPS).sqrt(), 0.0)
    grad_x = e @ codebook - x * e.sum(1, keepdim=True) if need_grad_x else None
    grad_c = e.T @ x - codebook * e.sum(0).unsqueeze(-1) if need_grad_codebook else None
    return grad_x, grad_c


def code_distribution_backward(
    grad_logsumexp: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_mean_probs: torch.Tensor,
    x: torch.Tensor,
    codebook: torch.Tensor,
    row_weight: torch.Tensor,
    logsumexp: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    metric: str,
    row_group: torch.Tensor | None = None,
    num_groups: int = 0,
    need_grad_codebook: bool = True,
    need_grad_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form backward of :func:`code_distribution` (what the kernels compute).

    With ``p = softmax(l)``, ``g_ik = grad_mean_probs[row_group_i, k]`` (``grad_mean_probs_k``
    ungrouped) and ``ḡ_i = Σ_k p_ik·g_ik``:
    ``∂L/∂l_ik = p_ik·(grad_lse_i − grad_H_i·(l_ik − lse_i + H_i) + w_i·(g_ik − ḡ_i))``
    (``∂H/∂l_k = −p_k(log p_k + H)``), then ``∂L/∂s = ∂L/∂l / τ`` chained through the scores.
    Empty (``numel 0``) gradients mean zero.  Returns ``(grad_x, grad_codebook)`` in the inputs'
    dtypes; without ``need_grad_codebook`` ``grad_codebook`` is an empty ``[0]`` tensor (autograd
    passes False when the codebook does not require grad, and the kernels then skip the code pass)
    and ``grad_x`` is unchanged; ``need_grad_x`` likewise for ``grad_x`` (the grad_x row pass).
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, cf = x.to(cdt), codebook.to(cdt)
    n, k = x.shape[0], codebook.shape[0]
    logits = code_scores(xf, cf, metric) / temperature
    lse = logsumexp.to(cdt).unsqueeze(-1)
    p = (logits - lse).exp()
    dl = torch.zeros_like(p)
    if grad_logsumexp.numel():
        dl = dl + grad_logsumexp.to(cdt).reshape(n, 1)
    if grad_entropy.numel():
        dl = dl - grad_entropy.to(cdt).reshape(n, 1) * (
            logits - lse + entropy.to(cdt).reshape(n, 1)
        )
    if grad_mean_probs.numel():
        g = grad_mean_probs.to(cdt).reshape(-1, k)
        if row_group is not None:
            g = g[row_group]  # [N, K]: each row sees its group's gradient
        gbar = (p * g).sum(-1, keepdim=True)
        dl = dl + row_weight.to(cdt).reshape(n, 1) * (g - gbar)
    ds = p * dl / temperature
    grad_x, grad_c = _chain_scores(ds, xf, cf, metric, need_grad_codebook, need_grad_x)
    return (
        x.new_empty((0,)) if grad_x is None else grad_x.to(x.dtype),
        codebook.new_empty((0,)) if grad_c is None else grad_c.to(codebook.dtype),
    )


def soft_quantize(
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    temperature: float = 1.0,
    metric: str = "dot",
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct ``(out [N, D] = softmax(l)·values in x's dtype, logsumexp [N], argmax [N])``."""
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    logits = code_scores(x.to(compute_dtype), keys.to(compute_dtype), metric) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    p = (logits - lse.unsqueeze(-1)).exp()
    out = p @ values.to(compute_dtype)
    indices = logits.argmax(-1) if logits.shape[0] else logits.new_empty((0,), dtype=torch.int64)
    out = out.to(x.dtype if compute_dtype != torch.float64 else torch.float64)
    return out, lse.to(out_dtype), indices


def soft_quantize_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    temperature: float,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form backward of :func:`soft_quantize` (FlashAttention-2's): with
    ``Δ_i = grad_out_i·out_i``, ``∂L/∂l_ik = p_ik·(grad_out_i·v_k − Δ_i)``,
    ``grad_values = pᵀ·grad_out``.  Returns ``(grad_x, grad_keys, grad_values)``."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, kf, vf = x.to(cdt), keys.to(cdt), values.to(cdt)
    go = grad_out.to(cdt)
    logits = code_scores(xf, kf, metric) / temperature
    p = (logits - logsumexp.to(cdt).unsqueeze(-1)).exp()
    delta = (go * out.to(cdt)).sum(-1, keepdim=True)
    ds = p * (go @ vf.T - delta) / temperature
    grad_x, grad_k = _chain_scores(ds, xf, kf, metric)
    grad_v = p.T @ go
    return grad_x.to(x.dtype), grad_k.to(keys.dtype), grad_v.to(values.dtype)
