"""Pure-PyTorch reference ops: the specification of every vqkernels op (one module per op family,
named as in ``csrc/`` and ``vqkernels/triton/``).

Every backend (C++ CPU, Triton, CUDA) is tested against these functions, the benchmarks use them
as the baseline, and ``backend="reference"`` runs them.  They are written for clarity, not speed:
they *do* materialize the N x K distance matrix and use a one-hot-free ``index_add_`` for the
cluster statistics.

Shapes (letters as in DESIGN.md §2): ``x: [N, D]`` (callers flatten leading dims), ``codebook: [K, D]``.

Numerics (DESIGN.md §3)
-----------------------
* Scores are computed in fp32 (``compute_dtype``) whatever the input dtype; ``compute_dtype`` lets
  tests run the reference *at* a low precision to measure its own error (the flash-attention rule).
* L2: ``argmin_k ‖c_k‖² − 2·x·c_k`` (‖x‖² is constant per row and dropped from the comparison; it is
  added back only to report the distance, which is clamped at 0 because cancellation can make it
  slightly negative).  ``‖c‖²`` is computed from the same rounded codebook the product uses.
* Cosine: codes are L2-normalized (``F.normalize``, eps 1e-12); ``argmax_k x·ĉ_k`` (normalizing x
  does not change the argmax); distance ``1 − x̂·ĉ``.
* Ties go to the lowest index, as ``torch.argmin`` does.
* Indices ``-1`` mark ignored rows (padding/masking) in ``cluster_stats``/``ema_update_``.
"""

from .codebook_softmax import (
    code_distribution,
    code_distribution_backward,
    code_scores,
    soft_quantize,
    soft_quantize_backward,
)
from .ema_update import cluster_stats, ema_blend_, ema_update_
from .nearest_code import nearest_code
from .quantize import quantize, quantize_backward

__all__ = [
    "nearest_code",
    "cluster_stats",
    "ema_update_",
    "ema_blend_",
    "quantize",
    "quantize_backward",
    "code_scores",
    "code_distribution",
    "code_distribution_backward",
    "soft_quantize",
    "soft_quantize_backward",
]
