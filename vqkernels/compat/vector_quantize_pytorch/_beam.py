"""Top-k codes and beam search for the VQ drop-ins, with vector-quantize-pytorch 1.32's semantics.

LR's ``VectorQuantize.forward(topk=k)`` (single head) returns, for every row, its ``k`` best codes
(``[..., k, d]``), their indices and per-candidate losses; ``ResidualVQ(beam_size=B)`` runs that
at every depth on every beam and keeps the ``B`` paths with the highest score
``Σ_depth −w_depth · loss`` (``beam_score_quantizer_weights``), one path at the last depth.

How LR's numbers are kept:
* the search: ``topk`` of LR's own logits (``−cdist``, its clamp included, or ``x·c`` for cosine
  codebooks; Gumbel noise drawn from the torch generator as LR when sampling), so ties and
  rounding pick the same codes;
* the scores: LR's per-candidate loss with LR's float arithmetic (commitment MSE over d, then
  ``0 + diversity·w + commit·w + orthogonal·w``), so near-ties rank alike;
* losses, gradients, EMA: of the chosen path; LR's ``update_indices`` from the chosen residuals.

What is NOT LR's way (the memory): LR builds the one-hot ``[N, B, B, K]`` and every candidate's
residual, output and autograd graph (``[N, B·B, d]`` per depth).  Here the search is a top-k over
row chunks (``O(chunk·K)`` logits, never ``N x K``), the candidates' scores are computed without
autograd from their indices (``O(chunk·B·d)``), and only the ``B`` selected candidates per row get
outputs and a graph: the same values and gradients (LR's ``batch_select`` sends nothing to the
others), ``B`` times less memory per depth.

Refused where LR 1.32 itself fails (as ``ValueError`` naming the option): ``affine_param``,
``straight_through``, ``implicit_neural_codebook``, ``accept_image_fmap``, a training step without
a commitment loss (the scores are commitment losses), and LR's own assertion (heads, cross-entropy
commitment / in-place optimizer in training).  Uninitialized ``kmeans_init`` (LR fails for batch >
1) initializes from every row of the first depth's input, as a plain forward would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _layout, _losses, _streamed

# rows per chunk of the candidates' scores: chunk·k·d fp32 gathered codes (and their squared
# differences) stay around 2 MiB each; the scores are a small share of the step's time
_CHUNK_ELEMS = 1 << 19

@torch.no_grad()
def _candidate_mse(flat: torch.Tensor, embed: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """LR's per-candidate commitment ``mean_d (c_idx − x)²`` -> ``[N, k]`` (fp32), row chunks
    (``O(chunk·k·d)``), with ``F.mse_loss`` as LR so the scores round alike."""
    k = idx.shape[-1]
    step = max(1, _CHUNK_ELEMS // max(k * flat.shape[-1], 1))
    out = []
    for xc, ic in zip(flat.split(step), idx.split(step)):
        codes = F.embedding(ic, embed)
        out.append(F.mse_loss(codes, xc.unsqueeze(-2).expand_as(codes), reduction="none").mean(-1))
    return torch.cat(out) if out else flat.new_zeros(0, k)


def check_topk(vq, topk, training: bool, beam: bool = False) -> int:
    """LR's assertion for ``topk`` (ValueError), plus the options LR 1.32 fails on with it
    (``beam``: inside a residual beam search)."""
    topk = min(int(topk), vq.codebook_size)
    if vq.heads != 1 or topk <= 0 or (vq.commitment_use_cross_entropy_loss and training) or (
            vq.in_place_codebook_optimizer is not None and training):
        raise ValueError("topk codes only supported for single-head codebooks (topk > 0) without cross "
                         "entropy commitment loss or in-place codebook optimizer (in training)")
    cb = vq._codebook
    for bad, name in ((cb.affine_param, "affine_param"),
                      (training and cb.straight_through, "straight_through (in training)"),
                      (beam and training and not vq.has_commitment_loss,
                       "a training step without commitment loss (the beam scores are commitment losses)")):
        if bad:
            raise ValueError(f"topk / beam search is not supported with {name}: vector-quantize-pytorch 1.32 "
                             "fails there too")
    return topk


class TopkCandidates:
    """One layer's ``k`` best codes for every row of ``x: [b, n, ..., d]`` (codebook space, as the
    layer's codebook sees it) and LR's per-candidate losses; ``mask: [b, n]`` bool or None.

    The diversity loss groups rows by their index along dim ``-2`` of ``x`` (LR's ``'... n l -> n
    l'`` reduction of its distances, whose ``n`` is the beam dim inside a residual beam search)."""

    def __init__(self, vq, x, k, mask, sample_codebook_temp, freeze_codebook):
        cb = vq._codebook
        self.vq, self.x, self.k, self.freeze = vq, x, k, freeze_codebook
        self.training = training = vq.training
        d = x.shape[-1]
        flat = x.reshape(-1, d).float()
        self.mask = None if mask is None else mask.reshape(*mask.shape, *([1] * (x.ndim - 3)))
        if not bool(cb.initted):  # k-means on every (unmasked) row; LR breaks here for batch > 1
            rows = None if mask is None else self.mask.expand(x.shape[:-1]).reshape(1, -1)
            cb.init_embed_(flat.detach().unsqueeze(0), mask=rows)
        embed = cb.effective_embed()
        if training and embed.data_ptr() == cb.embed.data_ptr():
            # the residual stack's update_indices overwrites the buffer before backward: keep
            # the searched codes for the diversity loss's backward (K x d)
            embed = embed.clone()
        self.embed = embed[0]
        temp = cb.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        kind = "dot" if cb.use_cosine_sim else "neg_cdist"
        stochastic = training and cb.stochastic_sample_codes and temp > 0
        idx = _streamed.topk_codes(flat.detach(), self.embed.detach(), k, kind, temp, stochastic)
        self.idx = idx.reshape(*x.shape[:-1], k)
        self.commit = _candidate_mse(flat.detach(), self.embed.detach(), idx).reshape(self.idx.shape)
        if self.mask is not None:
            self.commit = self.commit.masked_fill(~self.mask.unsqueeze(-1), 0.0)
        # LR's order of random draws: search noise, directional-reparam noise, orthogonal randperm
        self.noise = None
        if training and vq.directional_reparam and x.requires_grad and vq.route_gradients_to_input:
            self.noise = torch.randn(*self.idx.shape, d, device=x.device, dtype=x.dtype)
        self.diversity = self.orthogonal = vq.zero
        if training and vq.has_codebook_diversity_loss:
            self.diversity = _diversity(vq, flat, self.embed, x.shape[-2])
        if training and vq.has_codebook_orthogonal_loss:
            self.orthogonal = _losses.orthogonal_reg_loss(vq, self.idx)

    def _compose(self, commit):
        """LR's per-candidate loss from its commitment term, with LR's arithmetic order."""
        vq = self.vq
        if not self.training:
            return commit * vq.commitment_weight if vq.has_commitment_loss else commit
        loss = vq.zero
        if vq.has_codebook_diversity_loss:
            loss = loss + self.diversity * vq.codebook_diversity_loss_weight
        if vq.has_commitment_loss:
            loss = loss + commit * vq.commitment_weight
        if vq.has_codebook_orthogonal_loss:
            loss = loss + self.orthogonal * vq.orthogonal_reg_weight
        return loss

    @torch.no_grad()
    def scores_loss(self) -> torch.Tensor:
        """Every candidate's loss ``[..., k]`` (no autograd), LR's beam-score input."""
        return self._compose(self.commit)

    def outputs(self, parent=None, choice=None):
        """The candidates' ``(quantize [..., m, d], indices [..., m], loss [..., m], commit, rows)``
        (``rows [..., m, d]``: each candidate's input row, a gather of ``x``),
        differentiable: all ``k`` per row (``parent=None``), or for ``x: [b, n, j, d]`` the
        candidates ``(parent [b, n, m] in [0, j), choice [b, n, m] in [0, k))``.  Masked rows get
        index -1 and a zero commitment; their ``quantize`` is left to the caller (LR fills it
        with zeros or the layer's raw input, after ``project_out``)."""
        vq, x, d = self.vq, self.x, self.x.shape[-1]
        if parent is None:
            x_sel = x.unsqueeze(-2).expand(*self.idx.shape, d)
            idx = self.idx
            noise = self.noise
        else:
            x_sel = x.gather(-2, parent.unsqueeze(-1).expand(*parent.shape, d))
            flat_choice = parent * self.k + choice
            idx = self.idx.reshape(*parent.shape[:-1], -1).gather(-1, flat_choice)
            noise = None
            if self.noise is not None:
                noise = self.noise.reshape(*parent.shape[:-1], -1, d).gather(
                    -2, flat_choice.unsqueeze(-1).expand(*flat_choice.shape, d))
        codes = F.embedding(idx, self.embed)
        quantize = codes.to(x.dtype)
        commit_q = quantize
        if self.training:
            commit_q = quantize.detach() if (not vq.learnable_codebook or self.freeze) else quantize
            if x.requires_grad and vq.route_gradients_to_input:
                if vq.rotation_trick:
                    quantize = _streamed.rotate_to(x_sel, quantize)
                elif vq.directional_reparam:
                    err = quantize - x_sel
                    err_norm = err.norm(dim=-1, keepdim=True)
                    noised = err + vq.directional_reparam_variance**0.5 * noise
                    quantize = x_sel + F.normalize(noised, p=2, dim=-1, eps=1e-6).detach() * err_norm
                else:
                    quantize = x_sel + (quantize - x_sel).detach()
            if vq.sync_update_v > 0.0:
                quantize = quantize + vq.sync_update_v * (quantize - quantize.detach())
        commit = F.mse_loss(commit_q, x_sel, reduction="none").mean(-1)
        if self.mask is not None:
            keep = self.mask.reshape(*self.mask.shape[:2], 1)  # [b, n] -> the output rows [b, n, m]
            commit = commit.masked_fill(~keep, 0.0)
            idx = idx.masked_fill(~keep, -1)
        return quantize, idx, self._compose(commit), commit, x_sel


def _diversity(vq, flat, embed, positions):
    # LR's diversity loss over every candidate row; its "position" is dim -2 of the rows
    return _losses.diversity_loss(flat.unsqueeze(0), embed.unsqueeze(0), _losses.metric_for(vq.use_cosine_sim),
                                  positions, vq.codebook_diversity_temperature, vq.backend)


def vq_topk_forward(vq, x, topk, indices=None, mask=None, lens=None, sample_codebook_temp=None,
                    freeze_codebook=None, return_loss_breakdown=False):
    """LR's ``VectorQuantize.forward(x, topk=k)``: ``quantized [..., k, D]`` (channel-first
    layouts: ``[B, D, ..., k]``), ``indices [..., k]``, ``loss [..., k]`` (per candidate; a scalar
    in training without per-candidate terms) — no EMA / usage update (LR skips it for top-k).
    With ``indices=`` (LR's early return): ``(candidates [b, n, k, d] in codebook space, before
    ``project_out`` and any layout or mask restoration, LR's cross-entropy of the given codes)``."""
    topk = check_topk(vq, topk, vq.training)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}")
    freeze_codebook = vq.freeze_codebook if freeze_codebook is None else freeze_codebook
    x, mask, only_one = _layout.sequence_mask(x, mask, lens)
    if (vq.accept_image_fmap or vq.accept_3d_fmap) and mask is not None:
        raise ValueError("mask is not supported with accept_image_fmap/accept_3d_fmap")
    need_transpose = not vq.channel_last and not vq.accept_image_fmap and not vq.accept_3d_fmap and not only_one
    b, x_spatial = x.shape[0], x
    x, spatial = vq._to_sequence(x)
    if need_transpose:
        x = x.transpose(1, 2)
    if x.shape[-1] != vq.dim:
        raise ValueError(f"x must have dim={vq.dim} features, got shape {tuple(x_spatial.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask must have shape {list(x.shape[:2])}, got {list(mask.shape)}")
    h = vq._codebook.transform_input(vq.project_in(x))
    cand = TopkCandidates(vq, h, topk, mask, sample_codebook_temp, freeze_codebook)
    quantize, idx, loss, commit, _ = cand.outputs()
    if indices is not None:
        codes = _layout.indices_to_internal(indices, spatial, only_one, 1).reshape(1, -1)
        ce = _losses.cross_entropy(h.reshape(1, -1, h.shape[-1]).float(), cand.embed.unsqueeze(0), codes,
                                   _losses.metric_for(vq.use_cosine_sim), vq.backend)
        return quantize, ce
    quantize = vq.project_out(quantize)
    if mask is not None:  # LR: zeros or the raw input, after project_out
        fill = torch.zeros_like(quantize) if vq.return_zeros_for_masked_padding else x.unsqueeze(-2).expand_as(quantize)
        quantize = torch.where(mask[..., None, None], quantize, fill)
    if vq.training and not vq.has_commitment_loss:
        commit = vq.zero
    if need_transpose:
        quantize = quantize.movedim(-1, 1)  # b n k d -> b d n k
    if spatial is not None:
        quantize = quantize.movedim(-1, 1).reshape(b, quantize.shape[-1], *spatial, topk)
        idx = idx.reshape(b, *spatial, topk)
        loss = loss.reshape(b, *spatial, topk) if loss.ndim > 1 else loss
        commit = commit.reshape(b, *spatial, topk) if commit.ndim > 1 else commit
    if only_one:
        quantize, idx = quantize.squeeze(1), idx.squeeze(1)
        loss = loss.squeeze(1) if loss.ndim > 1 else loss
        commit = commit.squeeze(1) if commit.ndim > 1 else commit
    if not return_loss_breakdown:
        return quantize, idx, loss
    return quantize, idx, loss, _losses.LossBreakdown(commit, cand.diversity, cand.orthogonal, vq.zero)


