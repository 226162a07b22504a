"""Drop-ins for vector-quantize-pytorch (``vector_quantize_pytorch``), one module per upstream
module: ``vector_quantize`` (``VectorQuantize``), ``residual_vq`` (``ResidualVQ``,
``GroupedResidualVQ``)."""

from .residual_vq import GroupedResidualVQ, ResidualVQ
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = ["VectorQuantize", "LossBreakdown", "ResidualVQ", "GroupedResidualVQ"]
