"""Code-index prior: a small causal transformer that generates new VQ code grids.

A trained VQ-VAE or VQGAN turns an image ``[C, H, W]`` into a grid of code indices ``[h, w]``
(``h = H / downsample``). This module learns ``p(indices)`` autoregressively over the grid read in
raster order, ``p(i_1..i_L) = prod_t p(i_t | i_<t)`` with ``L = h * w``, and samples new grids that
the VQ model's decoder turns into images.

Model: token embedding over ``K + 1`` symbols (symbol ``K`` is a begin-of-sequence token, so the
first code is also predicted), learned positional embeddings, PyTorch's own
``nn.TransformerEncoder`` layers (pre-norm, GELU) run with a causal mask, a final LayerNorm and a
linear head to ``K`` logits. Trained with cross-entropy on the indices of random training crops.

Command line::

    python -m models.prior train --checkpoint C --steps N --out DIR [--minutes M] [--resume]
    python -m models.prior sample --prior DIR/prior.pt --checkpoint C --n 64 \\
        --temperature 1.0 --top-k 100 --out grid.png

``train`` encodes a pool of training crops once (stored in ``DIR/indices.pt`` so that ``--resume``
needs no re-encoding), writes ``DIR/prior.pt`` atomically (temp file + ``os.replace``) and
``DIR/metrics.json`` with the held-out negative log-likelihood in bits per index. Checkpoints hold
only tensors and plain containers and are read with ``torch.load(weights_only=True)``: loading never
executes code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PRIOR_CONFIGS",
    "IndexPrior",
    "bits_per_index",
    "unigram_bits_per_index",
    "sample",
    "run_training",
    "load_prior",
    "save_checkpoint",
    "make_grid",
    "save_grid",
    "main",
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


def _write_json(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


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


# --------------------------------------------------------------------------------- training


def _lr_at(step: int, steps: int, lr: float, time_progress: float = 0.0) -> float:
    """Learning rate: linear warm-up over the first ``min(100, steps / 20)`` steps (at least 1),
    then cosine decay to 10% of ``lr``.

    The decay follows ``max(step progress, time_progress)``: under a wall-clock budget
    (``--minutes``) the run usually stops long before ``steps``, and a purely step-based
    schedule would then never leave its warm-up (so the LR would stay tiny).
    """
    warm = max(1, min(100, steps // 20))
    if step < warm:
        return lr * (step + 1) / warm
    progress = max((step - warm) / max(1, steps - warm), time_progress)
    progress = min(1.0, progress)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def run_training(
    out_dir: str | os.PathLike,
    train_indices: torch.Tensor,
    eval_indices: torch.Tensor | None,
    codebook_size: int,
    grid: tuple[int, int],
    *,
    steps: int,
    config: str | dict = "small",
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    resume: bool = False,
    minutes: float | None = None,
    eval_every: int = 0,
    checkpoint_every: int = 200,
    meta: dict | None = None,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> dict:
    """Train an :class:`IndexPrior` on index grids and write ``out_dir/prior.pt`` + ``metrics.json``.

    Args:
        train_indices: ``[N, h, w]`` or ``[N, h*w]`` int64 in ``[0, K)``: the training pool.
        eval_indices: same layout, held out (or ``None``): scored in bits per index.
        steps: total optimizer steps (the schedule's length; ``--resume`` continues to it).
        minutes: wall-clock budget for this invocation; training stops at whichever of
            ``steps``/``minutes`` comes first and the checkpoint allows resuming. The learning
            rate then decays with elapsed time too (a step-based cosine would never leave its
            warm-up when the clock stops the run at a small fraction of ``steps``).
        stop: optional ``stop(step) -> bool`` checked after every step (an interruption hook).

    Returns the metrics dict written to ``out_dir/metrics.json``.

    Resuming restores model, optimizer, step, the batch generator and the global RNG (dropout), so
    a resumed run takes exactly the steps the uninterrupted one would.
    """
    from .progress import BudgetProgress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seq_len = int(grid[0]) * int(grid[1])
    train_flat = _check_indices(
        "train_indices", train_indices.reshape(train_indices.shape[0], -1), codebook_size, seq_len
    )
    if train_flat.shape[0] == 0:
        raise ValueError("train_indices must hold at least one sequence")
    eval_flat = None
    if eval_indices is not None:
        eval_flat = _check_indices(
            "eval_indices", eval_indices.reshape(eval_indices.shape[0], -1), codebook_size, seq_len
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(config, str):
        if config not in PRIOR_CONFIGS:
            raise ValueError(f"config must be one of {sorted(PRIOR_CONFIGS)}, got {config!r}")
        sizes = dict(PRIOR_CONFIGS[config])
    else:
        sizes = dict(config)

    ckpt_path = out / "prior.pt"
    start_step, elapsed, history = 0, 0.0, []
    gen = torch.Generator().manual_seed(seed)
    if resume and ckpt_path.exists():
        ckpt = _load(ckpt_path)
        cfg = dict(ckpt["config"])
        if cfg["codebook_size"] != codebook_size or list(cfg["grid"]) != [*grid]:
            raise ValueError(
                f"--resume: {ckpt_path} was trained for K={cfg['codebook_size']}, grid "
                f"{cfg['grid']}, but the data has K={codebook_size}, grid {list(grid)}"
            )
        prior = IndexPrior(cfg.pop("codebook_size"), tuple(cfg.pop("grid")), **cfg)
        prior.load_state_dict(ckpt["model"])
        opt = torch.optim.AdamW(prior.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["rng"])
        start_step, elapsed = int(ckpt["step"]), float(ckpt["seconds"])
        history = [list(h) for h in ckpt.get("history", [])]
    else:
        torch.manual_seed(seed)
        prior = IndexPrior(codebook_size, grid, **sizes)
        opt = torch.optim.AdamW(prior.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    meta = dict(meta or {})

    def checkpoint(step: int, seconds: float) -> None:
        save_checkpoint(
            {
                "format": PRIOR_FORMAT,
                "config": prior.config,
                "model": prior.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "seconds": seconds,
                "generator": gen.get_state(),
                "rng": torch.get_rng_state(),
                "history": history,
                "meta": meta,
                "train": dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed),
            },
            ckpt_path,
        )

    prior.train()
    n = train_flat.shape[0]
    t0 = time.perf_counter() - elapsed
    t_run = time.perf_counter()
    step = start_step
    train_bits = float("nan")
    # Counts towards what will really happen: under --minutes the clock usually ends the run.
    bar = BudgetProgress(
        steps, minutes, initial_step=start_step, desc="prior", disable=not progress
    )
    try:
        while step < steps:
            if minutes is not None and time.perf_counter() - t_run >= 60.0 * minutes:
                break
            # Under a wall-clock budget the schedule also follows the clock (see _lr_at); a
            # step-limited run is exactly reproducible, including across --resume.
            frac = (time.perf_counter() - t_run) / (60.0 * minutes) if minutes else 0.0
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, frac)
            batch = train_flat[torch.randint(0, n, (batch_size,), generator=gen)]
            logits = prior(batch)
            loss = F.cross_entropy(logits.reshape(-1, codebook_size), batch.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Clipping keeps the early, high-lr steps from blowing up the small embeddings.
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            opt.step()
            step += 1
            train_bits = loss.item() / _LN2
            history.append([step, train_bits])
            post = {"bits": f"{train_bits:.3f}"}
            if eval_flat is not None and eval_every and step % eval_every == 0:
                post["eval_bits"] = f"{bits_per_index(prior, eval_flat):.3f}"
            bar.set_postfix(**post)
            bar.update(step)
            if checkpoint_every and step % checkpoint_every == 0:
                checkpoint(step, time.perf_counter() - t0)
            if stop is not None and stop(step):
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    checkpoint(step, seconds)

    run_steps = step - start_step
    run_seconds = time.perf_counter() - t_run
    metrics = {
        "steps": step,
        "target_steps": steps,
        "seconds": round(seconds, 3),
        "steps_per_second": round(run_steps / run_seconds, 4) if run_seconds > 0 else None,
        "codebook_size": codebook_size,
        "grid": list(grid),
        "seq_len": seq_len,
        "parameters": sum(p.numel() for p in prior.parameters()),
        "config": prior.config,
        "train_sequences": n,
        # Mean over the last (up to) 50 steps: one batch alone is noisy.
        "train_bits_per_index": _tail_mean(history, 50),
        "uniform_bits_per_index": math.log2(codebook_size),
        **meta,
    }
    if eval_flat is not None and eval_flat.shape[0]:
        metrics["eval_sequences"] = int(eval_flat.shape[0])
        metrics["eval_bits_per_index"] = bits_per_index(prior, eval_flat)
        metrics["eval_unigram_bits_per_index"] = unigram_bits_per_index(
            train_flat, eval_flat, codebook_size
        )
        metrics["eval_bits_per_image"] = metrics["eval_bits_per_index"] * seq_len
    _write_json(metrics, out / "metrics.json")
    return metrics


def _tail_mean(history: list, k: int) -> float | None:
    if not history:
        return None
    tail = [h[1] for h in history[-k:]]
    return sum(tail) / len(tail)


# ------------------------------------------------------------------------------------ images


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, scale: int = 1) -> torch.Tensor:
    """Tile ``images: [B, C, H, W]`` float in [0, 1] (C = 1 or 3) into one ``[3, H', W']`` image.

    ``scale`` repeats pixels (nearest neighbour) so that 8x8 or 32x32 tiles stay visible.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [B, 1|3, H, W], got {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    b, _, h, w = images.shape
    nrow = max(1, min(nrow, b)) if b else 1
    rows = max(1, math.ceil(b / nrow))
    grid = torch.ones(3, pad + rows * (h + pad), pad + nrow * (w + pad))
    for i in range(b):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, **kwargs) -> None:
    """Write :func:`make_grid` of ``images: [B, C, H, W]`` in [0, 1] to a PNG."""
    from PIL import Image

    grid = make_grid(images, **kwargs)
    arr = (grid.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, optimize=True)


# ----------------------------------------------------------------------- VQ model glue (CLI)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_settings(
    checkpoint: str | os.PathLike, dataset: str | None, image_size: int | None
) -> tuple[str, int | None]:
    """The dataset and crop size a prior should use: the CLI's, else those the VQ model was
    trained with (recorded in its checkpoint's training arguments by ``models.train``)."""
    if dataset is None or image_size is None:
        from models.checkpoint import load_checkpoint

        saved = (load_checkpoint(str(checkpoint)).get("train") or {}).get("args") or {}
        dataset = dataset or saved.get("dataset")
        image_size = image_size or saved.get("image_size")
    if dataset is None:
        raise ValueError("--dataset is required: the VQ checkpoint does not record its dataset")
    return dataset, image_size


