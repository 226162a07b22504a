"""Offline datasets for the reference models: ``digits``, ``photos`` or a folder of images.

Everything here reads files that ship inside installed wheels (scikit-learn, scikit-image) or the
user's own folder; nothing is ever downloaded.  scikit-image's ``skimage.data`` *functions* may
fetch some images through pooch, so we open the bundled files by path instead and only use images
that are inside the wheel.

Splits
------
``digits``  scikit-learn ``load_digits`` (1797 grey 8x8 images, values 0..16 -> [0, 1]); the last
            297 images are held out for evaluation.
``photos``  colour photos bundled in scikit-image, scikit-learn and matplotlib.  Training: random
            crops with horizontal flips and colour augmentation (channel orderings + hue
            rotations, see ``CropSampler.colour_aug``) from astronaut, coffee, rocket,
            motorcycle_left/right, ihc, color, logo (skimage), china.jpg (sklearn), grace_hopper
            and Minduka_Present_Blue_Pack (matplotlib).  Evaluation (never trained on): fixed
            non-overlapping tiles of scikit-learn's ``flower.jpg`` and scikit-image's ``chelsea``
            (``eval_photos`` gives them whole).
PATH        a folder of PNG/JPEG files (RGB); sorted file names, every 10th file (at least one,
            when there are two or more) is held out for evaluation.

``load_dataset(name, "eval")`` returns a float32 tensor ``[N, C, H, W]`` in [0, 1] (fixed tiles);
``load_dataset(name, "train")`` returns a :class:`CropSampler` whose ``.sample(batch, generator)``
draws random crops + flips as ``[B, C, S, S]`` float32 in [0, 1].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "load_dataset",
    "eval_groups",
    "eval_photos",
    "CropSampler",
    "PHOTOS_TRAIN",
    "PHOTOS_EVAL",
    "DIGITS_HELD_OUT",
    "default_image_size",
]

DIGITS_HELD_OUT = 297
# Share of photo training crops that are recoloured (see CropSampler.colour_aug).
DEFAULT_COLOUR_AUG = 0.75
# (source, file name) pairs; "skimage" files live in skimage/data, "sklearn" in sklearn/datasets/images.
PHOTOS_TRAIN = (
    ("skimage", "astronaut.png"),
    ("skimage", "coffee.png"),
    ("skimage", "rocket.jpg"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "motorcycle_right.png"),
    ("skimage", "ihc.png"),
    ("sklearn", "china.jpg"),
    # More colours (greens, blues, cyans) that the photos above lack; all ship inside the wheels.
    ("skimage", "color.png"),
    ("skimage", "logo.png"),
    ("matplotlib", "grace_hopper.jpg"),
    ("matplotlib", "Minduka_Present_Blue_Pack.png"),
)
PHOTOS_EVAL = (("sklearn", "flower.jpg"), ("skimage", "chelsea.png"))
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def default_image_size(name: str) -> int:
    """Training crop / evaluation tile size used when ``image_size`` is None."""
    return 8 if name == "digits" else 32


def _data_dir(source: str) -> str:
    if source == "skimage":
        import skimage

        return os.path.join(os.path.dirname(skimage.__file__), "data")
    if source == "sklearn":
        import sklearn.datasets

        return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    if source == "matplotlib":
        import matplotlib

        return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
    raise ValueError(f"unknown image source {source!r}")


def _read_rgb(path: str) -> torch.Tensor:
    """One image file as ``[3, H, W] float32`` in [0, 1] (grey and RGBA are converted to RGB)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _bundled(pairs) -> list[torch.Tensor]:
    return [_read_rgb(os.path.join(_data_dir(src), name)) for src, name in pairs]


