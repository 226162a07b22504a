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

Layout: :mod:`models.prior_model` (the model, likelihood, sampling, ``prior.pt``),
:mod:`models.prior_training` (:func:`run_training`); this module holds the VQ-model glue, the
image grids and the CLI, and re-exports the other two, so ``models.prior`` is the one name to use.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .cli import exit_status

# The model, its likelihood, sampling and file (models/prior_model.py) and its training
# (models/prior_training.py), re-exported: ``models.prior`` stays the one public name.
from .prior_model import (  # noqa: F401
    _LN2,
    PRIOR_CONFIGS,
    PRIOR_FORMAT,
    IndexPrior,
    _check_indices,
    _check_sampling_args,
    _filtered_probs,
    _load,
    bits_per_index,
    load_prior,
    sample,
    save_checkpoint,
    unigram_bits_per_index,
)
from .prior_training import _lr_at, _tail_mean, run_training  # noqa: F401

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
    return exit_status(main)


if __name__ == "__main__":
    sys.exit(_cli())
