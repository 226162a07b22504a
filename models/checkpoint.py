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

Rotation (:func:`save_rotating`): ``OUT/checkpoint.pt`` is always the newest; the last ``K`` step
checkpoints ``OUT/checkpoint-step{N:08d}.pt`` are kept beside it (``checkpoint.pt`` is a hard link
to the newest one where the filesystem allows, so it costs no second write).
:func:`load_newest_valid` returns the newest checkpoint that loads, skipping truncated or corrupt
files with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings

import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "atomic_save",
    "load_checkpoint",
    "CheckpointError",
    "save_rotating",
    "step_checkpoints",
    "load_newest_valid",
    "load_for_resume",
    "weights_fingerprint",
    "atomic_write_json",
]

FORMAT = "vqkernels-models"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a readable vqkernels-models checkpoint (the message says why)."""


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort; not all filesystems allow it)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    """Remove ``path`` if it is there (a temp file after a failed write, an old checkpoint)."""
    try:
        os.unlink(path)
    except OSError:
        pass


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
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    """``obj`` as indented JSON (sorted keys, final newline) to ``path`` atomically: a temp file
    in the same directory, then ``os.replace`` (readers never see half a file)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(path)),
        prefix=os.path.basename(path) + ".",
        suffix=".tmp",
    )
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


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


_STEP_RE = re.compile(r"^checkpoint-step(\d+)\.pt$")


def step_checkpoints(directory: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the step checkpoints in ``directory``, newest (highest step) first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _STEP_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def save_rotating(obj: dict, directory: str, step: int, keep_last: int, name: str) -> str:
    """Write ``obj`` atomically as ``directory/name`` (the newest) and, when ``keep_last > 0``, as
    the step checkpoint ``checkpoint-step{step:08d}.pt``, then delete step checkpoints beyond the
    newest ``keep_last``.  Returns the path of ``directory/name``.

    The step file is written first and ``name`` is swapped in as a hard link to it (atomic
    ``os.replace`` of a fresh link), falling back to a copy where links are not supported."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    newest = os.path.join(directory, name)
    if keep_last == 0:
        atomic_save(obj, newest)
        return newest
    step_path = os.path.join(directory, f"checkpoint-step{step:08d}.pt")
    atomic_save(obj, step_path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + name + "-", dir=directory)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(step_path, tmp)
        except OSError:  # no hard links here (some network filesystems): pay for a copy
            shutil.copyfile(step_path, tmp)
        os.replace(tmp, newest)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)
    for _, old in step_checkpoints(directory)[keep_last:]:
        _unlink_quietly(old)
    return newest


def load_newest_valid(directory: str, name: str, require: tuple[str, ...] = ()) -> tuple[dict, str]:
    """The newest checkpoint in ``directory`` that loads: ``directory/name`` first, then the step
    checkpoints from the highest step down.  A file that is truncated, corrupt, not ours, or lacks
    a ``require``d top-level entry is skipped with a ``RuntimeWarning`` naming it and why.

    Returns:
        ``(checkpoint dict, path)``.
    Raises:
        FileNotFoundError: no candidate file exists.
        CheckpointError: candidates exist but none is valid (the message lists each reason).
    """
    newest = os.path.join(directory, name)
    candidates = ([newest] if os.path.isfile(newest) else []) + [
        p for _, p in step_checkpoints(directory)
    ]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint at {newest} (nor checkpoint-step*.pt beside it)")
    best: tuple[int, dict, str] | None = None
    reasons = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            missing = [k for k in require if k not in ckpt]
            if missing:
                raise CheckpointError(f"{path!r} lacks {missing}")
        except (CheckpointError, OSError) as exc:
            reasons.append(str(exc))
            warnings.warn(f"skipping checkpoint {path}: {exc}", RuntimeWarning, stacklevel=2)
            continue
        step = int(ckpt.get("train", {}).get("step", -1))
        if best is None or step > best[0]:
            best = (step, ckpt, path)
        if path != newest:
            break  # step files are visited newest first: the first valid one is the newest
    if best is None:
        raise CheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(reasons))
    return best[1], best[2]


def load_for_resume(directory: str, name: str, ctx) -> dict:
    """``--resume`` on every rank: rank 0 picks the newest valid checkpoint (skipping corrupt ones
    with a warning), every rank then loads that same file.  The returned dict carries the chosen
    path under ``"_path"``.

    Raises (on every rank alike): FileNotFoundError (nothing there), CheckpointError (nothing
    valid)."""
    choice: tuple[str, str] = ("", "")
    if ctx.is_main:
        try:
            _, path = load_newest_valid(directory, name, require=("train",))
            choice = ("ok", path)
        except (FileNotFoundError, CheckpointError) as exc:
            choice = (type(exc).__name__, f"--resume: {exc}")
    from .distributed import gather_objects

    status, value = gather_objects(choice, ctx)[0]
    if status == "FileNotFoundError":
        raise FileNotFoundError(value)
    if status != "ok":
        raise CheckpointError(value)
    return load_checkpoint(value) | {"_path": value}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (hex, 32 chars) of ``module.config`` (JSON, sorted keys) and of its state dict in
    key order (names, then raw bytes): two modules share it only when config and weights match."""
    h = hashlib.sha256()
    h.update(json.dumps(module.config, sort_keys=True).encode())
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]
