"""The code-index prior's model, its likelihood and sampling, and its checkpoint file.

:class:`IndexPrior`: token embedding over ``K + 1`` symbols (symbol ``K`` is a begin-of-sequence
token, so the first code is also predicted), learned positional embeddings, PyTorch's own
``nn.TransformerEncoder`` layers (pre-norm, GELU) run with a causal mask, a final LayerNorm and a
linear head to ``K`` logits.  :func:`bits_per_index` / :func:`unigram_bits_per_index`: held-out
negative log-likelihood in bits per index; :func:`sample`: temperature / top-k sampling in raster
order; :func:`save_checkpoint` / :func:`load_prior`: the ``prior.pt`` file (atomic writes, read
with ``weights_only=True``).  Training: :mod:`models.prior_training`; CLI: :mod:`models.prior`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PRIOR_FORMAT",
    "PRIOR_CONFIGS",
    "IndexPrior",
    "bits_per_index",
    "unigram_bits_per_index",
    "sample",
    "save_checkpoint",
    "load_prior",
]

# Bumped when the checkpoint layout changes; load_prior refuses other versions.
PRIOR_FORMAT = 1

# Sizes picked for a 2-core CPU: "small" trains at a few steps/s on an 8x8 grid with batch 64.
PRIOR_CONFIGS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, dim_ff=256, dropout=0.0),
    "small": dict(d_model=128, n_layers=4, n_heads=4, dim_ff=512, dropout=0.1),
    "base": dict(d_model=256, n_layers=6, n_heads=8, dim_ff=1024, dropout=0.1),
}

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------- model


class IndexPrior(nn.Module):
    """Causal transformer over flattened code grids.

    Args:
        codebook_size: K, the number of codes; indices live in ``[0, K)``.
        grid: ``(h, w)`` of the VQ model's latent grid; the sequence length is ``L = h * w``.
        d_model, n_layers, n_heads, dim_ff, dropout: transformer sizes.

    ``forward(indices)`` takes ``indices: [B, T] int64`` (``T <= L``, values in ``[0, K)``) and
    returns ``logits: [B, T, K] float32`` where ``logits[:, t]`` scores code ``t`` given the codes
    ``indices[:, :t]`` before it (teacher forcing: the input is shifted right behind a BOS token).
    """

    def __init__(
        self,
        codebook_size: int,
        grid: tuple[int, int],
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        dim_ff: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if int(codebook_size) < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        h, w = (int(g) for g in grid)
        if h < 1 or w < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1, got {grid}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.codebook_size = int(codebook_size)
        self.grid = (h, w)
        self.seq_len = h * w
        # Plain dict: stored in the checkpoint and enough to rebuild the module.
        self.config = dict(
            codebook_size=self.codebook_size,
            grid=[h, w],
            d_model=int(d_model),
            n_layers=int(n_layers),
            n_heads=int(n_heads),
            dim_ff=int(dim_ff),
            dropout=float(dropout),
        )
        self.bos = self.codebook_size  # the extra symbol that starts every sequence
        self.tok = nn.Embedding(self.codebook_size + 1, d_model)
        self.pos = nn.Parameter(torch.zeros(self.seq_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_ff,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only helps padded batches (we have none) and warns with norm_first.
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.codebook_size)
        # Additive float mask (-inf above the diagonal): position t attends to positions <= t.
        self.register_buffer(
            "causal_mask",
            nn.Transformer.generate_square_subsequent_mask(self.seq_len),
            persistent=False,
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Small embeddings (GPT-2 style) keep the initial logits near uniform: initial loss ~ log K.
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.02)

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, T] int64 starting with BOS, T <= L -> logits [B, T, K] float32."""
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos[:t]
        x = self.blocks(x, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 2 or indices.shape[1] > self.seq_len:
            raise ValueError(
                f"indices must have shape [B, T] with T <= {self.seq_len}, "
                f"got {tuple(indices.shape)}"
            )
        bos = indices.new_full((indices.shape[0], 1), self.bos)
        return self._logits(torch.cat([bos, indices[:, :-1]], dim=1))

    def next_logits(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix: [B, t] int64 (t < L, may be 0) -> logits [B, K] for code number t."""
        bos = prefix.new_full((prefix.shape[0], 1), self.bos)
        return self._logits(torch.cat([bos, prefix], dim=1))[:, -1]


def _check_indices(name: str, indices, codebook_size: int, seq_len: int | None = None):
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {indices.dtype}")
    if indices.dim() != 2 or (seq_len is not None and indices.shape[1] != seq_len):
        want = f"[N, {seq_len}]" if seq_len is not None else "[N, L]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(indices.shape)}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= codebook_size):
        raise ValueError(
            f"{name} values must lie in [0, {codebook_size}), got range "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    return indices


# --------------------------------------------------------------------------------- metrics


@torch.no_grad()
def bits_per_index(prior: IndexPrior, indices: torch.Tensor, batch_size: int = 256) -> float:
    """Mean negative log-likelihood of ``indices: [N, L] int64`` under ``prior``, in bits per index.

    Cross-entropy is in nats; dividing by ln 2 converts to bits. ``log2(K)`` is the cost of a
    uniform code, so anything below it is structure the prior has learned.
    """
    _check_indices("indices", indices, prior.codebook_size, prior.seq_len)
    if indices.shape[0] == 0:
        raise ValueError("indices must hold at least one sequence")
    was_training = prior.training
    prior.eval()
    total = 0.0
    try:
        for start in range(0, indices.shape[0], batch_size):
            chunk = indices[start : start + batch_size]
            logits = prior(chunk)
            # Per-chunk sums in fp32, accumulated across chunks in a Python float (fp64).
            ce = F.cross_entropy(
                logits.reshape(-1, prior.codebook_size), chunk.reshape(-1), reduction="sum"
            )
            total += ce.item()
    finally:
        prior.train(was_training)
    return total / indices.numel() / _LN2


def unigram_bits_per_index(
    train_indices: torch.Tensor, eval_indices: torch.Tensor, codebook_size: int
) -> float:
    """Bits per index of ``eval_indices`` under the training set's code frequencies.

    A baseline for the transformer: a model that ignores context entirely. Add-one (Laplace)
    smoothing keeps codes never seen in training at a finite cost.
    """
    counts = torch.bincount(train_indices.reshape(-1), minlength=codebook_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[eval_indices.reshape(-1)].mean() / _LN2)


# -------------------------------------------------------------------------------- sampling


def _check_sampling_args(temperature, top_k, codebook_size: int) -> tuple[float, int | None]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if not 1 <= top_k <= codebook_size:
            raise ValueError(f"top_k must lie in [1, K={codebook_size}], got {top_k}")
    return temperature, top_k


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """logits: [B, K] -> sampling probabilities [B, K] float32 after temperature and top-k."""
    logits = logits.float()
    # Subtract the row max BEFORE dividing by the temperature: every value is then <= 0, so a tiny
    # temperature drives the others to -inf (probability 0) instead of overflowing to +inf - inf.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # Keep exactly top_k entries (scatter, not a threshold: ties at the k-th value would
        # otherwise let more than k codes through).
        top = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, top.indices, top.values)
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def sample(
    prior: IndexPrior,
    n: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Draw ``n`` code grids from ``prior``.

    Args:
        n: number of grids (>= 0).
        temperature: > 0; logits are divided by it (< 1 sharpens, > 1 flattens).
        top_k: ``None`` (no filter) or an int in ``[1, K]``: each step samples only among the
            ``top_k`` most likely codes (``top_k = 1`` is greedy decoding).
        generator: optional ``torch.Generator`` on the prior's device, for reproducible draws.

    Returns:
        indices: ``[n, h, w] int64`` with every value in ``[0, K)``.

    Without a key/value cache each step re-runs the prefix: ``L`` passes of length <= ``L``,
    cheap for the 8x8 - 16x16 grids used here.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    temperature, top_k = _check_sampling_args(temperature, top_k, prior.codebook_size)
    device = prior.pos.device
    was_training = prior.training
    prior.eval()
    chunks = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            seq = torch.empty(b, 0, dtype=torch.int64, device=device)
            for _ in range(prior.seq_len):
                probs = _filtered_probs(prior.next_logits(seq), temperature, top_k)
                nxt = torch.multinomial(probs, 1, generator=generator)
                seq = torch.cat([seq, nxt], dim=1)
            chunks.append(seq)
    finally:
        prior.train(was_training)
    out = torch.cat(chunks) if chunks else torch.empty(0, prior.seq_len, dtype=torch.int64)
    return out.reshape(n, *prior.grid)


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Atomic torch.save (temp file + fsync + os.replace, shared with the training CLI): a crash
    mid-write never leaves a truncated checkpoint behind."""
    from .checkpoint import atomic_save

    atomic_save(obj, str(path))


def _load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "prior.pt"
    if not path.is_file():
        raise FileNotFoundError(f"prior checkpoint not found: {path}")
    # weights_only=True: only tensors and plain containers are unpickled, never arbitrary code.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRIOR_FORMAT or "config" not in ckpt:
        raise ValueError(
            f"{path} is not a vqkernels prior checkpoint (format {PRIOR_FORMAT}); "
            "train one with `python -m models.prior train`"
        )
    return ckpt


def load_prior(path: str | os.PathLike, device: str | torch.device = "cpu") -> IndexPrior:
    """Load a prior saved by :func:`run_training` (a file or its folder), in eval mode."""
    ckpt = _load(path)
    cfg = dict(ckpt["config"])
    prior = IndexPrior(cfg.pop("codebook_size"), tuple(cfg.pop("grid")), **cfg)
    prior.load_state_dict(ckpt["model"])
    prior.meta = dict(ckpt.get("meta", {}))
    return prior.to(device).eval()
