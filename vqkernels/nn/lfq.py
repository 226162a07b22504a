"""Lookup-free quantization (LFQ, Yu et al. 2023) math without the N x 2^d probability matrix.

LFQ quantizes each of the ``d`` dimensions to ``±a`` (``a`` = the code magnitude), so the codebook
is the ``2^d`` corners of a cube and the index is the bit pattern (first dimension = most
significant bit).  Its entropy loss uses the softmax over all ``2^d`` codes of the logits
``l_k = 2·τ·x·c_k`` (``τ`` = the inverse temperature; the ``-‖c‖²`` term of a distance is the same
for every code and cancels).  Computed directly that is an ``N x 2^d`` matrix (1 GiB of fp32 for
4096 tokens at ``d = 16``) plus the softmax, log and product of the same size, each kept for the
backward.  Here nothing of size ``N x 2^d`` is ever built:

* **The distribution factorizes over bits.**  ``l_k = Σ_b 2τ·x_b·c_kb``, so the softmax is a
  product of independent per-bit Bernoullis.  Split the bits into a high half (``d1`` bits, the
  first dimensions) and a low half (``d2``): ``p(k1·2^d2 + k2) = P1(k1)·P2(k2)`` with ``P1`` and
  ``P2`` the softmaxes over the ``2^d1`` and ``2^d2`` half-codebooks (exactly the same formula on
  the half-cube).  For ``d = 16`` that is two ``N x 256`` tensors.
* **Batch (codebook) entropy**: the mean distribution over ``N`` rows is
  ``avg(k1, k2) = (1/N)·Σ_n P1_n(k1)·P2_n(k2) = (P1ᵀ·P2)/N`` -- one ``2^d1 x N x 2^d2`` GEMM
  giving the ``[2^d]`` vector directly, in place of ``N·2^d`` exponentials.
* **Per-sample entropy with upstream's clamp.**  vector-quantize-pytorch computes
  ``-Σ p·log(max(p, 1e-5))``, which is not the plain entropy (the clamp changes it for the many
  codes below ``1e-5``), so the factorized plain entropy ``Σ_b h(bit_b)`` is not enough to give its
  numbers.  Rewritten: ``H_clamped = -Σ_{p≥ε} p·log p - log(ε)·(1 - Σ_{p≥ε} p)
  = log(1/ε) - Σ_{p≥ε} p·log(p/ε)``.  For one row and one high code ``k1``, the low codes with
  ``P1(k1)·P2(k2) ≥ ε`` are a prefix of ``P2`` sorted in decreasing order, so with prefix sums
  ``S0 = Σ P2`` and ``S1 = Σ P2·log P2`` over that sorted order the sum over the prefix is
  ``P1·((log P1 - log ε)·S0 + S1)``: a sort, two cumulative sums and a ``searchsorted`` of
  ``2^d1`` thresholds per row -- ``O(N·2^(d/2)·d)`` work and memory, exact (no truncation), and
  differentiable (sort and cumsum carry gradients; the selection is piecewise constant like the
  clamp).  Every term of the sum is ``≥ 0`` and no large numbers cancel, so fp32 keeps the
  accuracy of the direct formula.

Gradients flow through ``P1``/``P2`` back to ``x`` by autograd; their size is ``N·2^(d/2)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["bits_to_codes", "half_codebook", "lfq_bit_marginals", "lfq_entropy_terms"]


def bits_to_codes(bits: torch.Tensor, magnitude: float) -> torch.Tensor:
    """``{0, 1}`` bits -> ``{-a, +a}`` code values (``a`` = ``magnitude``)."""
    return bits * (2.0 * magnitude) - magnitude


def half_codebook(num_bits: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[2^b, b]`` sign table (``±1``) of all codes of ``num_bits`` bits, first column = MSB."""
    codes = torch.arange(2**num_bits, device=device)
    shifts = torch.arange(num_bits - 1, -1, -1, device=device)
    bits = (codes[:, None] >> shifts) & 1
    return bits.to(dtype) * 2.0 - 1.0


