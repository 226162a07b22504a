"""Image compression with a trained VQ model: code indices bit-packed to ⌈log2 K⌉ bits each, or
range-coded with the code-index prior (``--prior``).

    python -m models.compress encode --checkpoint runs/quickstart/checkpoint.pt a.png b.jpg --out codes.vqc
    python -m models.compress decode --checkpoint runs/quickstart/checkpoint.pt codes.vqc --out decoded/
    python -m models.compress encode --checkpoint C --prior runs/prior/prior.pt a.png --out a.vqc
    python -m models.compress decode --checkpoint C --prior runs/prior/prior.pt a.vqc --out decoded/

``encode`` reports, per image, the bits per pixel of its packed codes and the PSNR of the
reconstruction; ``decode`` writes PNGs (and reports PSNR when ``--originals`` are given).

File layout (little-endian)::

    b"VQKC" | u8 version | u32 header_len | header (UTF-8 JSON) | u32 payload_len | payload | u32 CRC32

The header names the model (type, K, bits per index, downsampling, channels, and a SHA-256
fingerprint of its weights) and each image (name, size, code-grid size).  The payload holds every
image's indices, row-major, MSB-first at ``bits`` bits each.  The CRC covers everything before it.

Version 2 (``--prior``) is the same container; its header adds ``prior`` (the prior's SHA-256
fingerprint, grid and frequency total) and each image's ``nbytes``; the payload is each image's
range-coded stream (:mod:`models.entropy_coding`) one after the other. Decoding needs the same
prior: a missing or different one is a clear error. Version 1 files stay readable as before.
A corrupt file, a truncated file or a file made with another model gives a :class:`CompressError`
(a ValueError) that says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import zlib

import numpy as np
import torch

from .checkpoint import weights_fingerprint
from .cli import exit_status
from .holdout import pad_to_multiple

__all__ = [
    "CompressError",
    "pack_indices",
    "unpack_indices",
    "model_fingerprint",
    "encode_images",
    "decode_bytes",
    "main",
]

MAGIC = b"VQKC"
VERSION = 1  # fixed-length indices (written without --prior; always readable)
VERSION_PRIOR = 2  # indices range-coded with a prior's conditional probabilities


class CompressError(ValueError):
    """A compressed file is corrupt, truncated, or does not belong to the given model."""


def index_bits(num_codes: int) -> int:
    """``⌈log2 K⌉`` (at least 1)."""
    return max(1, math.ceil(math.log2(num_codes)))


def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Pack non-negative ints ``< 2**bits`` MSB-first at ``bits`` bits each (last byte zero-padded)."""
    v = np.asarray(indices, dtype=np.int64).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"indices must lie in [0, 2**{bits})")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bitmat = ((v[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1)).tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``count`` int64 values."""
    need = (count * bits + 7) // 8
    if len(data) < need:
        raise CompressError(f"payload holds {len(data)} bytes, {need} needed for {count} indices")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits]
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return flat.reshape(count, bits).astype(np.int64) @ weights


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex, 32 chars) of the model's type, config and weights in key order: a file only
    decodes with the model that encoded it."""
    return weights_fingerprint(model)


def _check_prior(model, prior) -> None:
    if prior.codebook_size != model.codebook_size:
        raise ValueError(
            f"the prior was trained for K={prior.codebook_size} codes but the model has "
            f"K={model.codebook_size}: use the prior trained on this checkpoint"
        )


def encode_images(
    model, images: list[torch.Tensor], names: list[str], prior=None
) -> tuple[bytes, list[dict]]:
    """Encode ``images`` (each ``[C, H, W]`` float in [0, 1]) into the file format.

    Without ``prior``: version 1, fixed-length ``⌈log2 K⌉``-bit indices. With an
    :class:`models.prior.IndexPrior` of the same K: version 2, each image's indices range-coded
    with the prior's conditional probabilities (:mod:`models.entropy_coding`).

    Returns ``(file_bytes, reports)``; each report has name, size, bits, bpp, psnr (and
    ``bits_fixed``/``bpp_fixed``, the fixed-length cost, for comparison)."""
    from .metrics import psnr

    k, f = model.codebook_size, model.downsample
    bits = index_bits(k)
    if prior is not None:
        from . import entropy_coding as ec

        _check_prior(model, prior)
    entries, all_idx, reports, streams = [], [], [], []
    for img, name in zip(images, names):
        c, hgt, wid = img.shape
        x = pad_to_multiple(img, f).unsqueeze(0)
        idx = model.encode(x)[0]  # [h, w]
        rec = model.decode_indices(idx.unsqueeze(0))[0, :, :hgt, :wid]
        entries.append(
            {
                "name": name,
                "height": hgt,
                "width": wid,
                "h": int(idx.shape[0]),
                "w": int(idx.shape[1]),
            }
        )
        all_idx.append(idx.reshape(-1).numpy())
        nbits = fixed = bits * idx.numel()
        if prior is not None:
            streams.append(ec.encode_grid(prior, idx))
            entries[-1]["nbytes"] = len(streams[-1])
            nbits = 8 * len(streams[-1])
        reports.append(
            {
                "name": name,
                "height": hgt,
                "width": wid,
                "bits": nbits,
                "bpp": nbits / (hgt * wid),
                "bits_fixed": fixed,
                "bpp_fixed": fixed / (hgt * wid),
                "psnr": psnr(rec.unsqueeze(0), img.unsqueeze(0)),
            }
        )
    header = {
        "model_type": model.config["model"],
        "codebook_size": k,
        "bits": bits,
        "downsample": f,
        "channels": model.config["in_channels"],
        "fingerprint": model_fingerprint(model),
        "images": entries,
    }
    version = VERSION
    if prior is not None:
        version = VERSION_PRIOR
        header["prior"] = {
            "fingerprint": ec.prior_fingerprint(prior),
            "grid": list(prior.grid),
            "freq_total": ec.FREQ_TOTAL,
        }
        payload = b"".join(streams)
    else:
        payload = pack_indices(np.concatenate(all_idx) if all_idx else np.zeros(0, np.int64), bits)
    hb = json.dumps(header, sort_keys=True).encode()
    body = (
        MAGIC
        + struct.pack("<BI", version, len(hb))
        + hb
        + struct.pack("<I", len(payload))
        + payload
    )
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF), reports


