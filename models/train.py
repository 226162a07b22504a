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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from . import build_model, model_from_checkpoint
from . import distributed as mdist
from .checkpoint import load_for_resume, save_rotating
from .data import eval_groups, eval_photos, load_dataset
from .figures import reconstruction_figure
from .holdout import whole_image_metrics
from .metrics import bits_per_image, codebook_usage, perplexity, psnr, ssim
from .perceptual import PERCEPTUAL_KINDS, build_perceptual
from .progress import BudgetProgress, default_threads
from .steps import StepConfig, init_codebooks_eagerly, unwrap, vqgan_step, vqvae_step
from .training import (
    PRECISIONS,
    WeightEMA,
    discriminator_norm_for_ranks,
    make_grad_scaler,
    vector_quantizers,
)
from .vqgan import VQGANLoss, make_vqgan_optimizers, vqgan_config
from .vqvae import vqvae_config

__all__ = ["train", "main", "build_parser", "evaluate"]

CKPT = "checkpoint.pt"


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
def _dataset_defaults(model: str, dataset: str) -> dict:
    if dataset == "digits":
        # (VQGAN: a 1-layer PatchGAN; deeper ones shrink 8x8 inputs to nothing.)
        return {"downsample": 2} if model == "vqvae" else {"ch_mult": [1, 2], "disc_layers": 1}
    return {}


def _parse_sets(items: list[str]) -> dict:
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


def _make_config(args, channels: int) -> dict:
    over = _dataset_defaults(args.model, args.dataset)
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
    over.update(_parse_sets(args.set))
    maker = vqvae_config if args.model == "vqvae" else vqgan_config
    return maker(args.config, **over)


@torch.no_grad()
def evaluate(
    model, groups: dict[str, torch.Tensor], batch_size: int = 256, ctx=None, perceptual=None
) -> dict:
    """Held-out metrics of ``model`` (eval mode) on ``{name: images [N, C, S, S]}``; returns
    psnr/ssim overall (mean over tiles) and per group, codebook usage/perplexity of all held-out
    codes, bits per image, plus a few reconstructions for the PNG.

    Distributed (``ctx`` with several ranks): each rank reconstructs its block of every group
    (padded to equal blocks by repeating the last tile), the blocks are gathered in rank order and
    the padding dropped, so every rank computes the metrics of exactly the whole set.
    ``perceptual``: a ``(recon, target) -> []`` module; adds ``perceptual_distance`` (its mean
    over the tiles, overall and per group)."""
    was = model.training
    model.eval()
    all_idx, out, recon_all, orig_all = [], {}, [], []
    k = model.codebook_size
    sharded = ctx is not None and ctx.enabled
    for name, images in groups.items():
        recs, idxs = [], []
        local = mdist.pad_shard(images, ctx) if sharded else images
        for i in range(0, local.shape[0], batch_size):
            x = local[i : i + batch_size]
            idx = model.encode(x)
            recs.append(model.decode_indices(idx))
            idxs.append(idx)
        rec, idx = torch.cat(recs), torch.cat(idxs)
        if sharded:
            rec = mdist.gather_rows(rec, images.shape[0], ctx)
            idx = mdist.gather_rows(idx, images.shape[0], ctx)
        out[name] = {"psnr": psnr(rec, images), "ssim": ssim(rec, images), "tiles": images.shape[0]}
        if perceptual is not None:
            dist_sum = sum(
                float(perceptual(rec[i : i + batch_size], images[i : i + batch_size]))
                * rec[i : i + batch_size].shape[0]
                for i in range(0, rec.shape[0], batch_size)
            )
            out[name]["perceptual_distance"] = dist_sum / max(images.shape[0], 1)
        all_idx.append(idx)
        recon_all.append(rec[:8].cpu())
        orig_all.append(images[:8].cpu())
    idx = torch.cat([i.reshape(-1) for i in all_idx])
    n = sum(v["tiles"] for v in out.values())
    res = {
        "psnr": sum(v["psnr"] * v["tiles"] for v in out.values()) / n,
        "ssim": sum(v["ssim"] * v["tiles"] for v in out.values()) / n,
        "codebook_usage": codebook_usage(idx, k),
        "perplexity": perplexity(idx, k),
        "bits_per_image": bits_per_image(all_idx[0], k),
        "per_image": out,
        "_pairs": (orig_all, recon_all),
    }
    if perceptual is not None:
        res["perceptual_distance"] = (
            sum(v["perceptual_distance"] * v["tiles"] for v in out.values()) / n
        )
    model.train(was)
    return res


