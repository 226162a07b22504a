"""Drop-in vector-quantization layers (see VectorQuantizer)."""
