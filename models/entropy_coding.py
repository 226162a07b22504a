"""Entropy coding of VQ code grids with the index prior: a 32-bit range coder, written here.

A fixed-length file spends ``⌈log2 K⌉`` bits on every code index. The prior (``models.prior``)
predicts each index from the ones before it in raster order; an arithmetic coder spends
``−log2 p(index | context)`` bits instead, which is what "bits under the prior" promises.

Pieces:

``RangeEncoder`` / ``RangeDecoder``
    A carry-propagating range coder (the byte-wise scheme of Subbotin/LZMA): ``low`` is kept in 33
    bits so a carry out of the 32-bit window is pushed into the bytes already written; the range
    stays in ``[2^24, 2^32)`` after normalisation. Symbols are given as integer frequencies
    ``(start, size, total)`` with ``total <= 2^16``, so ``range // total >= 2^8``: every symbol with
    ``size >= 1`` keeps a non-empty interval and decodes unambiguously.

``quantize_frequencies(probs, total)``
    Probabilities ``[B, K]`` -> integer frequencies ``[B, K]``, each ``>= 1`` and summing to
    ``total``. Encoder and decoder must produce *identical* tables, so the probabilities come from
    :class:`PriorStepper` run in float64 on one thread with the same call sequence on both sides
    (bitwise equal on one machine); across machines a float64 difference of ~1e-15 would have to
    straddle one of the 1/65536-wide rounding steps to matter (odds ~1e-11 per symbol).

``PriorStepper``
    The prior's transformer run one position at a time with a key/value cache, in float64. Both the
    encoder (which knows all indices) and the decoder (which learns them one by one) call exactly
    this, position by position, so they see the same logits. (The teacher-forced ``prior(indices)``
    computes the same numbers up to float rounding, but in a different order.)

``encode_grid(prior, grid)`` / ``decode_grid(prior, data, h, w)``
    A whole image's ``[h, w]`` grid is cut into tiles of the prior's grid size (e.g. 8x8); all tiles
    are coded as one batch, position by position (position-major, so the decoder can run the
    prior on every tile at once). Where the image's grid does not fill the last tiles, the missing
    positions are not coded: both sides fill them with a copy of the nearest earlier index in the
    tile (edge replication), which depends only on indices already decoded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import weights_fingerprint

__all__ = [
    "CodingError",
    "RangeEncoder",
    "RangeDecoder",
    "quantize_frequencies",
    "encode_symbols",
    "decode_symbols",
    "PriorStepper",
    "prior_fingerprint",
    "encode_grid",
    "decode_grid",
    "FREQ_TOTAL",
]

FREQ_TOTAL = 1 << 16  # total of every frequency table: 16-bit probabilities
_TOP = 1 << 32
_BOT = 1 << 24  # renormalise when the range falls below 2^24 (one byte out)
_MASK32 = _TOP - 1


class CodingError(ValueError):
    """The coded data is corrupt, truncated or was made with another prior."""


class RangeEncoder:
    """Byte-oriented range encoder: ``encode(start, size, total)`` per symbol, ``finish() -> bytes``."""

    def __init__(self) -> None:
        self.low = 0  # up to 33 bits: bit 32 is a pending carry
        self.range = _MASK32
        self.cache = 0  # the last byte not yet written (a carry may still increment it)
        self.cache_size = 1  # 1 + number of pending 0xFF bytes behind the cache
        self.out = bytearray()

    def _shift_low(self) -> None:
        if self.low < 0xFF000000 or self.low >= _TOP:
            carry = self.low >> 32
            temp = self.cache
            # Flush the cached byte and the run of 0xFF bytes after it, adding the carry (an 0xFF
            # run becomes 0x00s when a carry passes through it).
            while True:
                self.out.append((temp + carry) & 0xFF)
                temp = 0xFF
                self.cache_size -= 1
                if self.cache_size == 0:
                    break
            self.cache = (self.low >> 24) & 0xFF
        self.cache_size += 1
        self.low = (self.low & 0x00FFFFFF) << 8

    def encode(self, start: int, size: int, total: int) -> None:
        """Narrow the interval to ``[start, start + size) / total`` (integers, ``size >= 1``)."""
        r = self.range // total
        self.low += r * start
        self.range = r * size
        while self.range < _BOT:
            self.range <<= 8
            self._shift_low()

    def finish(self) -> bytes:
        for _ in range(5):  # push out all 32 bits of low plus the cache byte
            self._shift_low()
        # The first byte is always the initial cache (0) with no carry possible into it: drop it.
        return bytes(self.out[1:])


class RangeDecoder:
    """Inverse of :class:`RangeEncoder`: ``target(total)`` then ``consume(start, size)``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.range = _MASK32
        self.code = 0
        for _ in range(4):
            self.code = (self.code << 8) | self._byte()
        self._r = 0

    def _byte(self) -> int:
        if self.pos >= len(self.data):
            # The encoder flushes every byte the decoder will ever read: running past the end
            # means the stream is truncated or not ours.
            raise CodingError("entropy-coded stream ended early (truncated or corrupt data)")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def target(self, total: int) -> int:
        """The cumulative frequency in ``[0, total)`` that the next symbol's interval contains."""
        self._r = self.range // total
        v = self.code // self._r
        if v >= total:
            raise CodingError("entropy-coded stream is corrupt (value outside the interval)")
        return v

    def consume(self, start: int, size: int) -> None:
        self.code -= self._r * start
        self.range = self._r * size
        while self.range < _BOT:
            self.code = ((self.code << 8) | self._byte()) & _MASK32
            self.range <<= 8


