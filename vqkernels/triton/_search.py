"""Building blocks shared by the Triton search kernels (``nearest_code``, ``sampling``).

Plain ``@triton.jit`` helpers: Triton inlines them into each kernel, so sharing them changes no
generated code.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_sq_norm(x_ptr, row_off, mask_n, stride_xd, D, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):  # fmt: skip
    """``‖x_i‖²`` of a ``[BLOCK_N]`` row tile, accumulated in fp32 over ``BLOCK_D`` chunks in
    order (the reference's offset: the same products, summed in fp32).  ``row_off`` is the int64
    row offset ``i·stride_xn``; masked rows read 0 and give 0."""
    xsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        xv = tl.load(
            x_ptr + row_off[:, None] + offs_d[None, :] * stride_xd,
            mask=mask_n[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        xsq += tl.sum(xv * xv, axis=1)
    return xsq
