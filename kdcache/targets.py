"""Where a training step's crops and teacher logits come from.

A run picks its mode once, as one :class:`TargetSource`:

* :class:`PlainTargets`: seeded crops, no teacher.
* :class:`CachedTargets`: crops and teacher logits replayed from a cache
  (view ``epoch mod K``, or ``(epoch*M + j) mod K`` with M views per step);
  the teacher never runs.
* :class:`OnlineTeacher`: seeded crops, the teacher runs live on them.

Each source hands the DataLoader a small picklable *view source* that runs in
the workers (sampling or reading crops, reading cached logits), and gives the
training loop the teacher logits for a batch. The loop, the loss and the
batch order are the same for all three.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .augment import Preprocess, sample_crop, view_rng
from .cache import CacheReader
from .config import CropRanges


class SeededViews:
    """Crops drawn from ``(seed, sample_id, view)``, with ``view = slot`` (the epoch when M = 1)."""

    def __init__(self, seed: int, ranges: CropRanges) -> None:
        self.seed = seed
        self.ranges = ranges

    def view(self, slot: int) -> int:
        """The view of view slot ``epoch * views_per_step + j``."""
        return slot

    def fetch(self, rows: np.ndarray, ids: np.ndarray, sizes: list[tuple[int, int]], view: int) -> dict:
        boxes, flips = zip(*(sample_crop(view_rng(self.seed, sid, view), h, w, self.ranges)
                             for sid, (h, w) in zip(ids, sizes)))
        return {"boxes": np.stack(boxes), "flips": np.array(flips, dtype=bool)}


class CachedViews:
    """Crops and teacher logits read from a cache, with ``view = slot mod K`` (slot: the epoch when M = 1)."""

    def __init__(self, reader: CacheReader) -> None:
        self.reader = reader

    def view(self, slot: int) -> int:
        """The cached view of view slot ``epoch * views_per_step + j``; views repeat after K slots."""
        return slot % self.reader.info.num_views

    def fetch(self, rows: np.ndarray, ids: np.ndarray, sizes: list[tuple[int, int]], view: int) -> dict:
        boxes, flips, logits = self.reader.read(rows, view)
        return {"boxes": boxes, "flips": flips, "teacher_logits": torch.from_numpy(logits)}


class TargetSource:
    """The mode of a training run: its view source and its teacher logits."""

    mode = "plain"
    views: SeededViews | CachedViews

    def teacher_logits(self, batch: dict, inputs: torch.Tensor) -> torch.Tensor | None:
        """Teacher logits for `batch` (already on the device as `inputs`), or None."""
        return None


class PlainTargets(TargetSource):
    """No teacher: cross-entropy on the labels only."""

    def __init__(self, seed: int, ranges: CropRanges) -> None:
        self.views = SeededViews(seed, ranges)


class CachedTargets(TargetSource):
    """Teacher logits and crops replayed from a cache file."""

    mode = "cached"

    def __init__(self, reader: CacheReader) -> None:
        self.reader = reader
        self.views = CachedViews(reader)

    def teacher_logits(self, batch: dict, inputs: torch.Tensor) -> torch.Tensor:
        return batch["teacher_logits"].to(inputs.device, non_blocking=True)


class OnlineTeacher(TargetSource):
    """A live teacher run on exactly the crops the student sees."""

    mode = "online"

    def __init__(self, teacher: nn.Module, seed: int, ranges: CropRanges, amp_dtype: torch.dtype | None = None) -> None:
        self.teacher = teacher.eval()
        self.views = SeededViews(seed, ranges)
        self.amp_dtype = amp_dtype

    @torch.no_grad()  # not inference_mode: the loss saves these logits for backward
    def teacher_logits(self, batch: dict, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(inputs.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return self.teacher(inputs).float()


def preprocess_of_cache(reader: CacheReader) -> Preprocess:
    """The preprocessing the teacher saw when the cache was dumped."""
    info = reader.info
    return Preprocess(size=info.input_size, mean=tuple(info.mean), std=tuple(info.std),
                      interpolation=info.interpolation, crop_pct=info.crop_pct)


def ranges_of_cache(reader: CacheReader) -> CropRanges:
    info = reader.info
    return CropRanges(scale=tuple(info.crop_scale), ratio=tuple(info.crop_ratio), hflip=info.hflip)