def quantize_frequencies(probs: np.ndarray, total: int = FREQ_TOTAL) -> np.ndarray:
    """Integer frequency tables from probabilities.

    Args:
        probs: ``[B, K]`` float64, rows summing to ~1 (non-negative).
        total: table total, ``K < total <= 2^16``.
    Returns:
        ``[B, K] int64``: ``1 + floor(p · (total − K))`` (every symbol stays codable), with the
        rounding remainder given to the row's most probable symbol (lowest index on ties), so each
        row sums to exactly ``total``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [B, K], got shape {probs.shape}")
    k = probs.shape[1]
    if not (k < total <= FREQ_TOTAL):
        raise ValueError(f"need K < total <= {FREQ_TOTAL}, got K={k}, total={total}")
    freq = np.floor(np.clip(probs, 0.0, 1.0) * (total - k)).astype(np.int64) + 1
    rest = total - freq.sum(1)  # >= 0: the floors never exceed total - K when rows sum to <= 1
    if (rest < 0).any():
        raise ValueError("probs rows must sum to at most 1")
    freq[np.arange(freq.shape[0]), probs.argmax(1)] += rest
    return freq


def encode_symbols(
    symbols: np.ndarray, freqs: np.ndarray, enc: RangeEncoder | None = None
) -> RangeEncoder:
    """Encode ``symbols: [N] int`` with per-symbol tables ``freqs: [N, K] int64`` (each row summing
    to the same total). Returns the encoder (call ``finish()`` for the bytes)."""
    enc = enc or RangeEncoder()
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return enc
    total = int(freqs[0].sum())
    cum = np.cumsum(freqs, axis=1) - freqs  # start of each symbol's interval
    starts = cum[np.arange(symbols.size), symbols].tolist()
    sizes = freqs[np.arange(symbols.size), symbols].tolist()
    for s, z in zip(starts, sizes):
        enc.encode(s, z, total)
    return enc


def decode_symbols(dec: RangeDecoder, freqs: np.ndarray) -> np.ndarray:
    """Decode one symbol per row of ``freqs: [N, K] int64`` -> ``[N] int64``."""
    total = int(freqs[0].sum()) if len(freqs) else 0
    ends = np.cumsum(freqs, axis=1)
    out = np.empty(len(freqs), dtype=np.int64)
    for i in range(len(freqs)):
        row = ends[i]
        sym = int(np.searchsorted(row, dec.target(total), side="right"))
        start = int(row[sym - 1]) if sym else 0
        dec.consume(start, int(row[sym]) - start)
        out[i] = sym
    return out


# ---------------------------------------------------------------------------- the prior


def prior_fingerprint(prior: torch.nn.Module) -> str:
    """SHA-256 (hex, 32 chars) of the prior's config and weights: a prior-coded file only decodes
    with the very prior that coded it."""
    return weights_fingerprint(prior)


class PriorStepper:
    """Run an :class:`models.prior.IndexPrior` one position at a time, with a key/value cache.

    ``probs(batch) -> [B, K] float64`` returns the next position's probabilities for every
    sequence in the batch, then ``push(indices [B])`` feeds the indices at that position. Runs a
    float64 copy of the prior (dropout off) in the eval-mode, pre-norm layout of
    ``nn.TransformerEncoderLayer``.
    """

    def __init__(self, prior, batch: int) -> None:
        layer0 = prior.blocks.layers[0]
        if not layer0.norm_first:
            raise ValueError("PriorStepper expects pre-norm transformer layers (norm_first=True)")
        self.p = {k: v.detach().to("cpu", torch.float64) for k, v in prior.state_dict().items()}
        self.layers = len(prior.blocks.layers)
        self.heads = layer0.self_attn.num_heads
        self.eps = [(lay.norm1.eps, lay.norm2.eps) for lay in prior.blocks.layers]
        self.final_eps = prior.norm.eps
        self.bos = prior.bos
        self.seq_len = prior.seq_len
        self.batch = batch
        self.t = 0
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending = torch.full((batch,), self.bos, dtype=torch.int64)

    def _ln(self, x, name, eps):
        return F.layer_norm(x, x.shape[-1:], self.p[name + ".weight"], self.p[name + ".bias"], eps)

    @torch.no_grad()
    def probs(self) -> np.ndarray:
        """Probabilities of the code at position ``t`` given the pushed prefix: ``[B, K]``."""
        if self.t >= self.seq_len:
            raise ValueError(f"the prior covers {self.seq_len} positions; no position {self.t}")
        p, b = self.p, self.batch
        x = p["tok.weight"][self._pending] + p["pos"][self.t]  # [B, d]
        d = x.shape[-1]
        dh = d // self.heads
        for i in range(self.layers):
            pre = f"blocks.layers.{i}."
            h = self._ln(x, pre + "norm1", self.eps[i][0])
            qkv = F.linear(
                h, p[pre + "self_attn.in_proj_weight"], p[pre + "self_attn.in_proj_bias"]
            )
            q, k, v = qkv.view(b, 3, self.heads, dh).unbind(1)  # each [B, H, dh]
            if not self.cache:  # preallocated [B, H, L, dh] per layer: no quadratic re-copying
                shape = (b, self.heads, self.seq_len, dh)
                self.cache = [
                    (torch.empty(shape, dtype=x.dtype), torch.empty(shape, dtype=x.dtype))
                    for _ in range(self.layers)
                ]
            kc, vc = self.cache[i]
            kc[:, :, self.t] = k
            vc[:, :, self.t] = v
            k, v = kc[:, :, : self.t + 1], vc[:, :, : self.t + 1]  # [B, H, t+1, dh]
            att = torch.einsum("bhd,bhtd->bht", q, k) / math.sqrt(dh)
            ctx = torch.einsum("bht,bhtd->bhd", att.softmax(-1), v).reshape(b, d)
            x = x + F.linear(
                ctx, p[pre + "self_attn.out_proj.weight"], p[pre + "self_attn.out_proj.bias"]
            )
            h = self._ln(x, pre + "norm2", self.eps[i][1])
            h = F.gelu(F.linear(h, p[pre + "linear1.weight"], p[pre + "linear1.bias"]))
            x = x + F.linear(h, p[pre + "linear2.weight"], p[pre + "linear2.bias"])
        logits = F.linear(self._ln(x, "norm", self.final_eps), p["head.weight"], p["head.bias"])
        return logits.softmax(-1).numpy()

    def push(self, indices) -> None:
        """Feed the indices ``[B]`` at the position whose probabilities were just returned."""
        self._pending = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(self.batch)
        self.t += 1


def _tile_layout(h: int, w: int, th: int, tw: int):
    """Tiles covering an ``h x w`` grid with ``th x tw`` tiles: ``(n_rows, n_cols, valid_rows[B],
    valid_cols[B])`` (tiles row-major; the last row/column of tiles may be partial)."""
    nr, nc = -(-h // th), -(-w // tw)
    vr = np.array([min(th, h - r * th) for r in range(nr) for _ in range(nc)], dtype=np.int64)
    vc = np.array([min(tw, w - c * tw) for _ in range(nr) for c in range(nc)], dtype=np.int64)
    return nr, nc, vr, vc


class _single_thread:
    """Run the float64 prior on one thread: reductions then happen in one fixed order, so the
    encoder and the decoder compute bit-identical probabilities."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _run(prior, h: int, w: int, known: np.ndarray | None, data: bytes | None):
    """Shared encoder/decoder loop: position-major over the tiles of an ``h x w`` grid.

    Encoding: ``known`` is the ``[h, w]`` grid, returns bytes. Decoding: ``data`` is the stream,
    returns the ``[h, w]`` grid. Both sides make the identical sequence of prior calls."""
    th, tw = prior.grid
    nr, nc, vr, vc = _tile_layout(h, w, th, tw)
    b = nr * nc
    tiles = np.zeros((b, th, tw), dtype=np.int64)
    if known is not None:
        padded = np.zeros((nr * th, nc * tw), dtype=np.int64)
        padded[:h, :w] = known
        src = padded.reshape(nr, th, nc, tw).transpose(0, 2, 1, 3).reshape(b, th, tw)
    enc = RangeEncoder() if known is not None else None
    dec = RangeDecoder(data) if known is None else None
    stepper = PriorStepper(prior, b)
    k = prior.codebook_size
    with _single_thread():
        for t in range(th * tw):
            r, c = divmod(t, tw)
            probs = stepper.probs()
            coded = (r < vr) & (c < vc)  # tiles where this position is inside the image
            fill = ~coded
            if fill.any():  # edge replication from an earlier position of the same tile
                rr, cc = np.minimum(r, vr - 1), np.minimum(c, vc - 1)
                tiles[fill, r, c] = tiles[np.nonzero(fill)[0], rr[fill], cc[fill]]
            if coded.any():
                freqs = quantize_frequencies(probs[coded])
                if enc is not None:
                    sym = src[coded, r, c]
                    encode_symbols(sym, freqs, enc)
                else:
                    sym = decode_symbols(dec, freqs)
                    if sym.size and sym.max() >= k:
                        raise CodingError("decoded an index outside the codebook (corrupt data)")
                tiles[coded, r, c] = sym
            stepper.push(tiles[:, r, c])
    if enc is not None:
        return enc.finish()
    grid = tiles.reshape(nr, nc, th, tw).transpose(0, 2, 1, 3).reshape(nr * th, nc * tw)
    return grid[:h, :w].copy()


def encode_grid(prior, grid) -> bytes:
    """Range-code one ``[h, w]`` int grid (values in ``[0, K)``) with ``prior``'s conditionals."""
    g = np.asarray(grid.cpu() if isinstance(grid, torch.Tensor) else grid, dtype=np.int64)
    if g.ndim != 2 or g.size == 0:
        raise ValueError(f"grid must be a non-empty [h, w] array of indices, got shape {g.shape}")
    if g.min() < 0 or g.max() >= prior.codebook_size:
        raise ValueError(f"grid values must lie in [0, {prior.codebook_size})")
    return _run(prior, g.shape[0], g.shape[1], g, None)


def decode_grid(prior, data: bytes, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`encode_grid`: the ``[h, w] int64`` grid."""
    if h < 1 or w < 1:
        raise ValueError(f"grid size must be positive, got {h}x{w}")
    return _run(prior, h, w, None, bytes(data))
