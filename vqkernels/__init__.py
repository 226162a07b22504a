"""vqkernels: fused vector-quantization kernels for PyTorch.

Public API::

    vqkernels.nearest_code(x, codebook, metric="l2", return_distance=False, backend="auto")
    vqkernels.cluster_stats(x, indices, num_codes)
    vqkernels.ema_update_(codebook, cluster_size, embed_sum, x, indices, decay, eps)
    vqkernels.quantize(x, codebook, beta=0.25, metric="l2")
    vqkernels.code_distribution(x, codebook, temperature=1.0, metric="l2", mask=None)
    vqkernels.soft_quantize(x, codebook, temperature=1.0, metric="dot")
    vqkernels.available_backends()
    vqkernels.VectorQuantizer, vqkernels.ResidualVectorQuantizer      (native layers, vqkernels.nn)

Importing the package registers the op schemas (``vqkernels._ops``) and loads the compiled C++
extension when it is built; a missing extension is reported by a warning, never an import error
(the ``reference`` backend always works).
"""

from __future__ import annotations

import warnings

from . import (
    _ops,  # noqa: F401  registers the schemas first: the C++ kernels attach to them
    dispatch,
    reference,
)
from .dispatch import BackendUnavailableError, available_backends, explain
from .functional import (
    cluster_stats,
    code_distribution,
    ema_blend_,
    ema_update_,
    nearest_code,
    quantize,
    soft_quantize,
)

__version__ = "0.1.0"

__all__ = [
    "nearest_code",
    "cluster_stats",
    "ema_update_",
    "ema_blend_",
    "quantize",
    "code_distribution",
    "soft_quantize",
    "available_backends",
    "explain",
    "BackendUnavailableError",
    "reference",
    "VectorQuantizer",
    "ResidualVectorQuantizer",
    "__version__",
]


def _load_extensions() -> None:
    why = dispatch.available_backends()["cpu"]
    if why:
        warnings.warn(
            f"vqkernels: C++ CPU kernels unavailable, falling back to the reference backend: {why}",
            RuntimeWarning,
            stacklevel=3,
        )
    # The CUDA extension is only probed (and so loaded) when the installed torch has CUDA.
    import torch

    if torch.version.cuda is not None:
        dispatch.available_backends()


_load_extensions()

from . import nn  # noqa: E402,F401  (layers, after the ops exist)
from .nn import ResidualVectorQuantizer, VectorQuantizer  # noqa: E402
