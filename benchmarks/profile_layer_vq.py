"""Where a VQ-family drop-in step spends its time: one config of ``bench_layer_vq``, ours only.

Prints the step time (min and median of ``--steps`` calls), the share spent inside the fused
``nearest_code`` kernel (timed around each call of the op), and torch.profiler's per-op table
(self CPU time) over a few steps.  On this 2-core machine the eval steps of the residual configs
are kernel-bound (the kernel at ~90 % of the core's fp32 FMA peak), the train steps split between
the kernel and the per-depth EMA / dead-code / estimator work.

``python -m benchmarks.profile_layer_vq "RVQ 8x1024 D128 kmeans+dead" --mode train --threads 1``
(config names: the keys of ``bench_layer_vq.CONFIGS``; ``--rows N`` rows of the op table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from benchmarks import bench_layer_vq


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", choices=sorted(bench_layer_vq.CONFIGS))
    p.add_argument("--mode", choices=bench_layer_vq.MODES, default="train")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    run = bench_layer_vq.make_provider("vqkernels-compat", args.config, args.mode)
    run()  # warm-up

    # time inside the op: wrap the registered packet (dispatch looks it up at call time)
    real, in_kernel = torch.ops.vqkernels.nearest_code, [0.0]

    class _Timed:
        def __call__(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                in_kernel[0] += time.perf_counter() - t0

        def __getattr__(self, name):
            return getattr(real, name)

    torch.ops.vqkernels.nearest_code = _Timed()
    steps = []
    try:
        for _ in range(args.steps):
            in_kernel[0] = 0.0
            t0 = time.perf_counter()
            run()
            steps.append((time.perf_counter() - t0, in_kernel[0]))
    finally:
        torch.ops.vqkernels.nearest_code = real
    best = min(steps)
    med = statistics.median(s for s, _ in steps)
    print(f"{args.mode} {args.config}: step min {best[0] * 1e3:.1f} ms (nearest_code {best[1] * 1e3:.1f} ms, "
          f"{100 * best[1] / best[0]:.0f} %), median {med * 1e3:.1f} ms over {args.steps} steps")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