@torch.no_grad()
def train_set_codes(model, sampler, n: int = 256, seed: int = 1234, device=None) -> dict:
    """Perplexity/usage of the codes of ``n`` fixed random training crops (own generator, so the
    training stream is untouched)."""
    g = torch.Generator().manual_seed(seed)
    x = sampler.sample(n, g)
    if device is not None:
        x = x.to(device)
    idx = torch.cat([model.encode(x[i : i + 128]) for i in range(0, n, 128)])
    k = model.codebook_size
    return {"perplexity": perplexity(idx, k), "codebook_usage": codebook_usage(idx, k)}


def save_reconstructions(pairs, path: str, scale: int | None = None) -> None:
    """PNG grid: for each held-out group a row of originals above a row of reconstructions."""
    from PIL import Image

    orig_all, recon_all = pairs
    rows = []

    def strip(batch):  # tiles side by side, each followed by a 1-pixel mid-grey separator
        return torch.cat([torch.nn.functional.pad(t, (0, 1, 0, 1), value=0.5) for t in batch], -1)

    for o, r in zip(orig_all, recon_all):
        rows += [strip(o), strip(r)]
    width = max(r.shape[-1] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows]
    grid = torch.cat(rows, dim=-2)  # [C, H, W]
    if scale is None:
        scale = (
            max(1, 256 // max(1, orig_all[0].shape[-1] * 2)) if orig_all[0].shape[-1] < 32 else 2
        )
    grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    arr = (grid.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    tmp = path + ".tmp.png"
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def _write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: scalars only go to metrics.json
        return None
    return SummaryWriter(os.path.join(out, "tb"))


def _resolved_backend(name: str, device: torch.device | None = None) -> str:
    from vqkernels import dispatch

    return dispatch.resolve(name, device if device is not None else torch.device("cpu"))


def _check_scale_args(args) -> None:
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


def train(argv: list[str] | None = None) -> dict:
    """Run the CLI with ``argv`` (a list of strings); returns the metrics dict written to
    ``OUT/metrics.json`` (after SIGTERM/SIGINT: ``{"stopped_by": ..., "steps": ...}``).  Under
    torchrun every rank runs this; a process group opened here is closed on return."""
    args = build_parser().parse_args(argv)
    _check_scale_args(args)
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
    os.makedirs(args.out, exist_ok=True)
    device = ctx.device
    backend = _resolved_backend(args.backend, device)  # fail early (clear message) on a bad backend
    quiet = args.quiet or not ctx.is_main
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))

    ckpt = None
    if args.resume:
        ckpt = load_for_resume(args.out, CKPT, ctx)
        ckpt_path = ckpt.pop("_path")
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
        config = _make_config(args, sampler.channels)
        sync_bn = args.model == "vqgan" and discriminator_norm_for_ranks(
            config, "disc_norm" in _parse_sets(args.set), ctx, log
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
    ema = WeightEMA(model, args.ema_decay) if args.ema_decay is not None else None

    step, elapsed_before, cb_diff_before = 0, 0.0, 0.0
    if ckpt is not None:
        st = ckpt["train"]
        for name, opt in opts.items():
            opt.load_state_dict(st["optimizers"][name])
        if gan is not None:
            gan.discriminator.load_state_dict(st["discriminator"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        if ema is not None:
            if "ema_model" in ckpt:
                ema.load_state_dict(ckpt["ema_model"])
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
        if device.type == "cuda" and cuda_ranks and ctx.rank < len(cuda_ranks):
            torch.cuda.set_rng_state(cuda_ranks[ctx.rank], device)
        gen.set_state(st["rng_data"])
        step, elapsed_before = int(st["step"]), float(st["seconds"])
        cb_diff_before = float(st.get("codebook_rank_max_abs_diff", 0.0))
        log(f"resumed from {ckpt_path} at step {step}")

    gen_model, disc_model = model, (gan.discriminator if gan is not None else None)
    if ctx.enabled:
        gen_model = mdist.wrap_ddp(model, ctx)
        if gan is not None:
            disc_model = mdist.wrap_ddp(gan.discriminator, ctx)
    step_cfg = StepConfig(args.grad_accum, args.precision, device, scaler)
    # k-means runs eagerly inside the first training forward; with micro-batches or a compiled
    # model it runs once beforehand on the rank's whole batch instead (same data, same draws).
    pre_init = args.grad_accum > 1 or args.compile

    micro = (hi - lo) // args.grad_accum
    log(
        f"model={args.model} dataset={args.dataset} config={args.config} backend={backend} "
        f"device={device} perceptual={perc_kind} image={args.image_size} "
        f"params={sum(p.numel() for p in model.parameters())}\n"
        f"world_size={ctx.world_size} global_batch={args.batch_size} per_rank_batch={hi - lo} "
        f"grad_accum={args.grad_accum} (micro-batch {micro}) precision={args.precision} "
        f"lr={config['lr']:g}"
        + (f" disc_lr={config['disc_lr']:g}" if gan is not None else "")
        + (f" ema_decay={args.ema_decay}" if ema is not None else "")
    )
    run_args = {
        k: v for k, v in vars(args).items() if k not in ("resume", "quiet", "set", "stop_after")
    }
    run_args["perceptual_resolved"] = perc_kind
    run_args["backend_resolved"] = backend
    run_args["world_size"] = ctx.world_size
    if ctx.is_main:
        _write_json({"model": config, "train": run_args}, os.path.join(args.out, "config.json"))
    tb = _tensorboard(args.out) if ctx.is_main else None
    cb_diff_max = cb_diff_before

    def checkpoint(metrics: dict | None):
        """Every rank calls this (it gathers every rank's RNG state); rank 0 writes."""
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
                "config": config,
                "model": model.state_dict(),
                "perceptual": perc_kind,
                "train": {
                    "step": step,
                    "seconds": elapsed_before + (time.perf_counter() - t0),
                    "optimizers": {k: o.state_dict() for k, o in opts.items()},
                    "rng_torch": rng_ranks[0],
                    "rng_torch_ranks": rng_ranks,
                    "rng_data": gen.get_state(),
                    "args": run_args,
                    "world_size": ctx.world_size,
                    "codebook_rank_max_abs_diff": cb_diff_max,
                },
            }
            if cuda_ranks is not None:
                state["train"]["rng_cuda_ranks"] = cuda_ranks
            if scaler is not None:
                state["train"]["scaler"] = scaler.state_dict()
            if ema is not None:
                state["ema_model"] = ema.state_dict()
            if gan is not None:
                state["train"]["discriminator"] = gan.discriminator.state_dict()
            if metrics is not None:
                state["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            save_rotating(state, args.out, step, args.keep_last, CKPT)
        mdist.barrier(ctx, "barrier after the checkpoint")

    def do_eval(net=None):
        nonlocal cb_diff_max
        net = model if net is None else net
        ev = evaluate(net, groups, ctx=ctx, perceptual=perc if perc_kind != "none" else None)
        tr = train_set_codes(net, sampler, device=device)
        ev["train_perplexity"], ev["train_codebook_usage"] = tr["perplexity"], tr["codebook_usage"]
        if net is model:
            for q in vector_quantizers(model):
                diff = mdist.rank_max_abs_diff(q.codebook, ctx)
                # max() would drop a NaN (every comparison with it is False): keep it visible
                cb_diff_max = diff if math.isnan(diff) else max(cb_diff_max, diff)
        return ev

    budget = args.minutes * 60.0 if args.minutes is not None else math.inf
    base_lr = {"g": config["lr"], "d": config.get("disc_lr", config["lr"])}

    def set_lr(elapsed: float) -> float:
        """Cosine decay to 5% of the base rate over the run's progress; returns the factor.
        ``elapsed`` is agreed by all ranks (the largest), so every rank uses the same rate."""
        if args.lr_schedule == "constant":
            return 1.0
        prog = min(1.0, max(step / max(args.steps, 1), elapsed / budget))
        factor = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * prog))
        for name, opt in opts.items():
            for group in opt.param_groups:
                group["lr"] = base_lr[name] * factor
        return factor

    t0 = time.perf_counter()
    last_losses: list[float] = []
    # Counts towards what will really happen: --minutes usually stops the run long before --steps.
    # Main rank only (the others are quiet); silent without tqdm.
    bar = BudgetProgress(args.steps, args.minutes, initial_step=step, disable=quiet)
    steps_this_run, train_time, data_time = 0, 0.0, 0.0
    history = []
    nonfinite: tuple[int, float] | None = None
    stopped_by = None
    compiled = None
    log_path = os.path.join(args.out, "train_log.jsonl")
    agreement = mdist.StepAgreement(ctx)
    with agreement:
        while True:
            stop, bad, elapsed = agreement.agree(nonfinite is not None, time.perf_counter() - t0)
            if bad:
                where = (
                    f"loss became {nonfinite[1]} at step {nonfinite[0]} on rank {ctx.rank}"
                    if nonfinite is not None
                    else f"another rank's loss became non-finite at step {step}"
                )
                raise FloatingPointError(
                    f"{where}: training stopped on every rank (the last checkpoint is intact); "
                    f"try a lower --lr or --precision fp32/bf16"
                )
            if stop:
                stopped_by = agreement.signal_name or "a signal on another rank"
                break
            if step >= args.steps or elapsed >= budget:
                break
            if args.stop_after is not None and steps_this_run >= args.stop_after:
                break
            ts = time.perf_counter()
            lr_factor = set_lr(elapsed)
            images = mdist.sample_shard(sampler, args.batch_size, gen, ctx).to(device)
            data_time += time.perf_counter() - ts
            if pre_init:
                init_codebooks_eagerly(model, images, step_cfg)
            step_model = compiled if compiled is not None else gen_model
            if gan is not None:
                out = vqgan_step(
                    step_model, disc_model, gan, opts["g"], opts["d"], images, step, step_cfg
                )
            else:
                out = vqvae_step(
                    step_model,
                    opts["g"],
                    images,
                    step_cfg,
                    perc if perc_kind != "none" else None,
                    vq_perc_weight,
                    config.get("lab_weight", 0.0),
                )
            if args.compile and compiled is None:
                compiled = torch.compile(gen_model)
            if ema is not None:
                ema.update(model)
            recon, loss_v, rec_v = out["recon"], out["loss"], out["rec_loss"]
            if not math.isfinite(loss_v) and nonfinite is None:
                nonfinite = (step + 1, loss_v)
            step += 1
            steps_this_run += 1
            train_time += time.perf_counter() - ts
            last_losses.append(loss_v)
            if step % args.log_every == 0 or step == args.steps:
                loss_g, rec_g = mdist.all_reduce_mean([loss_v, rec_v], ctx)
                q = unwrap(model).quantizer
                usage = float(getattr(q, "codebook_usage", float("nan")))
                ppl = float(getattr(q, "perplexity", float("nan")))
                tr_psnr = psnr(recon.detach(), images)
                ips = args.batch_size * steps_this_run / train_time if train_time > 0 else 0.0
                row = {
                    "step": step,
                    "loss": loss_g,
                    "rec_loss": rec_g,
                    "lr_factor": lr_factor,
                    "grad_norm": out["grad_norm"],
                    "images_per_second": ips,
                    "data_seconds": data_time,
                    "codebook_usage": usage,
                    "perplexity": ppl,
                }
                if ctx.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(
                    loss=f"{loss_g:.4f}",
                    psnr=f"{tr_psnr:.2f}",
                    usage=f"{usage:.2f}",
                    ppl=f"{ppl:.0f}",
                    img_s=f"{ips:.0f}",
                    refresh=False,
                )
                if tb is not None:
                    tb.add_scalar("train/loss", loss_g, step)
                    tb.add_scalar("train/rec_loss", rec_g, step)
                    tb.add_scalar("train/psnr", tr_psnr, step)
                    tb.add_scalar("train/codebook_usage", usage, step)
                    tb.add_scalar("train/perplexity", ppl, step)
                    tb.add_scalar("train/grad_norm", out["grad_norm"], step)
                    tb.add_scalar("train/images_per_second", ips, step)
            bar.update(step)
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                ev = do_eval()
                history.append(
                    {
                        "step": step,
                        "psnr": ev["psnr"],
                        "perplexity": ev["perplexity"],
                        "train_perplexity": ev["train_perplexity"],
                        "per_image_psnr": {k: v["psnr"] for k, v in ev["per_image"].items()},
                    }
                )
                per = " ".join(f"{k}={v['psnr']:.2f}" for k, v in ev["per_image"].items())
                log(
                    f"\n[eval step {step}] psnr={ev['psnr']:.2f} ({per}) ssim={ev['ssim']:.3f} "
                    f"usage={ev['codebook_usage']:.2f} ppl={ev['perplexity']:.0f} "
                    f"train_ppl={ev['train_perplexity']:.0f} codebook_rank_diff={cb_diff_max:g}"
                )
                if tb is not None:
                    tb.add_scalar("eval/psnr", ev["psnr"], step)
                    tb.add_scalar("eval/ssim", ev["ssim"], step)
                checkpoint(ev)
    bar.close()
    seconds = time.perf_counter() - t0

    if stopped_by is not None:
        # Stop quickly (a launcher may follow SIGTERM with SIGKILL): checkpoint, no evaluation.
        checkpoint(None)
        log(
            f"stopped by {stopped_by} after step {step} on all {ctx.world_size} rank(s); "
            f"checkpoint written: continue with --resume"
        )
        if tb is not None:
            tb.close()
        return {"stopped_by": stopped_by, "steps": step, "world_size": ctx.world_size}

    ev = do_eval()
    pairs = ev.pop("_pairs")
    metrics = {
        "psnr": ev["psnr"],
        "ssim": ev["ssim"],
        "codebook_usage": ev["codebook_usage"],
        "perplexity": ev["perplexity"],
        "bits_per_image": ev["bits_per_image"],
        "perceptual_distance": ev.get("perceptual_distance"),
        "per_image": ev["per_image"],
        "train_perplexity": ev["train_perplexity"],
        "train_codebook_usage": ev["train_codebook_usage"],
        "codebook_size": model.codebook_size,
        "steps": step,
        "steps_this_run": steps_this_run,
        "seconds": elapsed_before + seconds,
        "seconds_this_run": seconds,
        "steps_per_second": steps_this_run / train_time if train_time > 0 else 0.0,
        "images_per_second": (
            args.batch_size * steps_this_run / train_time if train_time > 0 else 0.0
        ),
        "data_seconds_this_run": data_time,
        "final_loss": last_losses[-1] if last_losses else None,
        "backend": backend,
        "perceptual": perc_kind,
        "model": args.model,
        "dataset": args.dataset,
        "config": args.config,
        "batch_size": args.batch_size,
        "global_batch_size": args.batch_size,
        "per_rank_batch_size": hi - lo,
        "world_size": ctx.world_size,
        "grad_accum": args.grad_accum,
        "precision": args.precision,
        "codebook_rank_max_abs_diff": cb_diff_max,
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "history": history,
    }
    if ema is not None:
        ev_ema = do_eval(ema.model)
        metrics["ema"] = {
            k: ev_ema[k]
            for k in ("psnr", "ssim", "codebook_usage", "perplexity", "train_perplexity")
        }
        metrics["ema"]["decay"] = ema.decay
    png = os.path.join(args.out, "reconstructions.png")
    if ctx.is_main:
        # Whole held-out photos (rank 0 alone: a handful of images, the others wait in the
        # checkpoint's gather): colour fidelity (ΔE, per-channel bias) and the picture a user sees.
        photos = eval_photos(args.dataset)
        whole_metrics, whole_recs = whole_image_metrics(
            model, {k: v.to(device) for k, v in photos.items()}
        )
        whole_recs = {k: (rec.cpu(), idx.cpu()) for k, (rec, idx) in whole_recs.items()}
        metrics["whole_image"] = whole_metrics
        if "mean" in whole_metrics:
            metrics["delta_e76"] = whole_metrics["mean"].get("delta_e76")
    checkpoint(metrics)
    if ctx.is_main:
        if args.dataset == "digits":  # 8x8 digits: the tile strip says more than JPEG at 8x8
            save_reconstructions(pairs, png)
        else:
            metrics["jpeg_same_bpp"] = reconstruction_figure(
                model, photos, png, whole=(whole_metrics, whole_recs)
            )
        _write_json(metrics, os.path.join(args.out, "metrics.json"))
    if tb is not None:
        tb.add_scalar("eval/psnr", ev["psnr"], step)
        tb.close()
    log(
        f"done: {step} steps in {metrics['seconds']:.0f}s ({metrics['steps_per_second']:.2f} steps/s, "
        f"{metrics['images_per_second']:.0f} images/s on {ctx.world_size} rank(s)) "
        f"held-out psnr={metrics['psnr']:.2f} dB ssim={metrics['ssim']:.3f} "
        f"usage={metrics['codebook_usage']:.2f} ppl={metrics['perplexity']:.0f} "
        f"train_ppl={metrics['train_perplexity']:.0f} "
        f"codebook_rank_max_abs_diff={cb_diff_max:g}"
        + (f" ema_psnr={metrics['ema']['psnr']:.2f}" if ema is not None else "")
        + "\n"
        + "".join(
            f"  whole {k}: psnr={v['psnr']:.2f} dB dE76={v['delta_e76']:.2f} "
            f"bias_rgb={v['bias_rgb']}\n"
            for k, v in metrics.get("whole_image", {}).items()
            if k != "mean" and "delta_e76" in v
        )
        + f"  {os.path.join(args.out, 'metrics.json')}\n  {png}"
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    try:
        train(argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FloatingPointError, mdist.PeerLostError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
