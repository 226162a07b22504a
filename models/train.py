"""Training CLI for the reference models.

    python -m models.train --model vqvae --dataset photos --out runs/quickstart --minutes 3
    torchrun --standalone --nproc_per_node=2 -m models.train ...     # same command, N processes

Writes to ``--out`` (rank 0):
  ``checkpoint.pt``        model (+ weight EMA) + optimizers + scaler + every rank's RNG state
                           (atomic write; safe ``weights_only`` load; ``models.load`` reads it,
                           ``--resume`` continues it exactly); the newest of the
                           ``checkpoint-step*.pt`` kept by ``--keep-last``
  ``train_log.jsonl``      every --log-every steps: global loss, lr, grad norm, images/s, data time
  ``metrics.json``         held-out evaluation: psnr, ssim, codebook_usage, perplexity,
                           bits_per_image (+ per held-out image), training-set perplexity/usage,
                           steps, seconds, steps_per_second, backend, perceptual, world_size,
                           global_batch_size, codebook_rank_max_abs_diff, images_per_second,
                           whole_image (per photo: psnr, ssim, delta_e76/2000, bias_rgb, bpp),
                           delta_e76 (mean over whole photos), jpeg_same_bpp
  ``config.json``          model config + training arguments
  ``reconstructions.png``  each held-out photo whole: original | VQ reconstruction | JPEG at the
                           same bpp, bpp/PSNR/ΔE under each, plus a zoomed crop row (digits:
                           tiles, originals over reconstructions)
  ``tb/``                  TensorBoard scalars and images (when tensorboard is installed)

Programmatic use: ``models.train.train(["--model", "vqvae", ...]) -> metrics dict`` (inside an
already initialized process group, every rank calls it; the group is left open).

Distributed training (see ``models/distributed.py``): ``--batch-size`` is the global batch, each
rank trains on its slice of it, gradients are averaged by DDP, the VQ layer all-reduces its EMA
statistics (one codebook on every rank), rank 0 writes the outputs.

Layout (one seam a module): ``train_args`` (flags, model config), ``train_state`` (the run's
state; checkpoint and ``--resume``), ``train_loop`` (the loop), ``train_eval`` (evaluation and
reporting), ``steps`` (one optimizer step), ``training`` (weight EMA, accumulation, precision);
this module sets a run up from the flags and hands it to the loop.
"""

from __future__ import annotations

import os
import sys

import torch

from . import build_model, model_from_checkpoint
from . import distributed as mdist
from .checkpoint import atomic_write_json, load_for_resume
from .cli import exit_status
from .data import eval_groups, load_dataset
from .perceptual import build_perceptual
from .progress import default_threads
from .steps import StepConfig, vqgan_step, vqvae_step
from .train_args import build_parser, check_scale_args, make_config, parse_sets
from .train_eval import (  # noqa: F401  (re-exported: models.train.evaluate & co.)
    evaluate,
    finish_run,
    open_tensorboard,
    save_reconstructions,
    start_message,
    train_set_codes,
)
from .train_loop import run_loop
from .train_state import (
    CKPT,
    TrainingRun,
    apply_resume_args,
    recorded_args,
    restore_training_state,
    save_checkpoint,
)
from .training import WeightEMA, discriminator_norm_for_ranks, make_grad_scaler
from .vqgan import VQGANLoss, make_vqgan_optimizers

__all__ = ["train", "main", "build_parser", "evaluate"]


def _resolved_backend(name: str, device: torch.device | None = None) -> str:
    from vqkernels import dispatch

    return dispatch.resolve(name, device if device is not None else torch.device("cpu"))


def train(argv: list[str] | None = None) -> dict:
    """Run the CLI with ``argv`` (a list of strings); returns the metrics dict written to
    ``OUT/metrics.json`` (after SIGTERM/SIGINT: ``{"stopped_by": ..., "steps": ...}``).  Under
    torchrun every rank runs this; a process group opened here is closed on return."""
    args = build_parser().parse_args(argv)
    check_scale_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif default_threads() < torch.get_num_threads():  # leave cores that others keep busy
        torch.set_num_threads(default_threads())
    ctx = mdist.setup(args.device, args.dist_timeout)
    try:
        return _train(args, ctx)
    except RuntimeError as exc:
        # A collective inside the step (DDP's gradient all-reduce, the layer's EMA all-reduce)
        # failed: a peer died or timed out.  Say so instead of a backend traceback.
        if ctx.enabled and not isinstance(exc, mdist.PeerLostError) and mdist.is_comm_failure(exc):
            raise mdist.peer_lost(ctx, "a collective in the training step", exc) from None
        raise
    finally:
        mdist.teardown(ctx)


