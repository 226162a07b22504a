"""Drop-in replacements for the VQ layers of other libraries, on vqkernels' fused ops.

One sub-module per upstream library, named after it; inside, one module per upstream module:

``vector_quantize_pytorch``  vector-quantize-pytorch (``from vqkernels.compat import VectorQuantize``)
``taming``                   taming-transformers' ``VectorQuantizer2``
"""

from .taming import VectorQuantizer2
from .vector_quantize_pytorch import GroupedResidualVQ, LossBreakdown, ResidualVQ, VectorQuantize

__all__ = ["VectorQuantize", "LossBreakdown", "VectorQuantizer2", "ResidualVQ", "GroupedResidualVQ"]
