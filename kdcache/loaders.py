"""torch Datasets and DataLoaders for the three kinds of pass over the data.

* :class:`TrainViews`: one view per image per epoch, crops from a view source
  (seeded or cached), cached teacher logits read batch-wise in the worker.
* :class:`DumpViews`: all K seeded views of an image, decoded once.
* :class:`EvalViews`: the deterministic evaluation view.

Batches stay uint8 until they reach the device. The epoch's batch order is a
permutation drawn from ``(seed, epoch)``, so every mode sees the same batches.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import Preprocess, apply_crop, eval_view, sample_crop, view_rng
from .config import CropRanges
from .data import ImageSet
from .targets import CachedViews, SeededViews


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; leave the cores' threads to the model


def _identity(batch: dict) -> dict:
    return batch


class EpochOrder(Sampler[int]):
    """A shuffled order of the rows that depends on ``(seed, epoch)`` only."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.size).tolist())


class TrainViews(Dataset):
    """Training batches: the epoch's view of each image, and cached targets if any."""

    def __init__(self, images: ImageSet, views: SeededViews | CachedViews, prep: Preprocess) -> None:
        self.images = images
        self.views = views
        self.prep = prep
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict:
        rows = np.asarray(indices, dtype=np.int64)
        view = self.views.view(self.epoch)
        pixels = [self.images.load(int(r)) for r in rows]
        sizes = [(int(p.shape[-2]), int(p.shape[-1])) for p in pixels]
        fetched = self.views.fetch(rows, self.images.ids[rows], sizes, view)
        crops = [apply_crop(p, box, bool(flip), self.prep)
                 for p, box, flip in zip(pixels, fetched["boxes"], fetched["flips"])]
        batch = {"images": torch.stack(crops), "labels": torch.from_numpy(self.images.labels[rows]),
                 "rows": torch.from_numpy(rows), "view": view}
        if "teacher_logits" in fetched:
            batch["teacher_logits"] = fetched["teacher_logits"]
        return batch


class DumpViews(Dataset):
    """All K seeded views of one image, with their boxes and flips."""

    def __init__(self, images: ImageSet, seed: int, ranges: CropRanges, num_views: int, prep: Preprocess) -> None:
        self.images, self.seed, self.ranges, self.num_views, self.prep = images, seed, ranges, num_views, prep

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> dict:
        pixels = self.images.load(row)
        h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
        sample_id = int(self.images.ids[row])
        boxes, flips = zip(*(sample_crop(view_rng(self.seed, sample_id, v), h, w, self.ranges)
                             for v in range(self.num_views)))
        crops = [apply_crop(pixels, box, flip, self.prep) for box, flip in zip(boxes, flips)]
        return {"images": torch.stack(crops), "boxes": torch.from_numpy(np.stack(boxes)),
                "flips": torch.tensor(flips), "rows": row}


class EvalViews(Dataset):
    """The deterministic evaluation view of each image."""

    def __init__(self, images: ImageSet, prep: Preprocess) -> None:
        self.images, self.prep = images, prep

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int]:
        return eval_view(self.images.load(row), self.prep), int(self.images.labels[row])


def _loader_kwargs(workers: int, device: torch.device) -> dict:
    kwargs = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kwargs.update(worker_init_fn=_single_thread_worker, persistent_workers=False, prefetch_factor=4)
    return kwargs


def train_loader(dataset: TrainViews, order: EpochOrder, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """Batches of `dataset` in `order`; the last partial batch is dropped when there are full ones."""
    drop_last = len(dataset) > batch_size
    return DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=drop_last,
                      collate_fn=_identity, **_loader_kwargs(workers, device))


def dump_loader(dataset: DumpViews, rows: np.ndarray, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """Batches of images (each with all its views) for the rows still to dump, in order."""
    return DataLoader(dataset, batch_size=batch_size, sampler=rows.tolist(), **_loader_kwargs(workers, device))


def eval_loader(dataset: EvalViews, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_kwargs(workers, device))