def _tiles(img: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping ``size x size`` tiles covering the image (remainder rows/cols dropped),
    row-major: ``[n, C, size, size]``."""
    c, h, w = img.shape
    nh, nw = h // size, w // size
    if nh == 0 or nw == 0:
        raise ValueError(f"image of size {h}x{w} is smaller than the tile size {size}")
    t = img[:, : nh * size, : nw * size].reshape(c, nh, size, nw, size)
    return t.permute(1, 3, 0, 2, 4).reshape(nh * nw, c, size, size).contiguous()


def _digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # [1797, 8, 8], values 0..16
    return torch.from_numpy(images).unsqueeze(1)


def _folder_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise ValueError(
            f"dataset must be 'digits', 'photos' or an existing folder of PNG/JPEG images, got {path!r}"
        )
    files = sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(_IMAGE_EXTS)
    )
    if not files:
        raise ValueError(f"dataset folder {path!r} contains no .png/.jpg/.jpeg files")
    return files


def _folder_split(path: str) -> tuple[list[str], list[str]]:
    files = _folder_files(path)
    if len(files) == 1:
        return files, files  # a single image: train and evaluate on it (stated in the docs)
    held = [f for i, f in enumerate(files) if i % 10 == 9] or [files[-1]]
    train = [f for f in files if f not in held]
    return train, held


# The six orderings of (R, G, B).
_CHANNEL_PERMS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def hue_rotate(img: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate the colours of ``img: [3, H, W]`` in [0, 1] by ``angle`` radians about the grey
    axis R = G = B (a hue shift that keeps R + G + B, so brightness and greys are unchanged);
    results are clamped back to [0, 1] (saturated colours may clip)."""
    c, s = math.cos(angle), math.sin(angle)
    # Rodrigues' rotation about the unit axis (1, 1, 1)/sqrt(3).
    a, b = (1.0 - c) / 3.0, s / math.sqrt(3.0)
    rot = torch.tensor(
        [[c + a, a - b, a + b], [a + b, c + a, a - b], [a - b, a + b, c + a]], dtype=img.dtype
    )
    return torch.einsum("ij,jhw->ihw", rot, img).clamp_(0.0, 1.0)


@dataclass
class CropSampler:
    """Random ``size x size`` crops with random horizontal flips from a list of images.

    Attributes:
        images: list of ``[C, H_i, W_i] float32`` tensors in [0, 1].
        size: crop size S.
        channels: C.
        flip: apply random horizontal flips.
        colour_aug: probability that a crop's colours are changed: a random ordering of the
            RGB channels followed by a random hue rotation of up to ±60 degrees
            (:func:`hue_rotate`), which together reach every hue. The bundled photos are mostly
            red/brown/grey; recoloured crops show the same textures in greens, cyans and blues,
            so the codebook learns colours the training photos lack (without it the held-out
            flower photo's dark green came back navy blue).
    """

    images: list[torch.Tensor]
    size: int
    flip: bool = True
    colour_aug: float = 0.0
    channels: int = field(init=False)

    def __post_init__(self):
        if not self.images:
            raise ValueError("CropSampler needs at least one image")
        if not 0.0 <= float(self.colour_aug) <= 1.0:
            raise ValueError(f"colour_aug must be a probability in [0, 1], got {self.colour_aug!r}")
        self.channels = int(self.images[0].shape[0])
        for im in self.images:
            if im.shape[1] < self.size or im.shape[2] < self.size:
                raise ValueError(
                    f"image of size {tuple(im.shape[1:])} is smaller than the crop size {self.size}"
                )
        # Pick images in proportion to their area so every pixel is equally likely to be seen.
        areas = torch.tensor([float(im.shape[1] * im.shape[2]) for im in self.images])
        self._weights = areas / areas.sum()

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, C, S, S] float32`` random crops (+ flips) in [0, 1]; all randomness from ``generator``."""
        g = generator
        which = torch.multinomial(self._weights, batch_size, replacement=True, generator=g)
        out = torch.empty(batch_size, self.channels, self.size, self.size)
        flips = torch.rand(batch_size, generator=g) < 0.5
        for b in range(batch_size):
            im = self.images[int(which[b])]
            top = int(torch.randint(0, im.shape[1] - self.size + 1, (1,), generator=g))
            left = int(torch.randint(0, im.shape[2] - self.size + 1, (1,), generator=g))
            crop = im[:, top : top + self.size, left : left + self.size]
            out[b] = crop.flip(-1) if (self.flip and bool(flips[b])) else crop
        if self.colour_aug > 0 and self.channels == 3:
            # Drawn after the crops, so colour_aug=0 leaves the random stream as it always was.
            apply = torch.rand(batch_size, generator=g) < self.colour_aug
            which_perm = torch.randint(0, len(_CHANNEL_PERMS), (batch_size,), generator=g)
            angle = (torch.rand(batch_size, generator=g) * 2.0 - 1.0) * (math.pi / 3.0)
            for b in torch.nonzero(apply).flatten().tolist():
                x = out[b][list(_CHANNEL_PERMS[int(which_perm[b])])]
                out[b] = hue_rotate(x, float(angle[b]))
        return out


@dataclass
class TensorSampler:
    """Uniform random draws (with random flips when ``flip``) from a fixed ``[N, C, S, S]`` set."""

    data: torch.Tensor
    flip: bool = False
    channels: int = field(init=False)

    def __post_init__(self):
        self.channels = int(self.data.shape[1])
        self.size = int(self.data.shape[-1])

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(0, self.data.shape[0], (batch_size,), generator=generator)
        out = self.data[idx].clone()
        if self.flip:
            f = torch.rand(batch_size, generator=generator) < 0.5
            out[f] = out[f].flip(-1)
        return out


def eval_groups(name: str, image_size: int | None = None) -> dict[str, torch.Tensor]:
    """Held-out evaluation tiles per source image (photos: ``{"flower": ..., "chelsea": ...}``;
    digits/folder: one group).  Each value is ``[n, C, S, S] float32`` in [0, 1]."""
    size = image_size or default_image_size(name)
    if name == "digits":
        data = _digits()[-DIGITS_HELD_OUT:]
        if size != 8:
            data = torch.nn.functional.interpolate(data, size=(size, size), mode="bilinear")
        return {"digits": data.clamp(0, 1)}
    if name == "photos":
        imgs = _bundled(PHOTOS_EVAL)
        return {"flower": _tiles(imgs[0], size), "chelsea": _tiles(imgs[1], size)}
    _, held = _folder_split(name)
    return {"folder": torch.cat([_tiles(_read_rgb(f), size) for f in held])}


def eval_photos(name: str) -> dict[str, torch.Tensor]:
    """The held-out images WHOLE (not tiled): ``{name: [C, H, W] float32 in [0, 1]}``.

    ``photos``: flower and chelsea; a folder: its held-out files (by file stem); ``digits``: the
    first 8 held-out digits (each is a whole 8x8 image)."""
    if name == "digits":
        data = _digits()[-DIGITS_HELD_OUT:][:8]
        return {f"digit{i}": d for i, d in enumerate(data)}
    if name == "photos":
        return {"flower": _bundled(PHOTOS_EVAL[:1])[0], "chelsea": _bundled(PHOTOS_EVAL[1:])[0]}
    _, held = _folder_split(name)
    return {os.path.splitext(os.path.basename(f))[0]: _read_rgb(f) for f in held}


def load_dataset(
    name: str,
    split: str,
    image_size: int | None = None,
    seed: int = 0,
    colour_aug: float | None = None,
):
    """Load a dataset split.

    Args:
        name: ``"digits"``, ``"photos"`` or a folder path of PNG/JPEG images.
        split: ``"train"`` (returns a sampler with ``.sample(batch_size, generator)`` and
            ``.channels``) or ``"eval"`` (returns fixed tiles ``[N, C, S, S] float32`` in [0, 1]).
        image_size: crop/tile size S (default 8 for digits, 32 otherwise).
        seed: unused by the fixed splits (kept for API stability; the sampler's randomness comes
            from the generator passed to ``.sample``).
        colour_aug: training only: probability of a random RGB channel permutation per crop
            (see :class:`CropSampler`); default ``DEFAULT_COLOUR_AUG`` for ``photos``, 0 otherwise.
    """
    del seed
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    size = image_size or default_image_size(name)
    if split == "eval":
        return torch.cat(list(eval_groups(name, size).values()))
    if name == "digits":
        data = _digits()[:-DIGITS_HELD_OUT]
        if size != 8:
            data = torch.nn.functional.interpolate(data, size=(size, size), mode="bilinear")
        # Digits are not left/right symmetric: no flips.
        return TensorSampler(data.clamp(0, 1).contiguous(), flip=False)
    if name == "photos":
        aug = DEFAULT_COLOUR_AUG if colour_aug is None else colour_aug
        return CropSampler(_bundled(PHOTOS_TRAIN), size, colour_aug=aug)
    train, _ = _folder_split(name)
    return CropSampler([_read_rgb(f) for f in train], size, colour_aug=colour_aug or 0.0)