def lfq_bit_marginals(
    x: torch.Tensor, code_value: float, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two half-codebook softmaxes whose outer product is the full code distribution.

    Args:
        x: ``[M, d] float`` the (f32) quantizer inputs, one row per token and codebook.
        code_value: ``a``: the codes are ``{-a, +a}^d`` (``codebook_scale``, or
            ``codebook_scale/√d`` for the spherical variant).
        inv_temperature: ``τ`` in the logits ``2τ·x·c``.

    Returns:
        ``P1: [M, 2^d1]`` over the first ``d1 = ceil(d/2)`` dimensions and ``P2: [M, 2^d2]`` over
        the rest, so that ``p[m, k1·2^d2 + k2] = P1[m, k1]·P2[m, k2]``.
    """
    d = x.shape[-1]
    d1 = (d + 1) // 2
    scale = 2.0 * inv_temperature * code_value
    p1 = _half_softmax(x[:, :d1], scale)
    p2 = _half_softmax(x[:, d1:], scale)
    return p1, p2


def _half_softmax(x_half: torch.Tensor, scale: float) -> torch.Tensor:
    signs = half_codebook(x_half.shape[-1], x_half.device, x_half.dtype)
    # a [M, b] @ [b, 2^b] product, as upstream's einsum on the full codebook (b <= 10 here)
    return torch.softmax((x_half * scale) @ signs.t(), dim=-1)


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    # p·log p with 0·log 0 = 0 and a finite gradient at underflowed p = 0 (xlogy's is -inf, and
    # -inf·0 would turn the whole backward into NaN): log of p clamped to the smallest normal.
    return p * p.clamp(min=torch.finfo(p.dtype).tiny).log()


def clamped_entropy_factorized(p1: torch.Tensor, p2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``-Σ_k p_k·log(max(p_k, ε))`` per row for ``p = P1 ⊗ P2`` without forming ``p``.

    Args:
        p1: ``[M, K1]``, p2: ``[M, K2]`` float, rows summing to 1.
    Returns:
        ``[M]`` (same dtype), see the module docs for the derivation.
    """
    if p1.shape[0] == 0:
        return p1.new_zeros(0)
    log_eps = math.log(eps)
    sorted2, _ = torch.sort(p2, dim=-1, descending=True)
    zero = sorted2.new_zeros(sorted2.shape[0], 1)
    # prefix sums over the decreasing order: S0[j] = Σ_{i<j} P2_i, S1[j] = Σ_{i<j} P2_i·log P2_i
    s0 = torch.cat([zero, sorted2.cumsum(-1)], dim=-1)
    s1 = torch.cat([zero, _xlogx(sorted2).cumsum(-1)], dim=-1)
    with torch.no_grad():
        # number of low codes with P1(k1)·P2(k2) >= ε, i.e. P2 >= ε/P1 (P1 = 0 -> threshold inf -> 0)
        threshold = eps / p1
        count = torch.searchsorted(-sorted2.contiguous(), -threshold.contiguous(), right=True)
    a = torch.gather(s0, 1, count)
    b = torch.gather(s1, 1, count)
    # Σ_{k2 in prefix} P1·P2·(log P1 + log P2 − log ε)
    selected = (_xlogx(p1) - p1 * log_eps) * a + p1 * b
    return -log_eps - selected.sum(-1)


def clamped_entropy(prob: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``-Σ p·log(max(p, ε))`` over the last dim (upstream's entropy of a small distribution)."""
    return -(prob * prob.clamp(min=eps).log()).sum(-1)


def lfq_entropy_terms(
    x: torch.Tensor,
    code_value: float,
    inv_temperature: float,
    eps: float = 1e-5,
    per_row_batch_entropy: bool = False,
    reduce_mean_probs=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ's per-sample entropy and codebook (batch) entropy, never building ``N x 2^d``.

    Args:
        x: ``[N, C, d] float32``: ``N`` tokens, ``C`` codebooks of ``d`` bits.
        code_value, inv_temperature: as :func:`lfq_bit_marginals`.
        eps: upstream's clamp in ``log(max(p, eps))``.
        per_row_batch_entropy: compute the "batch" entropy per row (upstream's behaviour when a
            mask is given: its mean over rows collapses to the per-sample entropy).
        reduce_mean_probs: optional ``[C, 2^d] -> [C, 2^d]`` applied to the mean distribution
            before its entropy (e.g. the mean over ranks in distributed training).

    Returns:
        ``per_sample_entropy: []`` -- the mean over ``N·C`` rows of the clamped entropy of each
        row's code distribution; ``codebook_entropy: []`` -- the mean over the ``C`` codebooks of
        the clamped entropy of the mean distribution over the ``N`` rows.
    """
    n, c, d = x.shape
    p1, p2 = lfq_bit_marginals(x.reshape(n * c, d), code_value, inv_temperature)
    per_row = clamped_entropy_factorized(p1, p2, eps)
    per_sample = per_row.mean()
    if per_row_batch_entropy:
        return per_sample, per_sample
    k1, k2 = p1.shape[-1], p2.shape[-1]
    # mean over rows of the outer products = one GEMM per codebook: [C, K1, N] @ [C, N, K2]
    avg = torch.bmm(p1.reshape(n, c, k1).permute(1, 2, 0), p2.reshape(n, c, k2).transpose(0, 1)) / n
    avg = avg.reshape(c, k1 * k2)
    if reduce_mean_probs is not None:
        avg = reduce_mean_probs(avg)
    codebook_entropy = clamped_entropy(avg, eps).mean()
    return per_sample, codebook_entropy