@torch.no_grad()
def encode_batches(model, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """images: [N, C, H, W] in [0, 1] -> indices [N, h, w] int64 (the VQ model in eval mode)."""
    out = [model.encode(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


@torch.no_grad()
def encode_training_pool(model, sampler, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Encode ``n`` random training crops (with flips, from ``sampler.sample``) -> [n, h, w]."""
    gen = torch.Generator().manual_seed(seed)
    chunks, left = [], n
    while left > 0:
        b = min(batch_size, left)
        chunks.append(model.encode(sampler.sample(b, gen)))
        left -= b
    return torch.cat(chunks)


def _cmd_train(args: argparse.Namespace) -> dict:
    import models
    from models.data import load_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = models.load(args.checkpoint)
    model.eval()
    dataset, image_size = _data_settings(args.checkpoint, args.dataset, args.image_size)
    pool_path = out / "indices.pt"
    if args.resume and pool_path.exists():
        pool = torch.load(pool_path, map_location="cpu", weights_only=True)
        train_idx, eval_idx = pool["train"].long(), pool["eval"].long()
    else:
        t = time.perf_counter()
        # No recolouring: the prior models the codes of real photos (what it will compress and
        # what its samples should look like); colour augmentation only helps the VQ codebook.
        sampler = load_dataset(
            dataset, "train", image_size=image_size, seed=args.seed, colour_aug=0.0
        )
        train_idx = encode_training_pool(model, sampler, args.train_crops, 128, args.seed)
        eval_images = load_dataset(dataset, "eval", image_size=image_size, seed=args.seed)
        eval_idx = encode_batches(model, eval_images)
        # int16 halves the file four times over; K <= 32767 always holds for these models.
        small = torch.int16 if model.codebook_size <= 32767 else torch.int64
        save_checkpoint({"train": train_idx.to(small), "eval": eval_idx.to(small)}, pool_path)
        print(
            f"encoded {len(train_idx)} training crops and {len(eval_idx)} held-out tiles "
            f"in {time.perf_counter() - t:.1f}s -> grid {tuple(train_idx.shape[1:])}",
            file=sys.stderr,
        )
    grid = tuple(int(g) for g in train_idx.shape[1:])
    meta = {
        "vq_checkpoint": str(args.checkpoint),
        "vq_sha256": _sha256(args.checkpoint),
        "dataset": str(dataset),
        "image_size": image_size,
    }
    metrics = run_training(
        out,
        train_idx,
        eval_idx,
        model.codebook_size,
        grid,
        steps=args.steps,
        config=args.config,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        resume=args.resume,
        minutes=args.minutes,
        eval_every=args.eval_every,
        meta=meta,
        progress=not args.no_progress,
    )
    print(
        f"prior: {metrics['steps']} steps, held-out NLL "
        f"{metrics.get('eval_bits_per_index', float('nan')):.3f} bits/index "
        f"(uniform {metrics['uniform_bits_per_index']:.3f}, unigram "
        f"{metrics.get('eval_unigram_bits_per_index', float('nan')):.3f}) -> {out / 'prior.pt'}"
    )
    return metrics


@torch.no_grad()
def generate_images(
    prior: IndexPrior, model, n: int, temperature: float, top_k: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` grids and decode them: -> (images [n, C, H, W] in [0, 1], indices [n, h, w])."""
    if prior.codebook_size != model.codebook_size:
        raise ValueError(
            f"the prior was trained for K={prior.codebook_size} codes but the VQ model has "
            f"K={model.codebook_size}: use the checkpoint the prior was trained on"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    gen = torch.Generator(device=prior.pos.device).manual_seed(seed)
    idx = sample(prior, n, temperature=temperature, top_k=top_k, generator=gen)
    images = torch.cat([model.decode_indices(idx[i : i + 64]) for i in range(0, n, 64)])
    return images.clamp(0, 1), idx


def _cmd_sample(args: argparse.Namespace) -> None:
    import models

    prior = load_prior(args.prior)
    model = models.load(args.checkpoint)
    model.eval()
    want = prior.meta.get("vq_sha256")
    if want and want != _sha256(args.checkpoint):
        warnings.warn(
            f"{args.checkpoint} differs from the VQ checkpoint the prior was trained on "
            f"({prior.meta.get('vq_checkpoint')}); samples may be meaningless",
            stacklevel=2,
        )
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    images, _ = generate_images(prior, model, args.n, args.temperature, args.top_k, args.seed)
    nrow = args.nrow or max(1, int(math.ceil(math.sqrt(args.n))))
    scale = max(1, 64 // images.shape[-1])
    save_grid(images, args.out, nrow=nrow, scale=scale)
    print(f"wrote {args.n} samples ({tuple(images.shape[1:])}) to {args.out}")


def _positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {s}")
    return v


def _top_k(s: str) -> int | None:
    if s.lower() in ("none", "0"):
        return None
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 0/none for no filter), got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.prior", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a prior on a VQ model's code indices")
    t.add_argument("--checkpoint", required=True, help="trained VQ-VAE/VQGAN checkpoint")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--out", required=True, help="output folder (prior.pt, metrics.json)")
    t.add_argument("--config", default="small", choices=sorted(PRIOR_CONFIGS))
    t.add_argument("--minutes", type=_positive_float, default=None, help="wall-clock budget")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-crops", type=int, default=8192, help="training crops to encode")
    t.add_argument("--dataset", default=None, help="default: the VQ checkpoint's dataset")
    t.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    t.add_argument("--eval-every", type=int, default=0, help="held-out NLL every E steps")
    t.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("sample", help="sample code grids and decode them to a PNG grid")
    s.add_argument("--prior", required=True, help="prior.pt (or its folder)")
    s.add_argument("--checkpoint", required=True, help="the VQ checkpoint the prior was trained on")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--temperature", type=_positive_float, default=1.0)
    s.add_argument("--top-k", type=_top_k, default=None, help="sample among the k likeliest codes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=int, default=0)
    s.add_argument("--out", required=True, help="output PNG")
    return p


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.cmd == "train":
        if args.steps < 1:
            raise SystemExit("--steps must be >= 1")
        return _cmd_train(args)
    return _cmd_sample(args)


def _cli() -> int:
    """Command-line entry: user errors print one line (no traceback) and exit with status 2."""
    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
