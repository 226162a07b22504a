"""Native quantizer layers on vqkernels' fused ops, one family per module.

``VectorQuantizer``          (:mod:`.vector_quantizer`) one codebook: EMA (default) or learned by
                             gradient, k-means init, dead-code restart, low-dimensional lookup, masks,
                             perplexity / usage statistics.
``ResidualVectorQuantizer``  (:mod:`.residual`) stages of ``VectorQuantizer`` that quantize the
                             residual of the previous ones.
``IndexBackpropQuantizer``   (:mod:`.ibq`) IBQ: hard code forward, gradient through the streamed
                             soft assignment to every code; optional entropy loss.
``codebook_entropy_loss``    MAGVIT-2 / LlamaGen entropy loss on the streamed ``code_distribution``.

Scalar / lookup-free quantizer math (the compat ``FSQ``/``LFQ`` families are built on these):
:mod:`.fsq` (one-pass bound-and-round step, index <-> code), :mod:`.lfq` (LFQ's entropy loss in
``O(N·2^(d/2))`` memory, never ``N x 2^d``), :mod:`._linear` (projection weight gradients in the
fast GEMM layout).
"""

from ._entropy import codebook_entropy_loss
from .ibq import IndexBackpropQuantizer
from .residual import ResidualVectorQuantizer
from .vector_quantizer import VectorQuantizer

__all__ = [
    "VectorQuantizer",
    "ResidualVectorQuantizer",
    "IndexBackpropQuantizer",
    "codebook_entropy_loss",
]
