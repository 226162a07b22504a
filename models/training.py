"""Training-loop building blocks for ``models.train``: weight EMA, gradient accumulation with one
EMA-codebook update per optimizer step, mixed precision.

* :class:`WeightEMA`: ``θ_ema ← d·θ_ema + (1 − d)·θ`` after every optimizer step (fp32, in place
  with ``torch._foreach_lerp_``); buffers (the VQ codebook and its EMA statistics, which are
  already averages) are copied, not averaged, so the EMA model quantizes with the live codebook.
* :class:`DeferredCodebookUpdates`: under gradient accumulation every micro-step's forward must
  quantize with the *same* codebook and the EMA statistics must be updated once per optimizer
  step from all micro-batches together (otherwise N micro-steps would apply N EMA decays per
  step).  Inside the context, each ``VectorQuantizer``'s state update only records its inputs
  (the flattened latents ``[n, D]`` and indices ``[n]``, latent-sized); :meth:`flush` then runs the
  layer's own update once on their concatenation, which equals the update the whole batch gets
  in one step (same rows in the same order: EMA statistics, the distributed all-reduce, usage,
  perplexity and dead-code restarts alike).
* :func:`autocast` / :func:`make_grad_scaler`: ``--precision fp32|bf16|fp16``.  The quantizer runs
  in fp32 whatever the autocast state (the layer turns autocast off around its search and EMA).
* :func:`discriminator_norm_for_ranks`: on several ranks the VQGAN discriminator must not
  normalize each rank's batch alone (SyncBatchNorm on GPUs, GroupNorm on CPU).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

__all__ = [
    "WeightEMA",
    "DeferredCodebookUpdates",
    "autocast",
    "make_grad_scaler",
    "PRECISIONS",
    "vector_quantizers",
    "discriminator_norm_for_ranks",
]

PRECISIONS = ("fp32", "bf16", "fp16")


class WeightEMA:
    """An exponential moving average of a model's parameters.

    Args:
        model: the raw model (not a DDP/compile wrapper).
        decay: ``d`` in ``[0, 1)``; ``θ_ema ← d·θ_ema + (1 − d)·θ``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema-decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = [p for p in self.model.parameters()]
        raw_p = [p.detach() for p in model.parameters()]
        # lerp(ema, raw, 1 - d) = ema + (1 - d)(raw - ema): one fused pass per tensor list.
        torch._foreach_lerp_(ema_p, raw_p, 1.0 - self.decay)
        for b_ema, b_raw in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b_raw)
        # Python-side mirrors of buffers (the quantizer's initted flag) follow the copy.
        for m_ema, m_raw in zip(self.model.modules(), model.modules()):
            if hasattr(m_raw, "_initted_py"):
                m_ema._initted_py = m_raw._initted_py

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=True)


def vector_quantizers(model: nn.Module) -> list[nn.Module]:
    """Every ``vqkernels.nn.VectorQuantizer`` inside ``model``."""
    from vqkernels.nn import VectorQuantizer

    return [m for m in model.modules() if isinstance(m, VectorQuantizer)]


class DeferredCodebookUpdates:
    """Record the quantizers' state updates during gradient-accumulation micro-steps and apply
    them once (:meth:`flush`) on the concatenated micro-batches.

    Use::

        with DeferredCodebookUpdates(model) as deferred:
            for micro in micro_batches:
                ...forward / backward...
            deferred.flush()
    """

    def __init__(self, model: nn.Module):
        self.layers = vector_quantizers(model)
        self._records: dict[int, list] = {}

    def __enter__(self) -> DeferredCodebookUpdates:
        for layer in self.layers:
            records: list = []
            self._records[id(layer)] = records

            def record(flat, idx, valid, _records=records):
                # ``flat`` is already detached fp32 (the layer calls this under no_grad).
                _records.append((flat.clone(), idx.clone(), None if valid is None else valid))

            layer._update_state = record  # instance attribute shadows the method
        return self

    @torch.no_grad()
    def flush(self) -> None:
        """Apply each layer's update once to all rows recorded since the last flush."""
        for layer in self.layers:
            records = self._records[id(layer)]
            if not records:
                continue
            flat = torch.cat([r[0] for r in records])
            idx = torch.cat([r[1] for r in records])
            if all(r[2] is None for r in records):
                valid = None
            else:
                valid = torch.cat(
                    [
                        torch.ones_like(r[1], dtype=torch.bool) if r[2] is None else r[2]
                        for r in records
                    ]
                )
            records.clear()
            type(layer)._update_state(layer, flat, idx, valid)

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("_update_state", None)
        self._records.clear()


def autocast(precision: str, device: torch.device):
    """Autocast context for the forward pass (``fp32``: none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device):
    """A ``GradScaler`` for fp16 (its small exponent range underflows gradients without loss
    scaling); ``None`` for fp32/bf16 (bf16 has fp32's exponent range)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def discriminator_norm_for_ranks(config: dict, explicit: bool, ctx, log) -> bool:
    """Multi-rank VQGAN: the discriminator's normalization must not see only the local batch.
    Returns True when its BatchNorms are to be converted to SyncBatchNorm (GPUs)."""
    if not ctx.enabled:
        return False
    norm = config["disc_norm"]
    if norm == "actnorm":
        raise ValueError(
            "disc_norm='actnorm' initializes from the first local batch, so the ranks would start "
            "with different discriminators; use --set disc_norm='\"group\"' (or batch on GPUs)"
        )
    if norm == "batch" and ctx.device.type == "cuda":
        return True
    if norm == "batch":
        if explicit:
            raise ValueError(
                "disc_norm='batch' on several CPU ranks would normalize each rank's batch alone "
                "(SyncBatchNorm needs GPUs); use --set disc_norm='\"group\"'"
            )
        config["disc_norm"] = "group"
        log(
            "distributed on CPU: discriminator uses GroupNorm (disc_norm='group') instead of BatchNorm"
        )
    return False