def check_beam(rvq, beam_size: int, return_loss: bool) -> None:
    """What LR 1.32's residual beam search cannot do (it fails there), as ValueErrors."""
    for bad, name in ((return_loss, "forward(indices=...)"),
                      (rvq.implicit_neural_codebook, "implicit_neural_codebook"),
                      (rvq.accept_image_fmap, "accept_image_fmap"),
                      (rvq.diveq and rvq.training, "diveq (in training)")):
        if bad:
            raise ValueError(f"beam search (beam_size={beam_size}) is not supported with {name}: "
                             "vector-quantize-pytorch 1.32 fails there too")
    for vq in rvq.layers:
        check_topk(vq, beam_size, rvq.training, beam=True)


def residual_beam_search(rvq, x, mask, beam_size, sample_codebook_temp, freeze_codebook, dropout_index):
    """LR's ``ResidualVQ.forward`` with ``beam_size > 1`` on the projected input ``x: [b, n, d]``.

    Keeps ``beam <= beam_size`` paths per row: at every depth each path's residual gets its
    ``beam_size`` best codes (LR's ``topk``), each candidate the score ``path score − w_l · loss``
    (LR's per-candidate layer loss), and the best ``beam_size`` candidates survive (one at the last
    depth, or at the quantize-dropout depth).  Returns ``(quantized_out [b, n, d], indices [b, n,
    Q], losses [Q], chosen_inputs)``, those of the best path; ``chosen_inputs`` are the residuals
    each non-dropped depth quantized (LR's ``all_residuals`` of that path, for the EMA update; empty
    in eval)."""
    b, n, d = x.shape
    device = x.device
    residual = x.unsqueeze(-2)  # [b, n, j, d], j = 1 path so far
    quantized_out = None
    scores = torch.zeros(b, n, 1, device=device, dtype=x.dtype)
    history = []  # per depth: (survivors' inputs [b, n, m, d] | None, parent [b, n, m], indices, losses)
    num_layers = len(rvq.layers)
    for qi, vq in enumerate(rvq.layers):
        if dropout_index is not None and qi > dropout_index:
            break
        is_last = qi == (num_layers - 1 if dropout_index is None else dropout_index)
        cand = TopkCandidates(vq, vq._codebook.transform_input(residual), min(beam_size, vq.codebook_size),
                              mask, sample_codebook_temp, freeze_codebook)
        k = cand.k
        j = residual.shape[-2]
        # LR: einx.add('... j, ... j k -> ... (j k)', scores, -loss · w), then topk of the paths
        total = (scores.unsqueeze(-1) + (-cand.scores_loss() * rvq.beam_score_weights[qi])).reshape(b, n, j * k)
        layer_beam = 1 if is_last else beam_size
        if total.shape[-1] > layer_beam:
            scores, sel = total.topk(layer_beam, dim=-1)
        else:
            scores = total
            sel = torch.arange(j * k, device=device).expand(b, n, j * k)
        parent, choice = sel // k, sel % k
        quantized, idx, loss, _, rows = cand.outputs(parent, choice)
        # each survivor's input residual: the candidates' own rows when the codebook sees the
        # residual as is (euclidean; one [N, m, d] gather, already kept by autograd, not two)
        parent_residual = (rows if cand.x is residual else
                           residual.gather(-2, parent.unsqueeze(-1).expand(*parent.shape, d)))
        if mask is not None:  # LR: zeros or the layer's raw input (the residual) on padding
            fill = torch.zeros_like(quantized) if vq.return_zeros_for_masked_padding else parent_residual
            quantized = torch.where(mask[..., None, None], quantized, fill)
        # each survivor's input, for the codebook updates of a training step only
        history.append((parent_residual.detach() if rvq.training else None, parent, idx, loss))
        residual = parent_residual - frac_gradient(quantized, rvq.quant_grad_frac)
        if quantized_out is None:
            quantized_out = quantized  # LR adds it to zeros: the same values
        else:
            quantized_out = quantized_out.gather(-2, parent.unsqueeze(-1).expand(*parent.shape, d)) + quantized
    # the best path (beam 0 after the last selection), traced back depth by depth
    path = torch.zeros(b, n, 1, dtype=torch.long, device=device)
    indices, losses, inputs = [], [], []
    for inp, parent, idx, loss in reversed(history):
        indices.append(idx.gather(-1, path))
        losses.append(loss.gather(-1, path) if loss.ndim else loss.expand(b, n, 1))
        if inp is not None:
            inputs.append(inp.gather(-2, path.unsqueeze(-1).expand(b, n, 1, d)).squeeze(-2))
        path = parent.gather(-1, path)
    indices, losses, inputs = indices[::-1], losses[::-1], inputs[::-1]
    all_losses = torch.cat(losses, dim=-1)  # [b, n, depths]
    pad = num_layers - len(history)
    all_indices = F.pad(torch.cat(indices, dim=-1), (0, pad), value=-1)
    all_losses = F.pad(all_losses, (0, pad), value=0.0)
    if mask is not None:
        all_losses = torch.where(mask.unsqueeze(-1), all_losses, 0.0)
        all_losses = all_losses.sum(dim=(0, 1)) / mask.sum().clamp_min(1e-4)
    else:
        all_losses = all_losses.mean(dim=(0, 1))
    return quantized_out[..., 0, :], all_indices, all_losses, inputs


def frac_gradient(t, frac):
    """LR's ``frac_gradient``: the value of ``t``, a ``frac`` share of its gradient."""
    detached = t.detach()
    if frac <= 0:
        return detached
    return frac * t + (1.0 - frac) * detached
