"""Triton backend: fused nearest-code search, EMA codebook update and straight-through quantize.

Each op is a ``torch.library.triton_op`` (``vqkernels::<op>_triton``) whose kernels are launched
through ``wrap_triton``, so ``torch.compile`` traces into them; fake impls are inferred from the
launchers (they only allocate).  The functions exported here are what
``vqkernels.functional`` calls with already-flattened 2-D inputs::

    nearest_code(x[N,D], codebook[K,D], metric, precision) -> (indices[N] i64, distance[N] f32)
    cluster_stats(x[N,D], indices[N] i64, num_codes) -> (counts[K] f32, sums[K,D] f32)
    ema_update_(codebook, cluster_size, embed_sum, x, indices, decay, eps) -> None   (in place)
    quantize(x, codebook, beta, metric, codebook_loss, precision)
        -> (quantized[N,D], indices[N] i64, loss[] f32)                              (autograd)
    code_distribution(x, codebook, row_weight[N], temperature, metric)
        -> (logsumexp[N], entropy[N], mean_probs[K])   (autograd; codebook_softmax.py)
    soft_quantize(x, keys, values, temperature, metric) -> (out, logsumexp, indices) (autograd)

The kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (slow; used by the tests).  The search kernels autotune their row/code tiles
per (K, D, N bucket, dtype, metric, precision); ``VQKERNELS_TRITON_AUTOTUNE=0`` skips the timing
runs and takes the first config that fits.  The tuned tiles do not change the order of any sum
in the kernels (BLOCK_D is fixed by D), so every config should give the same bits; the GPU tests
compare eager and compiled runs, which may pick different configs.  Importing this module raises ImportError only
when triton itself (or torch's triton_op support) is unusable; ``vqkernels.dispatch`` reports it.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # a missing or broken triton install
    raise ImportError(f"triton is not importable: {type(exc).__name__}: {exc}") from exc

import torch

if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
    raise ImportError(
        f"torch {torch.__version__} lacks torch.library.triton_op/wrap_triton (torch >= 2.6 needed)"
    )

from .. import _ops  # noqa: F401,E402  (the vqkernels namespace and its schemas come first)
from .codebook_softmax import code_distribution, soft_quantize  # noqa: E402
from .ema_update import cluster_stats, ema_update_  # noqa: E402
from .nearest_code import nearest_code  # noqa: E402
from .quantize import quantize  # noqa: E402

__all__ = [
    "nearest_code",
    "cluster_stats",
    "ema_update_",
    "quantize",
    "code_distribution",
    "soft_quantize",
]
