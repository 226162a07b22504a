"""Training CLI for the reference models.

    python -m models.train --model vqvae --dataset photos --out runs/quickstart --minutes 3

Writes to ``--out``:
  ``checkpoint.pt``        model + optimizer + RNG state (atomic write; safe ``weights_only`` load;
                           ``models.load`` reads it, ``--resume`` continues it exactly)
  ``metrics.json``         held-out evaluation: psnr, ssim, codebook_usage, perplexity,
                           whole_image (per photo: psnr, ssim, delta_e76/2000, bias_rgb, bpp),
                           bits_per_image (+ per held-out image), training-set perplexity/usage,
                           steps, seconds, steps_per_second, backend, perceptual
  ``config.json``          model config + training arguments
  ``reconstructions.png``  each held-out photo whole: original | VQ reconstruction | JPEG at the
                           same bpp, bpp/PSNR/ΔE under each, plus a zoomed crop row (digits:
                           tiles, originals over reconstructions)
  ``tb/``                  TensorBoard scalars and images (when tensorboard is installed)

Programmatic use: ``models.train.train(["--model", "vqvae", ...]) -> metrics dict``.
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
from .checkpoint import atomic_save, load_checkpoint
from .data import eval_groups, eval_photos, load_dataset
from .figures import reconstruction_figure
from .holdout import whole_image_metrics
from .metrics import bits_per_image, codebook_usage, perplexity, psnr, ssim
from .perceptual import PERCEPTUAL_KINDS, build_perceptual
from .progress import BudgetProgress, default_threads
from .vqgan import VQGANLoss, make_vqgan_optimizers, vqgan_config, vqgan_train_step
from .vqvae import reconstruction_loss, vqvae_config

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
        help="continue from OUT/checkpoint.pt (model config and seed come from it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
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
def evaluate(model, groups: dict[str, torch.Tensor], batch_size: int = 256) -> dict:
    """Held-out metrics of ``model`` (eval mode) on ``{name: images [N, C, S, S]}``; returns
    psnr/ssim overall (mean over tiles) and per group, codebook usage/perplexity of all held-out
    codes, bits per image, plus a few reconstructions for the PNG."""
    was = model.training
    model.eval()
    all_idx, out, recon_all, orig_all = [], {}, [], []
    k = model.codebook_size
    for name, images in groups.items():
        recs, idxs = [], []
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size]
            idx = model.encode(x)
            recs.append(model.decode_indices(idx))
            idxs.append(idx)
        rec, idx = torch.cat(recs), torch.cat(idxs)
        out[name] = {"psnr": psnr(rec, images), "ssim": ssim(rec, images), "tiles": images.shape[0]}
        all_idx.append(idx)
        recon_all.append(rec[:8])
        orig_all.append(images[:8])
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
    model.train(was)
    return res


@torch.no_grad()
def train_set_codes(model, sampler, n: int = 256, seed: int = 1234) -> dict:
    """Perplexity/usage of the codes of ``n`` fixed random training crops (own generator, so the
    training stream is untouched)."""
    g = torch.Generator().manual_seed(seed)
    x = sampler.sample(n, g)
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


def _resolved_backend(name: str) -> str:
    from vqkernels import dispatch

    return dispatch.resolve(name, torch.device("cpu"))


def train(argv: list[str] | None = None) -> dict:
    """Run the CLI with ``argv`` (a list of strings); returns the metrics dict written to
    ``OUT/metrics.json``."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif default_threads() < torch.get_num_threads():  # leave cores that others keep busy
        torch.set_num_threads(default_threads())
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, CKPT)
    backend = _resolved_backend(args.backend)  # fail early (clear message) on a bad backend
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))

    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path)
        if "train" not in ckpt:
            raise ValueError(f"{ckpt_path} holds no training state (cannot --resume)")
        saved = ckpt["train"]["args"]
        if saved["model"] != args.model or saved["dataset"] != args.dataset:
            raise ValueError(
                f"--resume: checkpoint is {saved['model']} on {saved['dataset']}, but the command "
                f"asks for {args.model} on {args.dataset}"
            )
        # The run's identity comes from the checkpoint; only steps/minutes/backend/eval/quiet
        # may change.
        for key in ("seed", "batch_size", "image_size", "config", "perceptual", "lr_schedule"):
            if key in saved:
                setattr(args, key, saved[key])
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
    groups = eval_groups(args.dataset, args.image_size)
    if args.batch_size is None:
        args.batch_size = 32 if args.model == "vqvae" else 16
    if args.perceptual is None:
        args.perceptual = "none" if args.model == "vqvae" else "auto"

    if ckpt is not None:
        model = model_from_checkpoint(ckpt, backend=args.backend)
        config = model.config
    else:
        config = _make_config(args, sampler.channels)
        model = build_model(args.model, config, backend=args.backend)
    model.train()

    perc, perc_kind = build_perceptual(args.perceptual)
    if ckpt is not None and ckpt.get("perceptual") not in (None, perc_kind):
        raise ValueError(
            f"--resume: the run used perceptual={ckpt['perceptual']!r} but now "
            f"{args.perceptual!r} resolves to {perc_kind!r} (a weight file appeared or vanished)"
        )
    vq_perc_weight = args.perceptual_weight if args.perceptual_weight is not None else 1.0
    if args.model == "vqgan":
        gan = VQGANLoss(config, perc)
        opt_g, opt_d = make_vqgan_optimizers(model, gan)
        opts = {"g": opt_g, "d": opt_d}
    else:
        gan = None
        opts = {"g": torch.optim.Adam(model.parameters(), lr=config["lr"])}

    step, elapsed_before = 0, 0.0
    if ckpt is not None:
        st = ckpt["train"]
        for name, opt in opts.items():
            opt.load_state_dict(st["optimizers"][name])
        if gan is not None:
            gan.discriminator.load_state_dict(st["discriminator"])
        torch.set_rng_state(st["rng_torch"])
        gen.set_state(st["rng_data"])
        step, elapsed_before = int(st["step"]), float(st["seconds"])
        log(f"resumed from {ckpt_path} at step {step}")

    log(
        f"model={args.model} dataset={args.dataset} config={args.config} backend={backend} "
        f"perceptual={perc_kind} batch={args.batch_size} image={args.image_size} "
        f"params={sum(p.numel() for p in model.parameters())}"
    )
    run_args = {
        k: v for k, v in vars(args).items() if k not in ("resume", "quiet", "set", "stop_after")
    }
    run_args["perceptual_resolved"] = perc_kind
    run_args["backend_resolved"] = backend
    _write_json({"model": config, "train": run_args}, os.path.join(args.out, "config.json"))
    tb = _tensorboard(args.out)

    def checkpoint(metrics: dict | None):
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
                "rng_torch": torch.get_rng_state(),
                "rng_data": gen.get_state(),
                "args": run_args,
            },
        }
        if gan is not None:
            state["train"]["discriminator"] = gan.discriminator.state_dict()
        if metrics is not None:
            state["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        atomic_save(state, ckpt_path)

    def do_eval():
        ev = evaluate(model, groups)
        tr = train_set_codes(model, sampler)
        ev["train_perplexity"], ev["train_codebook_usage"] = tr["perplexity"], tr["codebook_usage"]
        return ev

    budget = args.minutes * 60.0 if args.minutes is not None else math.inf
    base_lr = {"g": config["lr"], "d": config.get("disc_lr", config["lr"])}

    def set_lr(now: float) -> float:
        """Cosine decay to 5% of the base rate over the run's progress; returns the factor."""
        if args.lr_schedule == "constant":
            return 1.0
        prog = min(1.0, max(step / max(args.steps, 1), (now - t0) / budget))
        factor = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * prog))
        for name, opt in opts.items():
            for group in opt.param_groups:
                group["lr"] = base_lr[name] * factor
        return factor

    t0 = time.perf_counter()
    last_losses: list[float] = []
    # Counts towards what will really happen: --minutes usually stops the run long before --steps.
    bar = BudgetProgress(args.steps, args.minutes, initial_step=step, disable=args.quiet)
    steps_this_run, train_time = 0, 0.0
    history = []
    while step < args.steps and (time.perf_counter() - t0) < budget:
        if args.stop_after is not None and steps_this_run >= args.stop_after:
            break
        ts = time.perf_counter()
        set_lr(ts)
        images = sampler.sample(args.batch_size, gen)
        if gan is not None:
            out = vqgan_train_step(model, gan, opts["g"], opts["d"], images, step)
            recon, loss_v = out["recon"], out["loss"]
            rec_v = out["rec_loss"]
        else:
            recon, indices, vq_loss = model(images)
            rec = reconstruction_loss(recon, images, config.get("lab_weight", 0.0))
            loss = rec + vq_loss
            if perc_kind != "none":
                loss = loss + vq_perc_weight * perc(recon, images)
            opts["g"].zero_grad(set_to_none=True)
            loss.backward()
            opts["g"].step()
            loss_v, rec_v = float(loss.detach()), float(rec.detach())
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"loss became {loss_v} at step {step}")
        step += 1
        steps_this_run += 1
        train_time += time.perf_counter() - ts
        last_losses.append(loss_v)
        if step % 10 == 0 or step == args.steps:
            q = model.quantizer
            usage = float(getattr(q, "codebook_usage", float("nan")))
            ppl = float(getattr(q, "perplexity", float("nan")))
            tr_psnr = psnr(recon.detach(), images)
            bar.set_postfix(
                loss=f"{loss_v:.4f}",
                psnr=f"{tr_psnr:.2f}",
                usage=f"{usage:.2f}",
                ppl=f"{ppl:.0f}",
                refresh=False,
            )
            if tb is not None:
                tb.add_scalar("train/loss", loss_v, step)
                tb.add_scalar("train/rec_loss", rec_v, step)
                tb.add_scalar("train/psnr", tr_psnr, step)
                tb.add_scalar("train/codebook_usage", usage, step)
                tb.add_scalar("train/perplexity", ppl, step)
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
                f"train_ppl={ev['train_perplexity']:.0f}"
            )
            if tb is not None:
                tb.add_scalar("eval/psnr", ev["psnr"], step)
                tb.add_scalar("eval/ssim", ev["ssim"], step)
            checkpoint(ev)
    bar.close()
    seconds = time.perf_counter() - t0

    ev = do_eval()
    pairs = ev.pop("_pairs")
    metrics = {
        "psnr": ev["psnr"],
        "ssim": ev["ssim"],
        "codebook_usage": ev["codebook_usage"],
        "perplexity": ev["perplexity"],
        "bits_per_image": ev["bits_per_image"],
        "per_image": ev["per_image"],
        "train_perplexity": ev["train_perplexity"],
        "train_codebook_usage": ev["train_codebook_usage"],
        "codebook_size": model.codebook_size,
        "steps": step,
        "steps_this_run": steps_this_run,
        "seconds": elapsed_before + seconds,
        "seconds_this_run": seconds,
        "steps_per_second": steps_this_run / train_time if train_time > 0 else 0.0,
        "final_loss": last_losses[-1] if last_losses else None,
        "backend": backend,
        "perceptual": perc_kind,
        "model": args.model,
        "dataset": args.dataset,
        "config": args.config,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "history": history,
    }
    # Whole held-out photos: colour fidelity (ΔE, per-channel bias) and the picture a user sees.
    photos = eval_photos(args.dataset)
    whole = whole_image_metrics(model, photos)
    metrics["whole_image"] = whole[0]
    if "mean" in whole[0]:
        metrics["delta_e76"] = whole[0]["mean"].get("delta_e76")
    checkpoint(metrics)
    png = os.path.join(args.out, "reconstructions.png")
    if args.dataset == "digits":  # 8x8 digits: the tile strip says more than JPEG at 8x8
        save_reconstructions(pairs, png)
    else:
        metrics["jpeg_same_bpp"] = reconstruction_figure(model, photos, png, whole=whole)
    _write_json(metrics, os.path.join(args.out, "metrics.json"))
    if tb is not None:
        tb.add_scalar("eval/psnr", ev["psnr"], step)
        tb.close()
    log(
        f"done: {step} steps in {metrics['seconds']:.0f}s ({metrics['steps_per_second']:.2f} steps/s) "
        f"held-out psnr={metrics['psnr']:.2f} dB ssim={metrics['ssim']:.3f} "
        f"usage={metrics['codebook_usage']:.2f} ppl={metrics['perplexity']:.0f} "
        f"train_ppl={metrics['train_perplexity']:.0f}\n"
        + "".join(
            f"  whole {k}: psnr={v['psnr']:.2f} dB dE76={v['delta_e76']:.2f} "
            f"bias_rgb={v['bias_rgb']}\n"
            for k, v in metrics["whole_image"].items()
            if k != "mean" and "delta_e76" in v
        )
        + f"  {os.path.join(args.out, 'metrics.json')}\n  {os.path.join(args.out, 'reconstructions.png')}"
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    try:
        train(argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
