"""The training loop of ``models.train``: steps until ``--steps`` / ``--minutes`` / ``--stop-after``
or a signal, with the learning-rate schedule, ``train_log.jsonl`` rows, periodic held-out
evaluation and checkpoints.

Every rank runs the same loop in lock step: at the top of each step the ranks agree
(:class:`models.distributed.StepAgreement`) on whether to stop (a signal on any rank), whether a
loss became non-finite on any rank, and on the elapsed time (the largest), so all of them take
the same number of steps with the same learning rate.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import torch

from . import distributed as mdist
from .metrics import psnr
from .progress import BudgetProgress
from .steps import init_codebooks_eagerly, unwrap
from .train_eval import evaluate_run
from .train_state import LoopResult, TrainingRun, save_checkpoint

__all__ = ["run_loop", "set_lr", "StepFn"]

# one_step(step_model, images, step) -> the dict of models.steps.vqvae_step / vqgan_step
StepFn = Callable[[torch.nn.Module, torch.Tensor, int], dict]


def set_lr(run: TrainingRun, elapsed: float, budget: float) -> float:
    """Cosine decay to 5% of the base rate over the run's progress; returns the factor.
    ``elapsed`` is agreed by all ranks (the largest), so every rank uses the same rate."""
    args, config = run.args, run.config
    if args.lr_schedule == "constant":
        return 1.0
    base_lr = {"g": config["lr"], "d": config.get("disc_lr", config["lr"])}
    prog = min(1.0, max(run.step / max(args.steps, 1), elapsed / budget))
    factor = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * prog))
    for name, opt in run.opts.items():
        for group in opt.param_groups:
            group["lr"] = base_lr[name] * factor
    return factor


def _log_row(run: TrainingRun, bar, out: dict, images, lr_factor: float, ips: float, data_time):
    """Every --log-every steps: one train_log.jsonl row (rank 0), the progress bar's postfix and
    the TensorBoard scalars; the loss is the mean over the ranks (a collective: all ranks)."""
    step, tb = run.step, run.tb
    loss_g, rec_g = mdist.all_reduce_mean([out["loss"], out["rec_loss"]], run.ctx)
    q = unwrap(run.model).quantizer
    usage = float(getattr(q, "codebook_usage", float("nan")))
    ppl = float(getattr(q, "perplexity", float("nan")))
    tr_psnr = psnr(out["recon"].detach(), images)
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
    if run.ctx.is_main:
        with open(os.path.join(run.args.out, "train_log.jsonl"), "a") as f:
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


def _periodic_eval(run: TrainingRun, history: list) -> None:
    """Every --eval-every steps: held-out evaluation, one history row, a line, a checkpoint."""
    step, tb = run.step, run.tb
    ev = evaluate_run(run)
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
    run.log(
        f"\n[eval step {step}] psnr={ev['psnr']:.2f} ({per}) ssim={ev['ssim']:.3f} "
        f"usage={ev['codebook_usage']:.2f} ppl={ev['perplexity']:.0f} "
        f"train_ppl={ev['train_perplexity']:.0f} codebook_rank_diff={run.cb_diff_max:g}"
    )
    if tb is not None:
        tb.add_scalar("eval/psnr", ev["psnr"], step)
        tb.add_scalar("eval/ssim", ev["ssim"], step)
    save_checkpoint(run, ev)


def run_loop(run: TrainingRun, one_step: StepFn) -> LoopResult:
    """Train ``run`` from ``run.step`` on; ``one_step(step_model, images, step)`` performs one
    optimizer step (``models.steps``) and returns its floats and ``recon``.

    Raises FloatingPointError on every rank when a loss became non-finite on any rank (the last
    checkpoint stays intact).  A SIGTERM/SIGINT ends the loop after the current step on every
    rank (``LoopResult.stopped_by``)."""
    args, ctx, model, ema = run.args, run.ctx, run.model, run.ema
    step = run.step
    budget = args.minutes * 60.0 if args.minutes is not None else math.inf
    # k-means runs eagerly inside the first training forward; with micro-batches or a compiled
    # model it runs once beforehand on the rank's whole batch instead (same data, same draws).
    pre_init = args.grad_accum > 1 or args.compile

    run.t0 = time.perf_counter()
    last_losses: list[float] = []
    # Counts towards what will really happen: --minutes usually stops the run long before --steps.
    # Main rank only (the others are quiet); silent without tqdm.
    bar = BudgetProgress(args.steps, args.minutes, initial_step=step, disable=run.quiet)
    steps_this_run, train_time, data_time = 0, 0.0, 0.0
    history: list = []
    nonfinite: tuple[int, float] | None = None
    stopped_by = None
    compiled = None
    agreement = mdist.StepAgreement(ctx)
    with agreement:
        while True:
            stop, bad, elapsed = agreement.agree(
                nonfinite is not None, time.perf_counter() - run.t0
            )
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
            lr_factor = set_lr(run, elapsed, budget)
            images = mdist.sample_shard(run.sampler, args.batch_size, run.data_gen, ctx)
            images = images.to(run.device)
            data_time += time.perf_counter() - ts
            if pre_init:
                init_codebooks_eagerly(model, images, run.step_cfg)
            step_model = compiled if compiled is not None else run.gen_model
            out = one_step(step_model, images, step)
            if args.compile and compiled is None:
                compiled = torch.compile(run.gen_model)
            if ema is not None:
                ema.update(model)
            loss_v = out["loss"]
            if not math.isfinite(loss_v) and nonfinite is None:
                nonfinite = (step + 1, loss_v)
            step += 1
            run.step = step
            steps_this_run += 1
            train_time += time.perf_counter() - ts
            last_losses.append(loss_v)
            if step % args.log_every == 0 or step == args.steps:
                ips = args.batch_size * steps_this_run / train_time if train_time > 0 else 0.0
                _log_row(run, bar, out, images, lr_factor, ips, data_time)
            bar.update(step)
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                _periodic_eval(run, history)
    bar.close()
    return LoopResult(
        seconds=time.perf_counter() - run.t0,
        steps_this_run=steps_this_run,
        train_time=train_time,
        data_time=data_time,
        last_losses=last_losses,
        history=history,
        stopped_by=stopped_by,
    )