def _train(args, ctx) -> dict:
    """Set the run up (data, model, losses, optimizers, ``--resume``), run the loop, report."""
    os.makedirs(args.out, exist_ok=True)
    device = ctx.device
    backend = _resolved_backend(args.backend, device)  # fail early (clear message) on a bad backend
    quiet = args.quiet or not ctx.is_main
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))

    ckpt = None
    if args.resume:
        ckpt = load_for_resume(args.out, CKPT, ctx)
        ckpt_path = ckpt.pop("_path")
        apply_resume_args(args, ckpt)

    seed = args.seed
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sampler = load_dataset(
        args.dataset, "train", args.image_size, seed=seed, colour_aug=args.colour_aug
    )
    args.image_size = (
        args.image_size or sampler.size if hasattr(sampler, "size") else args.image_size
    )
    groups = {k: v.to(device) for k, v in eval_groups(args.dataset, args.image_size).items()}
    if args.batch_size is None:
        args.batch_size = 32 if args.model == "vqvae" else 16
    lo, hi = mdist.local_slice(args.batch_size, ctx)  # ValueError unless divisible
    if (hi - lo) % args.grad_accum:
        raise ValueError(
            f"the per-rank batch {hi - lo} (--batch-size {args.batch_size} / world size "
            f"{ctx.world_size}) must be divisible by --grad-accum {args.grad_accum}"
        )
    if args.perceptual is None:
        args.perceptual = "none" if args.model == "vqvae" else "auto"

    if ckpt is not None:
        model = model_from_checkpoint(ckpt, backend=args.backend)
        config = model.config
        sync_bn = args.model == "vqgan" and discriminator_norm_for_ranks(config, True, ctx, log)
    else:
        config = make_config(args, sampler.channels)
        sync_bn = args.model == "vqgan" and discriminator_norm_for_ranks(
            config, "disc_norm" in parse_sets(args.set), ctx, log
        )
        model = build_model(args.model, config, backend=args.backend)
    model.to(device).train()
    if ctx.rank > 0:
        # Each rank its own stream for what is random per rank (dropout, k-means seeding draws
        # that rank 0's broadcast overrides); rank 0 keeps the single-process stream.
        torch.manual_seed((seed + 1) * 1_000_003 + ctx.rank)

    perc, perc_kind = build_perceptual(args.perceptual)
    if ckpt is not None and ckpt.get("perceptual") not in (None, perc_kind):
        raise ValueError(
            f"--resume: the run used perceptual={ckpt['perceptual']!r} but now "
            f"{args.perceptual!r} resolves to {perc_kind!r} (a weight file appeared or vanished)"
        )
    if perc is not None and hasattr(perc, "to"):
        perc = perc.to(device)
    vq_perc_weight = args.perceptual_weight if args.perceptual_weight is not None else 1.0
    if args.model == "vqgan":
        gan = VQGANLoss(config, perc).to(device)
        if sync_bn:
            gan.discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(gan.discriminator)
        opt_g, opt_d = make_vqgan_optimizers(model, gan)
        opts = {"g": opt_g, "d": opt_d}
    else:
        gan = None
        opts = {"g": torch.optim.Adam(model.parameters(), lr=config["lr"])}
    scaler = make_grad_scaler(args.precision, device)
    run = TrainingRun(
        args=args,
        ctx=ctx,
        log=log,
        quiet=quiet,
        backend=backend,
        config=config,
        model=model,
        gan=gan,
        opts=opts,
        scaler=scaler,
        ema=WeightEMA(model, args.ema_decay) if args.ema_decay is not None else None,
        perc=perc,
        perc_kind=perc_kind,
        sampler=sampler,
        data_gen=gen,
        groups=groups,
        per_rank_batch=hi - lo,
        step_cfg=StepConfig(args.grad_accum, args.precision, device, scaler),
    )
    if ckpt is not None:
        restore_training_state(run, ckpt, ckpt_path)

    run.gen_model, run.disc_model = model, (gan.discriminator if gan is not None else None)
    if ctx.enabled:
        run.gen_model = mdist.wrap_ddp(model, ctx)
        if gan is not None:
            run.disc_model = mdist.wrap_ddp(gan.discriminator, ctx)

    log(start_message(run))
    run.run_args = recorded_args(args)
    run.run_args["perceptual_resolved"] = perc_kind
    run.run_args["backend_resolved"] = backend
    run.run_args["world_size"] = ctx.world_size
    if ctx.is_main:
        atomic_write_json(
            {"model": config, "train": run.run_args}, os.path.join(args.out, "config.json")
        )
    run.tb = open_tensorboard(args.out) if ctx.is_main else None

    # The step functions are looked up here, at call time, so that a test may swap them.
    def one_step(step_model, images, step: int) -> dict:
        if gan is not None:
            return vqgan_step(
                step_model, run.disc_model, gan, opts["g"], opts["d"], images, step, run.step_cfg
            )
        return vqvae_step(
            step_model,
            opts["g"],
            images,
            run.step_cfg,
            perc if perc_kind != "none" else None,
            vq_perc_weight,
            config.get("lab_weight", 0.0),
        )

    loop = run_loop(run, one_step)
    if loop.stopped_by is not None:
        # Stop quickly (a launcher may follow SIGTERM with SIGKILL): checkpoint, no evaluation.
        save_checkpoint(run, None)
        log(
            f"stopped by {loop.stopped_by} after step {run.step} on all {ctx.world_size} "
            f"rank(s); checkpoint written: continue with --resume"
        )
        if run.tb is not None:
            run.tb.close()
        return {"stopped_by": loop.stopped_by, "steps": run.step, "world_size": ctx.world_size}
    return finish_run(run, loop)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: 0; 2 after a user error; 1 when training itself failed (non-finite
    loss, lost peer).  Errors print one line, no traceback."""
    return exit_status(lambda: train(argv), failures=(FloatingPointError, mdist.PeerLostError))


if __name__ == "__main__":
    sys.exit(main())
