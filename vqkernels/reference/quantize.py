"""Reference ``quantize`` (straight-through or rotation-trick estimator + VQ-VAE losses) and its
closed-form backward, for one codebook ``[K, D]`` or one per head ``[H, K, D]``."""

from __future__ import annotations

import torch

from .nearest_code import nearest_code

__all__ = ["quantize", "quantize_backward", "rotation_frame", "rotate_grad", "ESTIMATORS"]

ESTIMATORS = ("ste", "rotation")
# vector-quantize-pytorch's safe_div / l2norm eps (rotate_to): norms are clamped at 1e-6.
ROTATION_EPS = 1e-6


def _gather_codes(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``codebook[idx]`` ([K, D] with idx [N]) or ``codebook[h, idx[:, h]]`` ([H, K, D] with idx
    [N, H]).  index_select, not advanced indexing: its backward is index_add_ (deterministic on
    CPU), whereas index_put_ accumulate adds with atomics in parallel and changes bits run to run."""
    if codebook.dim() == 2:
        return torch.index_select(codebook, 0, indices)
    h, k, d = codebook.shape
    flat = indices + torch.arange(h, device=indices.device) * k
    return torch.index_select(codebook.reshape(h * k, d), 0, flat.reshape(-1)).reshape(-1, h, d)


def rotation_frame(x: torch.Tensor, q: torch.Tensor):
    """The detached fp32 quantities of LR 1.32's ``rotate_to(x, q)`` per vector (last dim D):
    ``u = x/max(‖x‖, ε)``, ``q̂ = q/max(‖q‖, ε)``, ``w = (u + q̂)/max(‖u + q̂‖, ε)`` and the scale
    ``s = ‖q‖/max(‖x‖, ε)`` (``[..., 1]``), ε = 1e-6 (LR's safe_div / l2norm eps)."""
    xf = x.detach().float()
    qf = q.detach().float()
    x_norm = xf.norm(dim=-1, keepdim=True)
    q_norm = qf.norm(dim=-1, keepdim=True)
    u = xf / x_norm.clamp_min(ROTATION_EPS)
    q_hat = qf / q_norm.clamp_min(ROTATION_EPS)
    w = u + q_hat
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(ROTATION_EPS)
    s = q_norm / x_norm.clamp_min(ROTATION_EPS)
    return u, q_hat, w, s


def rotate_grad(g: torch.Tensor, u, q_hat, w, s) -> torch.Tensor:
    """Transpose of the rotation-trick Jacobian applied to ``g`` (fp32), O(D) per vector:
    ``s·(g − 2w(w·g) + 2u(q̂·g))``.  (The forward map is ``e ↦ s·(e − 2(e·w)w + 2(e·u)q̂)``, a
    Householder-style rotation of ``u`` onto ``q̂`` followed by the rescale ``‖q‖/‖x‖``.)"""
    wg = (w * g).sum(dim=-1, keepdim=True)
    qg = (q_hat * g).sum(dim=-1, keepdim=True)
    return s * (g - 2.0 * wg * w + 2.0 * qg * u)


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    metric: str = "l2",
    codebook_loss: bool | None = None,
    estimator: str = "ste",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vector quantization with a gradient estimator and the VQ-VAE losses.

    Args:
        x: ``[N, D]`` float, or ``[N, H, D]`` with a multi-head codebook.
        codebook: ``[K, D]`` or ``[H, K, D]`` (head h searches ``codebook[h]``), same dtype as x.
        beta: commitment weight.
        metric: search metric (the loss is always the squared error to the chosen code).
        codebook_loss: add ``mean((sg(x) − q)²)``; defaults to ``codebook.requires_grad``.
        estimator: how the gradient of ``quantized`` reaches ``x``: ``"ste"`` (straight-through,
            identity) or ``"rotation"`` (the rotation trick, Fifty et al. 2024, as LR 1.32's
            ``rotate_to(x, q)``: ``grad_x = s·(g − 2w(w·g) + 2u(q̂·g))``, see :func:`rotate_grad`).
            Either way the value is exactly ``q`` and no gradient reaches the codebook through
            ``quantized`` (only through the loss).

    Returns:
        quantized (shape of x; value of the chosen codes), indices ``[N]`` / ``[N, H]`` int64,
        loss ``[] float32``: ``beta·mean((x − sg(q))²) [+ mean((sg(x) − q)²)]``; 0 when N = 0.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if codebook_loss is None:
        codebook_loss = codebook.requires_grad
    with torch.no_grad():
        indices, _ = nearest_code(x.detach(), codebook.detach(), metric)
    q = _gather_codes(codebook, indices)
    numel = max(x.numel(), 1)
    # Squared error in fp32 whatever the input dtype.
    commit = ((x.float() - q.detach().float()) ** 2).sum() / numel
    loss = beta * commit
    if codebook_loss:
        loss = loss + ((x.detach().float() - q.float()) ** 2).sum() / numel
    if estimator == "ste":
        # ``x + (q - x).detach()`` (the usual form) rounds: its value differs from q by up to an
        # ulp of max(|x|, |q|).  ``x - x.detach()`` is exactly 0 with an identity gradient to x,
        # so this value is exactly q (the contract, and what the fused kernels store) and q
        # itself gets no gradient from it.
        quantized = q.detach() + (x - x.detach())
    else:
        # Same exact-zero trick around the (fp32) rotated x: value q, gradient J_rot^T g.
        u, q_hat, w, s = rotation_frame(x, q)
        e = x.float()
        rotated = s * (
            e
            - 2.0 * (e * w).sum(dim=-1, keepdim=True) * w
            + 2.0 * (e * u).sum(dim=-1, keepdim=True) * q_hat
        )
        quantized = q.detach() + (rotated - rotated.detach()).to(x.dtype)
    return quantized, indices, loss


def quantize_backward(
    grad_quantized: torch.Tensor,
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    beta: float,
    codebook_loss: bool,
    estimator: str = "ste",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form backward of :func:`quantize` (what the fused kernels compute).

    ``grad_x = E(grad_q) + grad_loss·2·beta·(x − q)/numel`` with ``E`` the identity (ste) or
    :func:`rotate_grad` (rotation); ``grad_codebook[(h,) k] = Σ_{i: idx_i = k} grad_loss·(−2)·
    (x_i − q_i)/numel`` when ``codebook_loss``.  Computed in fp32 and returned in the input dtypes.
    """
    numel = max(x.numel(), 1)
    q = _gather_codes(codebook, indices).float()
    diff = x.float() - q
    g = grad_loss.float()
    gq = grad_quantized.float()
    if estimator == "rotation":
        gq = rotate_grad(gq, *rotation_frame(x, q))
    grad_x = gq + (2.0 * beta / numel) * g * diff
    grad_cb = None
    if codebook_loss:
        grad_cb = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
        if codebook.dim() == 2:
            grad_cb.index_add_(0, indices, (-2.0 / numel) * g * diff)
        else:
            h, k, d = codebook.shape
            flat = (indices + torch.arange(h, device=indices.device) * k).reshape(-1)
            grad_cb.view(h * k, d).index_add_(0, flat, ((-2.0 / numel) * g * diff).reshape(-1, d))
        grad_cb = grad_cb.to(codebook.dtype)
    return grad_x.to(x.dtype), grad_cb
