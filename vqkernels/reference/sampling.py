"""Counter-based Gumbel noise: the specification every backend's fused sampling reproduces.

Gumbel-max sampling picks ``argmax_k(logit_k / τ + g_k)`` with ``g_k`` i.i.d. Gumbel(0, 1); the
result is a draw from ``softmax(logit / τ)``.  Instead of a stateful RNG stream (whose values
would depend on how a kernel walks the rows and codes), every noise value is a pure function of
``(seed, row, code)``, so a kernel can compute the noise of any (row, code) pair wherever it
visits it, and a seed gives the same codes on every backend, run and thread count.

The hash (all arithmetic on unsigned 32-bit words; written here with int64 tensors kept in
``[0, 2^32)``: both multipliers are below 2^31, so no product of a 32-bit word overflows int64)::

    mix32(v) = v ^= v >> 16; v *= 0x21F0AAAD; v ^= v >> 15; v *= 0x735A2D97; v ^= v >> 15
               (C. Wellons' "lowbias32" constants; a bijection of 32-bit words)
    row_key(seed, r) = mix32(mix32(mix32(mix32(seed_hi ^ 0x9E3779B9) ^ seed_lo) ^ r_hi) ^ r_lo)
    bits(seed, r, k) = mix32(row_key(seed, r) ^ mix32(k))
    u = (2·(bits >> 9) + 1) · 2^-24        an odd multiple of 2^-24 in (0, 1): exact in fp32,
                                           never 0 or 1, so both logs below are finite
    g = −log(−log(u))                      in fp32

``r`` is the row of the flattened problem (``n·H + h`` for head ``h`` of row ``n``), ``k`` the
code index (< 2^31), ``seed`` a non-negative int < 2^63 split into 32-bit halves.

Numerics: the integer part is exact on every backend; the two fp32 logs may differ by an ulp
between math libraries (torch, libm, CUDA libdevice), which can flip the choice only when two
perturbed scores are within a few ulps of each other (tests count those cases).
"""

from __future__ import annotations

import torch

__all__ = ["mix32", "row_keys", "counter_bits", "uniform_from_bits", "gumbel_noise", "MAX_SEED"]

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x21F0AAAD
MIX_MUL2 = 0x735A2D97
SEED_SALT = 0x9E3779B9
MAX_SEED = (1 << 63) - 1  # seeds live in [0, 2^63)


def mix32(v: torch.Tensor) -> torch.Tensor:
    """The lowbias32 bijection on int64 tensors holding 32-bit words (``[0, 2^32)``)."""
    v = v ^ (v >> 16)
    v = (v * MIX_MUL1) & MASK32
    v = v ^ (v >> 15)
    v = (v * MIX_MUL2) & MASK32
    return v ^ (v >> 15)


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """Per-row 32-bit keys ``[R] int64`` for the row counters ``rows [R] int64`` (>= 0)."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    seed = int(seed)
    seed_lo, seed_hi = seed & MASK32, seed >> 32
    base = mix32(torch.tensor((seed_hi ^ SEED_SALT) & MASK32, dtype=torch.int64))
    base = mix32(base ^ seed_lo)
    rows = rows.to(torch.int64)
    h = mix32(base.to(rows.device) ^ (rows >> 32))
    return mix32(h ^ (rows & MASK32))


def counter_bits(seed: int, rows: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``[R, K] int64`` random 32-bit words for every (row counter, code) pair."""
    keys = row_keys(seed, rows)
    codes = torch.arange(num_codes, dtype=torch.int64, device=rows.device)
    return mix32(keys[:, None] ^ mix32(codes)[None, :])


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in (0, 1): ``(2·(bits >> 9) + 1)·2^-24`` (exact)."""
    return ((bits >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def gumbel_noise(seed: int, rows: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``[R, K] float32`` Gumbel(0, 1) noise ``−log(−log(u))`` for the given row counters."""
    u = uniform_from_bits(counter_bits(seed, rows, num_codes))
    return -torch.log(-torch.log(u))
