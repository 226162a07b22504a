"""Reference ``quantize`` (straight-through + VQ-VAE losses) and its closed-form backward."""

from __future__ import annotations

import torch

from .nearest_code import nearest_code

__all__ = ["quantize", "quantize_backward"]


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    metric: str = "l2",
    codebook_loss: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through vector quantization with the VQ-VAE losses.

    Args:
        x: ``[N, D]`` float.
        codebook: ``[K, D]``, same dtype as x.
        beta: commitment weight.
        metric: search metric (the loss is always the squared error to the chosen code).
        codebook_loss: add ``mean((sg(x) − q)²)``; defaults to ``codebook.requires_grad``.

    Returns:
        quantized ``[N, D]`` (value of the chosen codes, straight-through gradient to x),
        indices ``[N] int64``, loss ``[] float32``:
        ``beta·mean((x − sg(q))²) [+ mean((sg(x) − q)²)]``; 0 when N = 0.
    """
    if codebook_loss is None:
        codebook_loss = codebook.requires_grad
    with torch.no_grad():
        indices, _ = nearest_code(x.detach(), codebook.detach(), metric)
    # index_select, not codebook[indices]: its backward is index_add_ (deterministic on CPU),
    # whereas advanced indexing backward (index_put_ accumulate) adds with atomics in parallel
    # on CPU and gives different codebook-gradient bits from run to run.
    q = torch.index_select(codebook, 0, indices)
    numel = max(x.numel(), 1)
    # Squared error in fp32 whatever the input dtype.
    commit = ((x.float() - q.detach().float()) ** 2).sum() / numel
    loss = beta * commit
    if codebook_loss:
        loss = loss + ((x.detach().float() - q.float()) ** 2).sum() / numel
    # Straight-through estimator.  ``x + (q - x).detach()`` (the usual form) rounds: its value
    # differs from q by up to an ulp of max(|x|, |q|).  ``x - x.detach()`` is exactly 0 with an
    # identity gradient to x, so this value is exactly q (the contract, and what the fused
    # kernels store) and q itself gets no gradient from it.
    quantized = q.detach() + (x - x.detach())
    return quantized, indices, loss


def quantize_backward(
    grad_quantized: torch.Tensor,
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    beta: float,
    codebook_loss: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form backward of :func:`quantize` (what the fused kernels compute).

    ``grad_x = grad_q + grad_loss·2·beta·(x − q)/numel``;
    ``grad_codebook[k] = Σ_{i: idx_i = k} grad_loss·(−2)·(x_i − q_i)/numel`` when ``codebook_loss``.
    Computed in fp32 and returned in the input dtypes.
    """
    numel = max(x.numel(), 1)
    q = codebook[indices].float()
    diff = x.float() - q
    g = grad_loss.float()
    grad_x = grad_quantized.float() + (2.0 * beta / numel) * g * diff
    grad_cb = None
    if codebook_loss:
        grad_cb = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
        grad_cb.index_add_(0, indices, (-2.0 / numel) * g * diff)
        grad_cb = grad_cb.to(codebook.dtype)
    return grad_x.to(x.dtype), grad_cb
