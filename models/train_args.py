"""Command-line arguments of ``models.train`` and the model config they select.

* :func:`build_parser`: every flag of ``python -m models.train`` (``--help`` text included).
* :func:`check_scale_args`: early, flag-named errors for the scale / fault-tolerance flags.
* :func:`make_config`: the model config of a fresh run: the ``--config`` size, then the
  dataset's defaults, then the explicit flags, then every ``--set KEY=JSON`` (last wins).
"""

from __future__ import annotations

import argparse
import json

from .perceptual import PERCEPTUAL_KINDS
from .training import PRECISIONS
from .vqgan import vqgan_config
from .vqvae import vqvae_config

__all__ = ["build_parser", "check_scale_args", "make_config", "parse_sets", "dataset_defaults"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.train",
        description="Train a VQ-VAE or VQGAN with vqkernels on bundled or local images (offline).",
    )
    p.add_argument("--model", choices=("vqvae", "vqgan"), default="vqvae")
    p.add_argument("--dataset", default="photos", help="digits | photos | a folder of PNG/JPEG")
    p.add_argument(
        "--steps",
        type=int,
        default=100_000,
        help="total optimizer steps (default: effectively unlimited; use --minutes)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget for this invocation; stops at whichever of "
        "--steps/--minutes comes first",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", choices=("tiny", "base"), default="base")
    p.add_argument(
        "--backend",
        default="auto",
        help="vqkernels backend: auto | cpu | reference | cuda | triton",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest valid checkpoint in OUT (checkpoint.pt, else the newest "
        "loadable checkpoint-step*.pt; model config and seed come from it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="GLOBAL batch per optimizer step, split evenly across the ranks (default 32 vqvae, "
        "16 vqgan)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="training crop / eval tile size (default 32; 8 for digits)",
    )
    p.add_argument("--codebook-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--lr-schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="cosine: decay the learning rate to 5%% along a half cosine over the run's progress, "
        "max(step/--steps, elapsed/--minutes) (with --minutes the schedule spans this "
        "invocation's budget, so it depends on the machine's speed); constant: no decay",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps in this invocation, as if interrupted (tests --resume)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=500,
        help="evaluate on held-out images and checkpoint every E steps",
    )
    p.add_argument(
        "--perceptual",
        choices=PERCEPTUAL_KINDS,
        default=None,
        help="perceptual loss (default: none for vqvae, auto for vqgan)",
    )
    p.add_argument("--perceptual-weight", type=float, default=None)
    p.add_argument("--disc-start", type=int, default=None, help="VQGAN: step the GAN loss starts")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override any model config key, e.g. --set hidden=64 --set "
        "kmeans_init=false (values parsed as JSON)",
    )
    p.add_argument(
        "--colour-aug",
        type=float,
        default=None,
        help="probability of recolouring a training crop (random RGB channel order + hue "
        "rotation; default 0.75 for photos, 0 otherwise; 0 disables)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: the cores the load average leaves free)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("scale and fault tolerance")
    g.add_argument(
        "--device",
        default="auto",
        help="auto (one GPU per local rank when CUDA is available, else CPU) | cpu | cuda",
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-steps per optimizer step (the per-rank batch is split in N; gradients are "
        "all-reduced and the EMA codebook updated once per optimizer step)",
    )
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast dtype")
    g.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="keep an EMA of the weights with this decay (e.g. 0.999): evaluated beside the raw "
        "weights, saved, resumed, and what models.load returns by default",
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the model after the first step"
    )
    g.add_argument(
        "--keep-last",
        type=int,
        default=2,
        help="step checkpoints kept beside checkpoint.pt (0: only checkpoint.pt)",
    )
    g.add_argument("--log-every", type=int, default=10, help="train_log.jsonl / TensorBoard period")
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="seconds any collective may wait for the other ranks before the run stops with an "
        "error (a dead or hung rank)",
    )
    return p


# Dataset-dependent defaults: 8x8 digits get a 2x downsampling (4x4 = 16 codes per image).
def dataset_defaults(model: str, dataset: str) -> dict:
    if dataset == "digits":
        # (VQGAN: a 1-layer PatchGAN; deeper ones shrink 8x8 inputs to nothing.)
        return {"downsample": 2} if model == "vqvae" else {"ch_mult": [1, 2], "disc_layers": 1}
    return {}


def parse_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as a dict; a VALUE that is not JSON stays a string."""
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def make_config(args, channels: int) -> dict:
    """The model config of a fresh run (``--resume`` takes the checkpoint's instead)."""
    over = dataset_defaults(args.model, args.dataset)
    over["in_channels"] = channels
    if args.codebook_size is not None:
        over["codebook_size"] = args.codebook_size
    if args.lr is not None:
        over["lr"] = args.lr
    if args.model == "vqgan":
        if args.perceptual_weight is not None:
            over["perceptual_weight"] = args.perceptual_weight
        if args.disc_start is not None:
            over["disc_start"] = args.disc_start
    over.update(parse_sets(args.set))
    maker = vqvae_config if args.model == "vqvae" else vqgan_config
    return maker(args.config, **over)


def check_scale_args(args) -> None:
    """ValueError naming the flag for out-of-range scale / fault-tolerance flags."""
    if args.grad_accum < 1:
        raise ValueError(f"--grad-accum must be >= 1, got {args.grad_accum}")
    if args.keep_last < 0:
        raise ValueError(f"--keep-last must be >= 0, got {args.keep_last}")
    if args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