def read_header(data: bytes) -> tuple[dict, bytes]:
    """Validate the container (magic, version, lengths, CRC) and return ``(header, payload)``."""
    if len(data) < 4 or data[:4] != MAGIC:
        raise CompressError("not a vqkernels compressed file (bad magic bytes)")
    if len(data) < 4 + 5 + 4:
        raise CompressError("file is truncated (no header)")
    version, hlen = struct.unpack_from("<BI", data, 4)
    if version not in (VERSION, VERSION_PRIOR):
        raise CompressError(
            f"unsupported file version {version} (this code reads {VERSION} and {VERSION_PRIOR})"
        )
    off = 9
    if len(data) < off + hlen + 4:
        raise CompressError("file is truncated (header cut short)")
    hb = data[off : off + hlen]
    off += hlen
    (plen,) = struct.unpack_from("<I", data, off)
    off += 4
    if len(data) != off + plen + 4:
        raise CompressError(
            f"file is truncated or has trailing bytes (expected {off + plen + 4}, got {len(data)})"
        )
    payload = data[off : off + plen]
    (crc,) = struct.unpack_from("<I", data, off + plen)
    if zlib.crc32(data[: off + plen]) & 0xFFFFFFFF != crc:
        raise CompressError("file is corrupt (CRC32 checksum mismatch)")
    try:
        header = json.loads(hb.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompressError(f"file header is not valid JSON: {exc}") from None
    if (version == VERSION_PRIOR) != ("prior" in header):
        raise CompressError(f"file header does not match its version {version}")
    return header, payload


def decode_bytes(model, data: bytes, prior=None) -> list[tuple[str, torch.Tensor]]:
    """Decode a file made by :func:`encode_images` with the same model (and, for a prior-coded
    file, the same prior): ``[(name, [C, H, W])]``."""
    header, payload = read_header(data)
    fp = model_fingerprint(model)
    if header.get("fingerprint") != fp:
        raise CompressError(
            f"file was encoded with a different model (fingerprint {header.get('fingerprint')}, "
            f"this checkpoint has {fp}; K={header.get('codebook_size')} vs {model.codebook_size})"
        )
    bits = header["bits"]
    counts = [e["h"] * e["w"] for e in header["images"]]
    if "prior" in header:
        flat = _decode_prior_payload(model, header, payload, prior)
    else:
        flat = unpack_indices(payload, sum(counts), bits)
    if flat.size and flat.max() >= model.codebook_size:
        raise CompressError("file holds indices outside the codebook")
    out, pos = [], 0
    for e, n in zip(header["images"], counts):
        idx = torch.from_numpy(flat[pos : pos + n].copy()).reshape(1, e["h"], e["w"])
        pos += n
        img = model.decode_indices(idx)[0, :, : e["height"], : e["width"]]
        out.append((e["name"], img))
    return out


def _decode_prior_payload(model, header: dict, payload: bytes, prior) -> np.ndarray:
    """The concatenated indices of a prior-coded (version 2) file."""
    from . import entropy_coding as ec

    want = header["prior"]["fingerprint"]
    if prior is None:
        raise CompressError(
            f"file was entropy-coded with a prior (fingerprint {want}): pass --prior with that "
            "prior to decode it"
        )
    have = ec.prior_fingerprint(prior)
    if have != want:
        raise CompressError(
            f"file was entropy-coded with a different prior (fingerprint {want}, the given prior "
            f"has {have})"
        )
    _check_prior(model, prior)
    sizes = [int(e["nbytes"]) for e in header["images"]]
    if sum(sizes) != len(payload):
        raise CompressError(f"payload holds {len(payload)} bytes, the header lists {sum(sizes)}")
    out, pos = [], 0
    for e, n in zip(header["images"], sizes):
        try:
            grid = ec.decode_grid(prior, payload[pos : pos + n], e["h"], e["w"])
        except ec.CodingError as exc:
            raise CompressError(f"{e['name']}: {exc}") from None
        out.append(grid.reshape(-1))
        pos += n
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _read_image(path: str, channels: int) -> torch.Tensor:
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).float().div_(255.0)
    return t.permute(2, 0, 1) if t.dim() == 3 else t.unsqueeze(0)


