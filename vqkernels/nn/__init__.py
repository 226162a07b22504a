"""Native quantizer layers on vqkernels' fused ops, one family per module.

``VectorQuantizer``          (:mod:`.vector_quantizer`) one codebook: EMA (default) or learned by
                             gradient, k-means init, dead-code restart, low-dimensional lookup, masks,
                             perplexity / usage statistics.
``ResidualVectorQuantizer``  (:mod:`.residual`) stages of ``VectorQuantizer`` that quantize the
                             residual of the previous ones.
"""

from .residual import ResidualVectorQuantizer
from .vector_quantizer import VectorQuantizer

__all__ = ["VectorQuantizer", "ResidualVectorQuantizer"]
