"""Drop-in replacements for the VQ layers of other libraries, on vqkernels' fused ops.

One sub-module per upstream library, named after it; inside, one module per upstream module:

``vector_quantize_pytorch``  vector-quantize-pytorch (``from vqkernels.compat import VectorQuantize``)
``taming``                   taming-transformers' ``VectorQuantizer2``
"""

from .taming import VectorQuantizer2
from .vector_quantize_pytorch import LossBreakdown, VectorQuantize
from .vector_quantize_pytorch.finite_scalar_quantization import FSQ
from .vector_quantize_pytorch.lookup_free_quantization import LFQ
from .vector_quantize_pytorch.residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .vector_quantize_pytorch.residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .vector_quantize_pytorch.residual_sim_vq import ResidualSimVQ
from .vector_quantize_pytorch.sim_vq import SimVQ

__all__ = ["VectorQuantize", "LossBreakdown", "VectorQuantizer2"]
__all__ += ["FSQ", "ResidualFSQ", "GroupedResidualFSQ", "LFQ", "ResidualLFQ", "GroupedResidualLFQ", "SimVQ", "ResidualSimVQ"]
