"""Training of the code-index prior (:func:`run_training`): AdamW with warm-up and cosine decay
(:func:`_lr_at`), a step and / or wall-clock budget, periodic held-out NLL, atomic checkpoints and
an exact ``resume``.  The model and its file: :mod:`models.prior_model`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_json
from .prior_model import (
    _LN2,
    PRIOR_CONFIGS,
    PRIOR_FORMAT,
    IndexPrior,
    _check_indices,
    _load,
    bits_per_index,
    save_checkpoint,
    unigram_bits_per_index,
)

__all__ = ["run_training"]


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
    atomic_write_json(metrics, out / "metrics.json")
    return metrics


def _tail_mean(history: list, k: int) -> float | None:
    if not history:
        return None
    tail = [h[1] for h in history[-k:]]
    return sum(tail) / len(tail)