def _write_png(img: torch.Tensor, path: str) -> None:
    from PIL import Image

    arr = (img.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m models.compress encode|decode ...``: 0, or 2 after a user error (one line)."""
    p = argparse.ArgumentParser(
        prog="python -m models.compress", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="images -> packed code file")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("images", nargs="+")
    e.add_argument("--out", required=True)
    e.add_argument("--backend", default="auto")
    e.add_argument(
        "--prior",
        default=None,
        help="prior.pt (or its folder) trained on this checkpoint: range-code the indices with "
        "its conditional probabilities instead of fixed-length bits",
    )
    d = sub.add_parser("decode", help="packed code file -> PNGs")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("file")
    d.add_argument("--out", required=True, help="output folder for the PNGs")
    d.add_argument(
        "--originals",
        nargs="*",
        default=None,
        help="original images (same order) to report PSNR against",
    )
    d.add_argument("--backend", default="auto")
    d.add_argument("--prior", default=None, help="the prior the file was encoded with (if any)")
    args = p.parse_args(argv)
    return exit_status(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    """``encode`` or ``decode`` as the parsed ``args`` say (user errors raise)."""
    import models

    from .metrics import psnr

    model = models.load(args.checkpoint, backend=args.backend)
    c = model.config["in_channels"]
    prior = None
    if args.prior:
        from .prior import load_prior

        prior = load_prior(args.prior)
    if args.cmd == "encode":
        imgs = [_read_image(f, c) for f in args.images]
        names = [os.path.basename(f) for f in args.images]
        data, reports = encode_images(model, imgs, names, prior=prior)
        tmp = args.out + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, args.out)
        for r in reports:
            coded = f"  (prior-coded; fixed-length {r['bpp_fixed']:.4f} bpp)" if prior else ""
            print(
                f"{r['name']}: {r['width']}x{r['height']}  {r['bits']} bits  "
                f"{r['bpp']:.4f} bpp  PSNR {r['psnr']:.2f} dB{coded}"
            )
        pixels = sum(r["width"] * r["height"] for r in reports)
        print(f"wrote {args.out}: {len(data)} bytes, {8 * len(data) / pixels:.4f} bpp with header")
    else:
        with open(args.file, "rb") as fh:
            data = fh.read()
        decoded = decode_bytes(model, data, prior=prior)
        os.makedirs(args.out, exist_ok=True)
        header, _ = read_header(data)
        origs = args.originals or []
        if origs and len(origs) != len(decoded):
            raise ValueError(f"--originals: got {len(origs)} files for {len(decoded)} images")
        for i, ((name, img), ent) in enumerate(zip(decoded, header["images"])):
            stem = os.path.splitext(name)[0] or f"image{i}"
            path = os.path.join(args.out, f"{i:03d}_{stem}.png")
            _write_png(img, path)
            nbits = 8 * ent["nbytes"] if "nbytes" in ent else header["bits"] * ent["h"] * ent["w"]
            bpp = nbits / (ent["height"] * ent["width"])
            msg = f"{path}: {img.shape[2]}x{img.shape[1]}  {bpp:.4f} bpp"
            if origs:
                ref = _read_image(origs[i], c)
                if ref.shape != img.shape:
                    raise ValueError(
                        f"original {origs[i]} has shape {tuple(ref.shape)}, "
                        f"decoded image {tuple(img.shape)}"
                    )
                msg += f"  PSNR {psnr(img.unsqueeze(0), ref.unsqueeze(0)):.2f} dB"
            print(msg)


if __name__ == "__main__":
    sys.exit(main())
