"""Drop-ins for vector-quantize-pytorch (``vector_quantize_pytorch``), one module per upstream
module: ``vector_quantize`` (``VectorQuantize``), ``residual_vq`` (``ResidualVQ``,
``GroupedResidualVQ``), ``finite_scalar_quantization`` (``FSQ``), ``residual_fsq``
(``ResidualFSQ``, ``GroupedResidualFSQ``), ``lookup_free_quantization`` (``LFQ``),
``residual_lfq`` (``ResidualLFQ``, ``GroupedResidualLFQ``), ``sim_vq`` (``SimVQ``),
``residual_sim_vq`` (``ResidualSimVQ``)."""

from .finite_scalar_quantization import FSQ
from .lookup_free_quantization import LFQ
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .residual_sim_vq import ResidualSimVQ
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .sim_vq import SimVQ
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = [
    "VectorQuantize",
    "LossBreakdown",
    "ResidualVQ",
    "GroupedResidualVQ",
    "FSQ",
    "ResidualFSQ",
    "GroupedResidualFSQ",
    "LFQ",
    "ResidualLFQ",
    "GroupedResidualLFQ",
    "SimVQ",
    "ResidualSimVQ",
]
