"""Public functional API, one module per op family (as ``reference/``, ``csrc/`` and ``triton/``):
``nearest_code`` (:mod:`.nearest_code`), ``cluster_stats`` / ``ema_update_`` / ``ema_blend_``
(:mod:`.ema_update`), ``quantize`` (:mod:`.quantize`), ``code_distribution`` / ``soft_quantize``
(:mod:`.codebook_softmax`); the shared argument checks live in :mod:`._checks`.

Each function validates its inputs (shape, dtype, device errors name the argument), flattens any
leading dims (``x: [..., D]`` -> ``[N, D]``), picks a backend (see :mod:`vqkernels.dispatch`) and
restores the leading dims on the way out.

Value checks (NaN/Inf in ``x``/``codebook``, indices outside ``[-1, K)``) cost one pass over the
inputs and, on a GPU, a host sync; they run when ``check_inputs=True`` (the default, overridable
process-wide with ``VQKERNELS_CHECK_INPUTS=0``) and are skipped while ``torch.compile`` traces.
Unchecked behaviour of the raw kernels (documented, not an error): a row of ``x`` containing NaN
gets some valid index and a NaN distance; a code containing NaN is never chosen by the fused
kernels (every comparison with NaN is false) whereas ``torch.argmin`` in the reference would
pick it - hence the check.
"""

from __future__ import annotations

from .. import _ops  # noqa: F401  (registers the schemas)
from .codebook_softmax import code_distribution, soft_quantize
from .ema_update import cluster_stats, ema_blend_, ema_update_
from .nearest_code import nearest_code
from .quantize import quantize

__all__ = [
    "nearest_code",
    "cluster_stats",
    "ema_update_",
    "ema_blend_",
    "quantize",
    "code_distribution",
    "soft_quantize",
]
