"""The auxiliary losses of the ``VectorQuantize`` drop-in, with LR 1.32's exact formulas.

The distance-based ones (cross-entropy commitment / ``indices=`` loss, codebook diversity) run on
the fused, streamed ``vqkernels.code_distribution`` op: never an ``N x K`` matrix, in the forward
or the backward.  LR's logits are ``dist = -cdist(x, c)`` (the NON-squared distance, its squared
distance clamped at 1e-8 before the sqrt: the op's ``"euclidean"`` metric) for euclidean
codebooks and ``x·c`` of the already L2-normalized input and codes for cosine ones (the op's
``"dot"``; the layer normalized both, so no second normalization here).

Shapes: ``flatten [H, N, d]`` / ``embed [H, K, d]`` are the codebook module's per-codebook rows and
codes (``H`` = 1, or the heads with separate codebooks); every op call takes one ``[N, d]`` x
``[K, d]`` slice, so a loop over ``H`` (small) and no ``[H, N, K]`` batch.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F

from ... import functional as vqf

#: LR's ``return_loss_breakdown`` tuple
LossBreakdown = namedtuple(
    "LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"]
)


def metric_for(use_cosine_sim: bool) -> str:
    """The op metric of LR's logits: ``"dot"`` (cosine codebooks) or ``"euclidean"`` (-cdist)."""
    return "dot" if use_cosine_sim else "euclidean"


def entropy(prob: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LR's ``entropy``: ``-Σ p·log(max(p, eps))`` over the last dim (the clamp keeps log finite
    for codes with p = 0; their term is 0 anyway)."""
    return (-prob * torch.log(prob.clamp(min=eps))).sum(dim=-1)


def orthogonal_loss(t: torch.Tensor) -> torch.Tensor:
    """Eq. (2) of https://arxiv.org/abs/2112.00384, as LR: ``t [h, n, d]`` codes ->
    ``Σ cos(c_i, c_j)² / (h·n²) − 1/n`` (0 for orthogonal codes)."""
    h, n = t.shape[:2]
    normed = F.normalize(t, p=2, dim=-1, eps=1e-6)
    cosine = torch.einsum("hid,hjd->hij", normed, normed)
    return (cosine**2).sum() / (h * n**2) - (1 / n)


def orthogonal_reg_loss(vq, embed_ind: torch.Tensor) -> torch.Tensor:
    """LR's orthogonal regularization of the layer ``vq``'s codebook: over the codes in
    ``embed_ind`` only (``orthogonal_reg_active_codes_only``), then at most
    ``orthogonal_reg_max_codes`` of them drawn with ``torch.randperm`` (LR's generator call)."""
    codebook = vq._codebook.embed
    if vq.orthogonal_reg_active_codes_only:
        if vq.heads > 1 and vq.separate_codebook_per_head:
            raise ValueError("orthogonal_reg_active_codes_only is not compatible with separate_codebook_per_head")
        codebook = codebook[:, torch.unique(embed_ind)]
    num_codes = codebook.shape[-2]
    if vq.orthogonal_reg_max_codes is not None and num_codes > vq.orthogonal_reg_max_codes:
        rand_ids = torch.randperm(num_codes, device=embed_ind.device)[: vq.orthogonal_reg_max_codes]
        codebook = codebook[:, rand_ids]
    return orthogonal_loss(codebook)


def picked_logits(x: torch.Tensor, codes: torch.Tensor, metric: str) -> torch.Tensor:
    """``logit(x_i, c_i)`` for each row and ITS code (``x, codes: [n, d]``) -> ``[n]``: O(n·d).
    Written as the op writes it (‖x‖² − 2x·c + ‖c‖², clamped at 1e-8, then sqrt) so the picked
    and the streamed logits round alike and ``lse − picked`` does not go negative by cancellation
    more than an ulp."""
    if metric == "dot":
        return (x * codes).sum(-1)
    d2 = (x * x).sum(-1) - 2.0 * (x * codes).sum(-1) + (codes * codes).sum(-1)
    return -d2.clamp_min(1e-8).sqrt()


def cross_entropy(flatten: torch.Tensor, embed: torch.Tensor, codes: torch.Tensor, metric: str,
                  backend: str = "auto") -> torch.Tensor:
    """LR's ``F.cross_entropy(dist, codes, ignore_index=-1)`` over every codebook's rows.

    ``flatten: [H, N, d]`` float32, ``embed: [H, K, d]`` float32, ``codes: [H, N]`` int64 (``-1`` =
    ignored) -> ``[]`` float32: the mean over the non-ignored rows of all H codebooks of
    ``logsumexp_k(l_ik) − l_i,code_i`` (NaN when every row is ignored, as LR).  The logsumexp comes
    from ``code_distribution`` (streamed; its backward sends ``softmax·∂l`` to x and the codes),
    the picked logit from the chosen code only.  Differentiable w.r.t. ``flatten`` and ``embed``."""
    terms, keeps = [], []
    for h in range(flatten.shape[0]):
        keep = codes[h] >= 0
        safe = codes[h].clamp_min(0)
        # (check_inputs=False, as the layer's searches: LR lets non-finite rows through too)
        lse = vqf.code_distribution(flatten[h], embed[h], 1.0, metric, backend=backend, check_inputs=False)[0]
        terms.append(lse - picked_logits(flatten[h], F.embedding(safe, embed[h]), metric))
        keeps.append(keep)
    per_row, keep = torch.cat(terms), torch.cat(keeps)
    # masked_fill (not a product) so an ignored row's value, whatever it is, cannot reach the mean
    return per_row.masked_fill(~keep, 0.0).sum() / keep.sum()


def cross_entropy_from_logits(dist: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The same loss from full logits ``dist [H, N, K]`` (implicit neural codebooks, where LR's
    per-row codebooks make them exist anyway)."""
    keep = codes >= 0
    per = torch.logsumexp(dist, -1) - dist.gather(-1, codes.clamp_min(0)[..., None])[..., 0]
    return per.masked_fill(~keep, 0.0).sum() / keep.sum()


def diversity_loss(flatten: torch.Tensor, embed: torch.Tensor, metric: str, positions: int,
                   temperature: float, backend: str = "auto") -> torch.Tensor:
    """LR's ``codebook_diversity_loss``: ``prob = softmax(dist · T)``, averaged over every dim but
    the position ``n`` (the second-to-last dim of the layer's rows) and the code, then
    ``−entropy(avg_prob).mean()`` over the positions.

    ``flatten: [H, N, d]`` (rows of each codebook laid out ``(..., n)``, so row ``i`` is at
    position ``i mod positions``), ``embed: [H, K, d]`` -> ``[]`` float32.  One grouped
    ``code_distribution`` call per codebook (``groups`` = position, ``τ = 1/T``) gives the
    per-position mean ``[positions, K]`` streamed over code tiles, never ``N x K``; every codebook
    has the same number of rows per position, so LR's mean over the codebooks too is the plain
    average of theirs.  Differentiable w.r.t. ``flatten`` and ``embed``."""
    h, n_rows = flatten.shape[:2]
    groups = torch.arange(n_rows, device=flatten.device) % positions
    total = None
    for i in range(h):
        mean_probs = vqf.code_distribution(flatten[i], embed[i], 1.0 / temperature, metric, groups=groups,
                                           num_groups=positions, backend=backend, check_inputs=False)[2]
        total = mean_probs if total is None else total + mean_probs
    return -entropy(total / h).mean()
