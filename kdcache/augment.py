"""Replayable augmentation: sample a crop, store it, apply it.

Sampling and applying are separate. :func:`sample_crop` draws a
RandomResizedCrop box and a flip from a ``numpy.random.Generator`` that
:func:`view_rng` derives from ``(seed, sample_id, view)`` alone, so the same
triple gives the same crop in any process, worker or batch order. The box is
stored as float32 fractions of the image height and width (top, left, height,
width); :func:`apply_crop` turns it back into pixels and crops, so a student
replays a cached view with no random numbers at all.

Pixels stay uint8 until :func:`normalize`, which runs on the training device.
Under a recipe beyond crop and flip (:mod:`kdcache.recipe`) the worker
renders normalised float pixels instead, and :func:`normalize` passes them
through, so any loop may call it on any batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from .config import CropRanges


@dataclass(frozen=True)
class Preprocess:
    """How pixels become model input: resolved from timm's data config."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # 'bilinear' or 'bicubic'
    crop_pct: float  # evaluation: resize to size / crop_pct, then center-crop

    @classmethod
    def for_model(cls, model: torch.nn.Module, size: int) -> Preprocess:
        """The model's timm data config, at input size `size`."""
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        interpolation = cfg.get("interpolation", "bilinear")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            interpolation = "bilinear"
        return cls(
            size=size,
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=interpolation,
            crop_pct=float(cfg.get("crop_pct", 0.875)),
        )

    @property
    def mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)


def view_rng(seed: int, sample_id: int, view: int) -> np.random.Generator:
    """The generator for one (image, view): a function of the three numbers only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(sample_id), int(view)]))


def sample_crop(rng: np.random.Generator, height: int, width: int, ranges: CropRanges) -> tuple[np.ndarray, bool]:
    """Draw a RandomResizedCrop box and a horizontal flip.

    The box area is a `ranges.scale` fraction of the image and its aspect ratio
    is log-uniform in `ranges.ratio`; after ten misses it falls back to the
    largest central box whose ratio is inside the range. Returns the box as
    float32 fractions ``[top, left, height, width]`` and the flip.
    """
    area = height * width
    log_lo, log_hi = math.log(ranges.ratio[0]), math.log(ranges.ratio[1])
    box = None
    for _ in range(10):
        target = area * rng.uniform(*ranges.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:
        aspect = width / height
        if aspect < ranges.ratio[0]:
            w, h = width, int(round(width / ranges.ratio[0]))
        elif aspect > ranges.ratio[1]:
            h, w = height, int(round(height * ranges.ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(rng.random() < ranges.hflip)
    fractions = np.array([box[0] / height, box[1] / width, box[2] / height, box[3] / width], dtype=np.float32)
    return fractions, flip


def sample_crops(seed: int, ids: np.ndarray, sizes: list[tuple[int, int]], view: int,
                 ranges: CropRanges) -> tuple[np.ndarray, np.ndarray]:
    """The crops of view `view` of images `ids` of (height, width) `sizes`: boxes (B,4) float32 and flips (B,) bool.

    The one place a batch's crops are derived from ``(seed, sample id, view)``:
    seeded training, and the reader of a compact cache, which stores no crops.
    """
    if len(ids) == 0:
        return np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=bool)
    boxes, flips = zip(*(sample_crop(view_rng(seed, int(sid), view), int(h), int(w), ranges)
                         for sid, (h, w) in zip(ids, sizes)))
    return np.stack(boxes), np.array(flips, dtype=bool)


def box_pixels(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """A fractional box back in whole pixels (top, left, height, width), inside the image."""
    top = min(int(round(float(box[0]) * height)), height - 1)
    left = min(int(round(float(box[1]) * width)), width - 1)
    h = max(1, min(int(round(float(box[2]) * height)), height - top))
    w = max(1, min(int(round(float(box[3]) * width)), width - left))
    return top, left, h, w


def apply_crop(image: torch.Tensor, box: np.ndarray, flip: bool, prep: Preprocess) -> torch.Tensor:
    """Crop `image` (uint8, 3xHxW) to `box`, resize to the input size, flip if asked."""
    top, left, h, w = box_pixels(box, image.shape[-2], image.shape[-1])
    out = TF.resized_crop(image, top, left, h, w, size=[prep.size, prep.size], interpolation=prep.mode, antialias=True)
    return TF.horizontal_flip(out) if flip else out


def eval_view(image: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """The deterministic evaluation view: resize the short side, then center-crop."""
    resize_to = int(math.floor(prep.size / prep.crop_pct))
    out = TF.resize(image, [resize_to], interpolation=prep.mode, antialias=True)
    return TF.center_crop(out, [prep.size, prep.size])


def normalize(batch: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 images (Bx3xHxW) to normalized float32, on the batch's device; float images are already normalised.

    A float batch is a recipe's views, normalised (then erased and mixed) in
    the worker; it is returned as it is, so the teacher and the student get
    the very tensor the worker made.
    """
    if batch.is_floating_point():
        return batch
    x = TF.to_dtype(batch, torch.float32, scale=True)
    return TF.normalize(x, list(prep.mean), list(prep.std))
