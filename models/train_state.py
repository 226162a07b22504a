"""The state of one ``models.train`` run, and how it goes into and comes back out of a checkpoint.

* :class:`TrainingRun`: everything the loop, the evaluation and the checkpoint work with, built
  once by ``models.train``; ``step``, ``cb_diff_max`` and ``t0`` change as the run goes.
* :func:`apply_resume_args`: on ``--resume`` the run's identity (seed, batch, image size, ...)
  comes from the checkpoint's recorded arguments (:func:`recorded_args` wrote them).
* :func:`restore_training_state` / :func:`save_checkpoint`: the two directions of the ``"train"``
  part of the checkpoint (optimizers, discriminator, scaler, weight EMA, every rank's RNG state),
  so that ``--resume`` continues a run exactly.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import distributed as mdist
from .checkpoint import save_rotating
from .steps import StepConfig

__all__ = [
    "CKPT",
    "TrainingRun",
    "LoopResult",
    "recorded_args",
    "apply_resume_args",
    "restore_training_state",
    "save_checkpoint",
]

CKPT = "checkpoint.pt"


@dataclass
class TrainingRun:
    """One invocation of the training CLI, set up and ready for the loop.

    ``model`` is the raw model; ``gen_model`` / ``disc_model`` are what the steps call (the DDP
    wrappers on several ranks, else ``model`` / ``gan.discriminator``).  ``gan`` is the
    :class:`models.vqgan.VQGANLoss` (None for a VQ-VAE); ``opts`` maps ``"g"`` (and ``"d"``) to
    the optimizers; ``data_gen`` draws the training crops (its state is checkpointed);
    ``groups``: the held-out tiles ``{name: [N, C, S, S]}`` on ``device``.
    """

    args: argparse.Namespace
    ctx: mdist.DistContext
    log: Callable[..., None]
    quiet: bool
    backend: str
    config: dict
    model: torch.nn.Module
    gan: torch.nn.Module | None
    opts: dict
    scaler: object | None
    ema: object | None
    perc: torch.nn.Module | None
    perc_kind: str
    sampler: object
    data_gen: torch.Generator
    groups: dict
    per_rank_batch: int
    step_cfg: StepConfig  # micro-batches, precision, device, scaler
    run_args: dict = field(default_factory=dict)
    gen_model: torch.nn.Module | None = None
    disc_model: torch.nn.Module | None = None
    tb: object | None = None
    step: int = 0
    elapsed_before: float = 0.0  # seconds trained by earlier invocations (--resume)
    cb_diff_max: float = 0.0  # largest codebook difference between ranks seen so far
    t0: float = 0.0  # time.perf_counter() when this invocation's loop started

    @property
    def device(self) -> torch.device:
        return self.ctx.device


@dataclass
class LoopResult:
    """What the training loop of one invocation reports back.

    ``stopped_by``: the signal's name when SIGTERM/SIGINT (on any rank) ended it, else None;
    ``history``: one row per periodic evaluation; ``seconds``: wall time of the loop."""

    seconds: float
    steps_this_run: int
    train_time: float  # seconds inside the steps (data loading included)
    data_time: float  # seconds drawing and moving the training crops
    last_losses: list
    history: list
    stopped_by: str | None


def recorded_args(args: argparse.Namespace) -> dict:
    """The arguments saved in config.json and the checkpoint (not the per-invocation ones)."""
    return {
        k: v for k, v in vars(args).items() if k not in ("resume", "quiet", "set", "stop_after")
    }


def apply_resume_args(args: argparse.Namespace, ckpt: dict) -> None:
    """Take the run's identity from the checkpoint's recorded arguments (in place).

    ValueError when the command asks for another model or dataset than the checkpoint holds."""
    saved = ckpt["train"]["args"]
    if saved["model"] != args.model or saved["dataset"] != args.dataset:
        raise ValueError(
            f"--resume: checkpoint is {saved['model']} on {saved['dataset']}, but the command "
            f"asks for {args.model} on {args.dataset}"
        )
    # The run's identity comes from the checkpoint; only steps/minutes/backend/eval/quiet
    # (and how it is spread: world size, --grad-accum, --device) may change.
    for key in ("seed", "batch_size", "image_size", "config", "perceptual", "lr_schedule"):
        if key in saved:
            setattr(args, key, saved[key])
    if saved.get("ema_decay") is not None:
        args.ema_decay = saved["ema_decay"]
    args.colour_aug = saved.get("colour_aug", args.colour_aug)


def restore_training_state(run: TrainingRun, ckpt: dict, ckpt_path: str) -> None:
    """Load optimizers, discriminator, scaler, weight EMA, RNG states, step and elapsed time
    from ``ckpt`` into ``run`` (before the DDP wrappers are made)."""
    ctx, log = run.ctx, run.log
    st = ckpt["train"]
    for name, opt in run.opts.items():
        opt.load_state_dict(st["optimizers"][name])
    if run.gan is not None:
        run.gan.discriminator.load_state_dict(st["discriminator"])
    if run.scaler is not None and st.get("scaler"):
        run.scaler.load_state_dict(st["scaler"])
    if run.ema is not None:
        if "ema_model" in ckpt:
            run.ema.load_state_dict(ckpt["ema_model"])
        else:
            log("--ema-decay: the checkpoint has no weight EMA; starting it from its weights")
    ranks = st.get("rng_torch_ranks", [st["rng_torch"]])
    if len(ranks) != ctx.world_size:
        log(
            f"warning: resuming a {len(ranks)}-rank run on {ctx.world_size} ranks: the data "
            f"stream continues exactly, per-rank random streams do not"
        )
    if ctx.rank < len(ranks):
        torch.set_rng_state(ranks[ctx.rank])
    cuda_ranks = st.get("rng_cuda_ranks")
    if run.device.type == "cuda" and cuda_ranks and ctx.rank < len(cuda_ranks):
        torch.cuda.set_rng_state(cuda_ranks[ctx.rank], run.device)
    run.data_gen.set_state(st["rng_data"])
    run.step, run.elapsed_before = int(st["step"]), float(st["seconds"])
    run.cb_diff_max = float(st.get("codebook_rank_max_abs_diff", 0.0))
    log(f"resumed from {ckpt_path} at step {run.step}")


def save_checkpoint(run: TrainingRun, metrics: dict | None) -> None:
    """Every rank calls this (it gathers every rank's RNG state); rank 0 writes
    ``OUT/checkpoint.pt`` (+ the rotated step checkpoints); ``metrics``: its numbers are kept."""
    ctx, device, args = run.ctx, run.device, run.args
    rng_ranks = mdist.gather_objects(torch.get_rng_state(), ctx)
    cuda_ranks = (
        mdist.gather_objects(torch.cuda.get_rng_state(device), ctx)
        if device.type == "cuda"
        else None
    )
    mdist.barrier(ctx, "barrier before the checkpoint")
    if ctx.is_main:
        state = {
            "format": "vqkernels-models",
            "version": 1,
            "model_type": args.model,
            "config": run.config,
            "model": run.model.state_dict(),
            "perceptual": run.perc_kind,
            "train": {
                "step": run.step,
                "seconds": run.elapsed_before + (time.perf_counter() - run.t0),
                "optimizers": {k: o.state_dict() for k, o in run.opts.items()},
                "rng_torch": rng_ranks[0],
                "rng_torch_ranks": rng_ranks,
                "rng_data": run.data_gen.get_state(),
                "args": run.run_args,
                "world_size": ctx.world_size,
                "codebook_rank_max_abs_diff": run.cb_diff_max,
            },
        }
        if cuda_ranks is not None:
            state["train"]["rng_cuda_ranks"] = cuda_ranks
        if run.scaler is not None:
            state["train"]["scaler"] = run.scaler.state_dict()
        if run.ema is not None:
            state["ema_model"] = run.ema.state_dict()
        if run.gan is not None:
            state["train"]["discriminator"] = run.gan.discriminator.state_dict()
        if metrics is not None:
            state["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        save_rotating(state, args.out, run.step, args.keep_last, CKPT)
    mdist.barrier(ctx, "barrier after the checkpoint")
