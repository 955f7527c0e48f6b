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
batch order are the same for all three. :func:`create_target_source` picks the
source for a :class:`~kdcache.config.TrainConfig`, after
:func:`check_cache_fits` has made sure a cache belongs to the run's data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .augment import Preprocess, sample_crop, view_rng
from .cache import CacheReader
from .config import CropRanges, TrainConfig
from .data import ImageSet
from .devices import channels_last
from .errors import CacheError
from .models import build, check_input_size, file_sha256
from .report import Progress


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
    """The mode of a training run: its view source and its teacher logits.

    `prep` is the teacher's preprocessing, which the student then trains on
    too (None: no teacher, the student's own); `crops` are the ranges its crops
    follow; `record` holds what the run's metrics say about the teacher.
    """

    mode = "plain"
    views: SeededViews | CachedViews
    prep: Preprocess | None = None
    crops: CropRanges
    record: dict

    def teacher_logits(self, batch: dict, inputs: torch.Tensor) -> torch.Tensor | None:
        """Teacher logits for `batch` (already on the device as `inputs`), or None."""
        return None


class PlainTargets(TargetSource):
    """No teacher: cross-entropy on the labels only."""

    def __init__(self, seed: int, ranges: CropRanges) -> None:
        self.views = SeededViews(seed, ranges)
        self.crops = ranges
        self.record = {}


class CachedTargets(TargetSource):
    """Teacher logits and crops replayed from a cache file."""

    mode = "cached"

    def __init__(self, reader: CacheReader) -> None:
        info = reader.info
        self.reader = reader
        self.views = CachedViews(reader)
        self.prep = preprocess_of_cache(reader)
        self.crops = ranges_of_cache(reader)  # cached crops follow the dump's ranges
        self.record = {"cache": str(reader.path), "cache_views": info.num_views, "teacher": info.teacher,
                       "cache_store": info.store}

    def teacher_logits(self, batch: dict, inputs: torch.Tensor) -> torch.Tensor:
        return batch["teacher_logits"].to(inputs.device, non_blocking=True)


class OnlineTeacher(TargetSource):
    """A live teacher run on exactly the crops the student sees."""

    mode = "online"

    def __init__(self, teacher: nn.Module, seed: int, ranges: CropRanges, amp_dtype: torch.dtype | None = None,
                 prep: Preprocess | None = None, record: dict | None = None) -> None:
        self.teacher = teacher.eval()
        self.views = SeededViews(seed, ranges)
        self.amp_dtype = amp_dtype
        self.prep = prep
        self.crops = ranges
        self.record = record or {}

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



def _dataset_side(reader: CacheReader, train: ImageSet) -> tuple[str, np.ndarray]:
    """The split's fingerprint and content hashes under the scheme the cache recorded."""
    scheme = reader.info.content_hash
    return train.fingerprint_for(scheme), train.content_hashes_for(scheme)


def check_cache_fits(reader: CacheReader, train: ImageSet, img_size: int) -> None:
    """Refuse a cache made for another dataset, split, class count or input size, saying what differs."""
    info, path = reader.info, reader.path
    fingerprint, hashes = _dataset_side(reader, train)
    if info.dataset_fingerprint != fingerprint:
        if len(reader.sample_ids) != len(train):
            why = f"it holds {len(reader.sample_ids)} images, the training split has {len(train)}"
        elif info.num_classes != train.num_classes:
            why = f"it has {info.num_classes} classes, the dataset has {train.num_classes}"
        elif not np.array_equal(reader.sample_ids, train.ids):
            n = int(np.sum(reader.sample_ids != train.ids))
            why = f"{n} sample ids differ (another dataset, split or file names)"
        elif not np.array_equal(reader.labels, train.labels):
            row = int(np.flatnonzero(reader.labels != train.labels)[0])
            why = f"labels differ, first at {train.describe(row)}"
        elif not np.array_equal(reader.content_hashes, hashes):
            rows = np.flatnonzero(reader.content_hashes != hashes)
            why = f"{len(rows)} images changed since the dump, first {train.describe(int(rows[0]))}"
        else:
            why = "the class names differ"
        raise CacheError(f"{path} was dumped from another dataset than {train.name} ({why})")
    if img_size != info.input_size:
        raise CacheError(f"{path} was dumped at {info.input_size} px, but --img-size is {img_size}; "
                         f"train at {info.input_size} or dump a new cache")


def _note_view_reuse(config: TrainConfig, num_views: int, progress: Progress) -> None:
    k, m = num_views, config.views_per_step
    if m > k:
        progress.note(f"--views-per-step {m} but {k} cached views: each step trains on some views of an "
                      "image more than once")
    elif config.epochs * m > k:
        rule = f"epoch e uses view e mod {k}" if m == 1 else f"epoch e uses views (e*{m} + j) mod {k}, j < {m}"
        progress.note(f"{config.epochs} epochs x {m} views per step but {k} cached views: {rule}, "
                      "so views are reused")


def create_target_source(config: TrainConfig, reader: CacheReader | None, train: ImageSet, img_size: int,
                         device: torch.device, amp: torch.dtype | None,
                         progress: Progress | None = None) -> TargetSource:
    """The run's mode as one object: replay `reader` (the open ``config.cached``), run ``config.online_teacher``
    live, or plain training on labels.

    A cache is checked against the training split and input size first; an
    online teacher is built on `device` and tried on one `img_size` input.
    """
    progress = progress or Progress()
    if reader is not None:
        check_cache_fits(reader, train, img_size)
        _note_view_reuse(config, reader.info.num_views, progress)
        return CachedTargets(reader)
    if config.online_teacher:
        teacher = build(config.online_teacher, train.num_classes, img_size, pretrained=config.teacher_pretrained,
                        checkpoint=config.teacher_checkpoint).to(device)
        teacher = channels_last(teacher, device)
        check_input_size(teacher, config.online_teacher, img_size, device)
        record = {"teacher": config.online_teacher,
                  "teacher_checkpoint_sha256": file_sha256(config.teacher_checkpoint) if config.teacher_checkpoint
                  else ""}
        return OnlineTeacher(teacher, config.run.seed, config.crops, amp, Preprocess.for_model(teacher, img_size),
                             record)
    return PlainTargets(config.run.seed, config.crops)
