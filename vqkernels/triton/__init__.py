"""Triton backend (being written)."""
raise ImportError("the Triton backend is not written yet")
