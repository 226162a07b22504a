"""Drop-in replacements for the VQ layers of other libraries, on vqkernels' fused ops.

One sub-module per upstream library, named after it; inside, one module per upstream module:

``vector_quantize_pytorch``  vector-quantize-pytorch: the one-line switch is
                             ``from vqkernels.compat import VectorQuantize, ResidualVQ, FSQ, LFQ``
``taming``                   taming-transformers' ``VectorQuantizer2``
"""

from .taming import VectorQuantizer2
from .vector_quantize_pytorch import *  # noqa: F403  (its __all__: LR's class names)
from .vector_quantize_pytorch import __all__ as _lr_names

__all__ = [*_lr_names, "VectorQuantizer2"]
