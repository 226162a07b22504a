"""The codebook entropy loss of MAGVIT-2 / LlamaGen / IBQ on the streamed ``code_distribution`` op.

``loss = sample_weight · mean_i H(p_i) − batch_weight · H(p̄)``, ``p_i = softmax_k(l_ik)``,
``p̄ = mean_i p_i`` (over the unmasked rows), ``H(p̄) = −Σ_k p̄_k · log(p̄_k + eps)`` with LlamaGen's
``eps = 1e-5`` (it bounds the gradient ``−log(p̄_k + eps) − p̄_k/(p̄_k + eps)`` of unused codes).
Low per-sample entropy makes each vector commit to a code; high entropy of the batch average
spreads the batch over the codebook.  No N x K matrix: the op streams the codebook (the
``reference`` backend excepted).
"""

from __future__ import annotations

import torch

from .. import functional as vqf

__all__ = ["codebook_entropy_loss"]


def codebook_entropy_loss(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float = 0.01,
    metric: str = "l2",
    mask: torch.Tensor | None = None,
    *,
    sample_weight: float = 1.0,
    batch_weight: float = 1.0,
    eps: float = 1e-5,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> torch.Tensor:
    """``[] float32`` entropy loss of ``x: [..., D]`` against ``codebook: [K, D]`` (see module).

    ``mask``: optional bool ``x.shape[:-1]``; masked rows count in neither term (0 when all are
    masked).  Differentiable w.r.t. ``x`` and ``codebook``.
    """
    _, entropy, mean_probs = vqf.code_distribution(
        x, codebook, temperature, metric, mask, backend=backend, check_inputs=check_inputs
    )
    if mask is None:
        sample = entropy.mean() if entropy.numel() else entropy.sum()
    else:
        keep = mask.to(torch.float32)
        sample = (entropy * keep).sum() / keep.sum().clamp_min(1.0)
    batch = -(mean_probs * torch.log(mean_probs + eps)).sum()
    return sample_weight * sample - batch_weight * batch
