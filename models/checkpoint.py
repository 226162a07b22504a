"""Atomic, safely loadable checkpoints.

Format: one ``torch.save`` file holding only plain containers, numbers, strings and tensors, so it
loads with ``torch.load(weights_only=True)`` — loading never executes code from the file::

    {"format": "vqkernels-models", "version": 1, "model_type": "vqvae" | "vqgan",
     "config": {...},                # model.config, round-trips exactly
     "model": state_dict,            # the autoencoder (everything models.load() needs)
     "train": {...}}                 # optional: optimizer / discriminator / RNG state for --resume

Writes are atomic: the file is written to a temporary name in the same directory, flushed and
fsync'ed, then ``os.replace``d over the old one, so a crash mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile

import torch

__all__ = ["FORMAT", "VERSION", "atomic_save", "load_checkpoint", "CheckpointError"]

FORMAT = "vqkernels-models"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a readable vqkernels-models checkpoint (the message says why)."""


def atomic_save(obj: dict, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave the previous checkpoint untouched and do not litter the directory.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (best effort; not all filesystems allow it)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path: str) -> dict:
    """Load and validate a checkpoint with ``weights_only=True`` (never runs code from the file).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, unsafe (would need code execution), or not our format.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe globals, RuntimeError for corrupt zips
        raise CheckpointError(
            f"cannot load {path!r} safely as a vqkernels-models checkpoint "
            f"(weights_only=True): {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a vqkernels-models checkpoint (missing format tag)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint version {ckpt.get('version')!r}; this code reads {VERSION}"
        )
    for key in ("model_type", "config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path!r} lacks the {key!r} entry")
    return ckpt
