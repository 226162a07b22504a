"""Drop-ins for vector-quantize-pytorch (``vector_quantize_pytorch``), one module per upstream
module: ``vector_quantize`` (``VectorQuantize``), ``finite_scalar_quantization`` (``FSQ``),
``residual_fsq`` (``ResidualFSQ``, ``GroupedResidualFSQ``)."""

from .finite_scalar_quantization import FSQ
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = ["VectorQuantize", "LossBreakdown"]
__all__ += ["FSQ", "ResidualFSQ", "GroupedResidualFSQ"]
