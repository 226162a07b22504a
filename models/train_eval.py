"""Evaluation and reporting of a ``models.train`` run.

* :func:`evaluate`: held-out tiled metrics (PSNR/SSIM, codebook usage, perplexity, bits per
  image), sharded over the ranks; :func:`train_set_codes`: code statistics of fixed training crops.
* :func:`evaluate_run`: both, plus the largest codebook difference between the ranks.
* :func:`start_message` / :func:`finish_run`: what the run prints at its start, and its end: the
  final evaluation (raw and EMA weights, whole held-out photos), the last checkpoint,
  ``metrics.json``, ``reconstructions.png`` and the summary line.
"""

from __future__ import annotations

import math
import os

import torch

from . import distributed as mdist
from .checkpoint import atomic_write_json
from .data import eval_photos
from .figures import reconstruction_figure
from .holdout import whole_image_metrics
from .metrics import bits_per_image, codebook_usage, perplexity, psnr, ssim
from .train_state import LoopResult, TrainingRun, save_checkpoint
from .training import vector_quantizers

__all__ = [
    "evaluate",
    "train_set_codes",
    "save_reconstructions",
    "open_tensorboard",
    "evaluate_run",
    "start_message",
    "finish_run",
]


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


def open_tensorboard(out: str):
    """A TensorBoard ``SummaryWriter`` on ``OUT/tb``, or None when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: scalars only go to metrics.json
        return None
    return SummaryWriter(os.path.join(out, "tb"))


def evaluate_run(run: TrainingRun, net=None) -> dict:
    """:func:`evaluate` of ``net`` (default: the run's model) on the held-out tiles, plus the
    training-set code statistics; for the run's own model it also updates ``run.cb_diff_max``
    (every rank calls this: the held-out shards and the codebook comparison are collective)."""
    net = run.model if net is None else net
    perceptual = run.perc if run.perc_kind != "none" else None
    ev = evaluate(net, run.groups, ctx=run.ctx, perceptual=perceptual)
    tr = train_set_codes(net, run.sampler, device=run.device)
    ev["train_perplexity"], ev["train_codebook_usage"] = tr["perplexity"], tr["codebook_usage"]
    if net is run.model:
        for q in vector_quantizers(run.model):
            diff = mdist.rank_max_abs_diff(q.codebook, run.ctx)
            # max() would drop a NaN (every comparison with it is False): keep it visible
            run.cb_diff_max = diff if math.isnan(diff) else max(run.cb_diff_max, diff)
    return ev


def start_message(run: TrainingRun) -> str:
    """The two lines the run prints before its first step: what is trained, how it is spread."""
    args, config = run.args, run.config
    micro = run.per_rank_batch // args.grad_accum
    return (
        f"model={args.model} dataset={args.dataset} config={args.config} backend={run.backend} "
        f"device={run.device} perceptual={run.perc_kind} image={args.image_size} "
        f"params={sum(p.numel() for p in run.model.parameters())}\n"
        f"world_size={run.ctx.world_size} global_batch={args.batch_size} "
        f"per_rank_batch={run.per_rank_batch} "
        f"grad_accum={args.grad_accum} (micro-batch {micro}) precision={args.precision} "
        f"lr={config['lr']:g}"
        + (f" disc_lr={config['disc_lr']:g}" if run.gan is not None else "")
        + (f" ema_decay={args.ema_decay}" if run.ema is not None else "")
    )


def _final_metrics(run: TrainingRun, loop: LoopResult, ev: dict) -> dict:
    """metrics.json's numbers from the final evaluation ``ev``, the loop and the run's settings."""
    args, ctx, model, step = run.args, run.ctx, run.model, run.step
    seconds, steps_this_run = loop.seconds, loop.steps_this_run
    train_time, data_time = loop.train_time, loop.data_time
    return {
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
        "seconds": run.elapsed_before + seconds,
        "seconds_this_run": seconds,
        "steps_per_second": steps_this_run / train_time if train_time > 0 else 0.0,
        "images_per_second": (
            args.batch_size * steps_this_run / train_time if train_time > 0 else 0.0
        ),
        "data_seconds_this_run": data_time,
        "final_loss": loop.last_losses[-1] if loop.last_losses else None,
        "backend": run.backend,
        "perceptual": run.perc_kind,
        "model": args.model,
        "dataset": args.dataset,
        "config": args.config,
        "batch_size": args.batch_size,
        "global_batch_size": args.batch_size,
        "per_rank_batch_size": run.per_rank_batch,
        "world_size": ctx.world_size,
        "grad_accum": args.grad_accum,
        "precision": args.precision,
        "codebook_rank_max_abs_diff": run.cb_diff_max,
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "history": loop.history,
    }


def _done_message(run: TrainingRun, metrics: dict, png: str) -> str:
    """The summary the run prints last: speed, held-out quality, whole photos, output paths."""
    args, ctx, ema, step = run.args, run.ctx, run.ema, run.step
    return (
        f"done: {step} steps in {metrics['seconds']:.0f}s ({metrics['steps_per_second']:.2f} steps/s, "
        f"{metrics['images_per_second']:.0f} images/s on {ctx.world_size} rank(s)) "
        f"held-out psnr={metrics['psnr']:.2f} dB ssim={metrics['ssim']:.3f} "
        f"usage={metrics['codebook_usage']:.2f} ppl={metrics['perplexity']:.0f} "
        f"train_ppl={metrics['train_perplexity']:.0f} "
        f"codebook_rank_max_abs_diff={run.cb_diff_max:g}"
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


def finish_run(run: TrainingRun, loop: LoopResult) -> dict:
    """The end of a run that was not stopped by a signal: final evaluation (raw weights, then the
    weight EMA), whole held-out photos (rank 0), the last checkpoint, ``reconstructions.png``,
    ``metrics.json`` and the summary line.  Every rank calls it; returns the metrics dict."""
    args, ctx, model, ema, tb, log = run.args, run.ctx, run.model, run.ema, run.tb, run.log
    device, step = run.device, run.step
    ev = evaluate_run(run)
    pairs = ev.pop("_pairs")
    metrics = _final_metrics(run, loop, ev)
    if ema is not None:
        ev_ema = evaluate_run(run, ema.model)
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
    save_checkpoint(run, metrics)
    if ctx.is_main:
        if args.dataset == "digits":  # 8x8 digits: the tile strip says more than JPEG at 8x8
            save_reconstructions(pairs, png)
        else:
            metrics["jpeg_same_bpp"] = reconstruction_figure(
                model, photos, png, whole=(whole_metrics, whole_recs)
            )
        atomic_write_json(metrics, os.path.join(args.out, "metrics.json"))
    if tb is not None:
        tb.add_scalar("eval/psnr", ev["psnr"], step)
        tb.close()
    log(_done_message(run, metrics, png))
    return metrics
