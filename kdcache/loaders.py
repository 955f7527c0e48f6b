"""torch Datasets and DataLoaders for the three kinds of pass over the data.

* :class:`TrainViews`: M views per image per epoch (M = ``views_per_step``,
  default 1), the image decoded once for all of them; crops from a view source
  (seeded or cached), cached teacher logits read batch-wise in the worker.
* :class:`DumpViews`: all K seeded views of an image, decoded once.
* :class:`EvalViews`: the deterministic evaluation view.

Batches stay uint8 until they reach the device, except under a recipe
beyond crop and flip (:mod:`kdcache.recipe`): its views are rendered in the
worker, as normalised float32 pixels (erased and mixed where the view's
parameters say so), by :func:`render_views` for the dump and for training
alike, so the teacher and the student get the very same tensor.

The epoch's batch order is a
permutation drawn from ``(seed, epoch)``, so every mode sees the same batches,
and under torchrun every rank takes its share of that same permutation.

The epoch reaches the workers explicitly, the way
``DistributedSampler.set_epoch`` does it: :meth:`EpochOrder.set_epoch` runs in
the main process before an epoch's iteration, and :class:`EpochBatches` hands
each batch's rows to the workers as an :class:`EpochBatch` that carries its
epoch. The dataset holds no epoch of its own, so one training DataLoader with
persistent workers serves the whole run: workers start once, and a cache they
load into memory is loaded once per worker per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from .augment import Preprocess, apply_crop, eval_view
from .config import CropRanges, Recipe
from .data import ImageSet
from .errors import CacheError
from .recipe import PARAM_NAMES, is_mixed, param_names, render_view
from .targets import CachedViews, SeededViews


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; leave the cores' threads to the model


def _identity(batch: dict) -> dict:
    return batch


class EpochOrder(Sampler[int]):
    """A shuffled order of the rows that depends on ``(seed, epoch)`` only; under torchrun, one rank's share.

    Alone (``world_size`` 1) it yields the whole permutation. With W processes
    every rank draws the same permutation and keeps the rows one process would
    train on (the first ``(size // batch_size) * batch_size``, since one process
    drops the last partial batch), then takes every W-th from ``rank``. Batches
    of ``batch_size // W`` on each rank then make up exactly the one-process
    batches, step by step, so a sample meets the same step and view whatever W
    is. When the data are no bigger than one batch, the permutation is padded by
    wrapping instead, so every rank has rows and the same number of them.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None) -> None:
        if world_size > 1 and (batch_size is None or batch_size % world_size):
            raise ValueError(f"the global batch size ({batch_size}) must be a multiple of world_size ({world_size})")
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Order the rows for `epoch` from the next iteration on (call it in the main process)."""
        self.epoch = epoch

    def _used(self) -> int:
        """How many entries of the permutation the ranks share out."""
        if self.world_size == 1:
            return self.size
        if self.size > self.batch_size:
            return self.size // self.batch_size * self.batch_size
        return -(-self.size // self.world_size) * self.world_size  # pad up to a multiple of W by wrapping

    def __len__(self) -> int:
        return self._used() // self.world_size

    def permutation(self) -> np.ndarray:
        """The epoch's order of all rows, the same in every process."""
        return np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation()
        if self.world_size > 1:
            perm = np.resize(perm, self._used())[self.rank::self.world_size]
        return iter(perm.tolist())


@dataclass(frozen=True)
class EpochBatch:
    """The rows of one batch and the epoch they belong to: what a worker is asked to load."""

    epoch: int
    rows: list[int]


class EpochBatches(BatchSampler):
    """Batches of an :class:`EpochOrder`, each tagged with the epoch the order was set to when iteration began."""

    sampler: EpochOrder

    def __iter__(self) -> Iterator[EpochBatch]:  # type: ignore[override]
        epoch = self.sampler.epoch  # read now, in the main process, before any batch is handed out
        return (EpochBatch(epoch, rows) for rows in super().__iter__())


def _record(fetched: dict, i: int) -> dict:
    """Record `i` (crop, flip, recipe parameters) of a view source's fetched batch."""
    record = {name: fetched[name][i] for name in PARAM_NAMES if name in fetched}
    return {"crops": fetched["boxes"][i], "flips": fetched["flips"][i], **record}


def render_views(images: ImageSet, source: SeededViews | CachedViews, prep: Preprocess, rows: np.ndarray,
                 pixels: list[torch.Tensor], fetched: list[tuple[int, dict]]) -> tuple[list[torch.Tensor], np.ndarray]:
    """The recipe's pixels of `rows` (decoded as `pixels`) in the views of `fetched` ((view, fetched batch) pairs).

    Returns the views image-major (row 0's views first) and each one's
    partner row (the row itself where the view is not mixed), in the same
    order. A mixed view's partner is decoded here and rendered from its own
    record of the same view: sampled from (seed, partner id, view) or read
    from the cache, as `source` gives records.
    """
    partners: list[dict[int, tuple[torch.Tensor, dict]]] = []
    for view, f in fetched:
        found = {}
        if "mix_partners" in f:
            wanted = np.unique(f["mix_partners"][f["mix_partners"] >= 0])
            if len(wanted) and wanted[-1] >= len(images):
                raise CacheError(f"a stored mixing partner is row {int(wanted[-1])}, but the data have "
                                 f"{len(images)} rows; the cache is damaged: dump it again")
            if len(wanted):
                decoded = [images.load(int(r)) for r in wanted]
                sizes = [(int(p.shape[-2]), int(p.shape[-1])) for p in decoded]
                theirs = source.fetch(wanted, images.ids[wanted], sizes, view, prep.size)
                found = {int(r): (decoded[k], _record(theirs, k)) for k, r in enumerate(wanted)}
        partners.append(found)
    out, partner_rows = [], []
    for i, p in enumerate(pixels):
        for (view, f), found in zip(fetched, partners):
            record = _record(f, i)
            mixed = is_mixed(record)
            partner = found[int(record["mix_partners"])] if mixed else None
            out.append(render_view(p, record, prep, source.recipe, partner))
            partner_rows.append(int(record["mix_partners"]) if mixed else int(rows[i]))
    return out, np.asarray(partner_rows, dtype=np.int64)


class TrainViews(Dataset):
    """Training batches: each image decoded once, its ``views_per_step`` views of the epoch, cached targets if any.

    View slot ``epoch * M + j`` (j < M) is the image's j-th crop in the epoch;
    the view source turns a slot into a view (the slot itself when crops are
    sampled, the slot mod K when they come from a cache of K views). With M > 1
    a batch of B images holds B*M crops, image-major (image 0's M crops first),
    so decoding is paid once per M crops. The epoch comes with each request
    (:class:`EpochBatch`); the dataset keeps none.
    """

    def __init__(self, images: ImageSet, views: SeededViews | CachedViews, prep: Preprocess,
                 views_per_step: int = 1) -> None:
        self.images = images
        self.views = views
        self.prep = prep
        self.views_per_step = views_per_step

    def __len__(self) -> int:
        return len(self.images)

    def epoch_views(self, epoch: int) -> list[int]:
        """The views every image is trained on in `epoch`."""
        m = self.views_per_step
        return [self.views.view(epoch * m + j) for j in range(m)]

    def __getitem__(self, index: tuple[int, int]) -> dict:
        """The batch of one image, from ``(row, epoch)``."""
        row, epoch = index
        return self.batch([row], epoch)

    def __getitems__(self, request: EpochBatch) -> dict:
        return self.batch(request.rows, request.epoch)

    def batch(self, indices: list[int], epoch: int) -> dict:
        """The crops of rows `indices` in `epoch`, with labels, rows, views and any cached teacher logits."""
        rows = np.asarray(indices, dtype=np.int64)
        views = self.epoch_views(epoch)
        pixels = [self.images.load(int(r)) for r in rows]  # decoded once for all the views
        sizes = [(int(p.shape[-2]), int(p.shape[-1])) for p in pixels]
        ids = self.images.ids[rows]
        fetched = [self.views.fetch(rows, ids, sizes, view, self.prep.size) for view in views]
        m = len(views)
        batch = {"labels": torch.from_numpy(np.repeat(self.images.labels[rows], m)),
                 "rows": torch.from_numpy(np.repeat(rows, m)), "view": views[0], "views": views}
        if self.views.recipe.is_default:
            crops = [apply_crop(p, f["boxes"][i], bool(f["flips"][i]), self.prep)
                     for i, p in enumerate(pixels) for f in fetched]
        else:
            crops, partner_rows = render_views(self.images, self.views, self.prep, rows, pixels,
                                               list(zip(views, fetched)))
            if self.views.recipe.mixing:  # the CE term's targets: lambda * y + (1 - lambda) * y_partner
                batch["partner_labels"] = torch.from_numpy(self.images.labels[partner_rows])
                batch["mix_lambdas"] = torch.from_numpy(np.stack([f["mix_lambdas"] for f in fetched], 1).ravel())
        batch["images"] = torch.stack(crops)
        for key in (k for k in fetched[0] if k.startswith("teacher_")):  # logits, and features when asked for
            batch[key] = torch.stack([f[key] for f in fetched], dim=1).flatten(0, 1)
        return batch


class DumpViews(Dataset):
    """The seeded views ``first_view..K-1`` of one image (all K by default), with their boxes and flips.

    A cache that grows from K to K2 views dumps views K..K2-1 only.
    """

    def __init__(self, images: ImageSet, seed: int, ranges: CropRanges, num_views: int, prep: Preprocess,
                 first_view: int = 0, recipe: Recipe | None = None) -> None:
        self.images, self.num_views, self.prep, self.first_view = images, num_views, prep, first_view
        self.source = SeededViews(seed, ranges, recipe or Recipe(), len(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> dict:
        pixels = self.images.load(row)
        rows = np.array([row])
        size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        fetched = [(v, self.source.fetch(rows, self.images.ids[rows], [size], v, self.prep.size))
                   for v in range(self.first_view, self.num_views)]
        boxes = np.concatenate([f["boxes"] for _, f in fetched])
        flips = np.concatenate([f["flips"] for _, f in fetched])
        out = {"boxes": torch.from_numpy(boxes), "flips": torch.from_numpy(flips), "rows": row}
        if self.source.recipe.is_default:  # uint8 crops, normalised on the device
            images = [apply_crop(pixels, box, bool(flip), self.prep) for box, flip in zip(boxes, flips)]
        else:
            images, _ = render_views(self.images, self.source, self.prep, rows, [pixels], fetched)
            out["params"] = {name: torch.from_numpy(np.concatenate([f[name] for _, f in fetched]))
                             for name in param_names(self.source.recipe)}
        out["images"] = torch.stack(images)
        return out


class EvalViews(Dataset):
    """The deterministic evaluation view of each image."""

    def __init__(self, images: ImageSet, prep: Preprocess) -> None:
        self.images, self.prep = images, prep

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int]:
        return eval_view(self.images.load(row), self.prep), int(self.images.labels[row])


def _loader_kwargs(workers: int, device: torch.device, persistent: bool = False) -> dict:
    kwargs = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kwargs.update(worker_init_fn=_single_thread_worker, persistent_workers=persistent, prefetch_factor=4)
    return kwargs


def train_loader(dataset: TrainViews, order: EpochOrder, batch_size: int, workers: int, device: torch.device,
                 persistent: bool = True) -> DataLoader:
    """The run's one training DataLoader: batches of `dataset` in `order`, with workers kept for the whole run.

    Call ``order.set_epoch(epoch)`` before iterating an epoch. The last partial
    batch is dropped when there are full ones. `batch_size` counts images per
    process; a batch holds ``views_per_step`` crops of each.
    ``persistent=False`` starts new workers for every iteration, the old way
    (benchmarks/loader_startup.py compares the two).
    """
    batches = EpochBatches(order, batch_size, drop_last=len(order) > batch_size)
    # Its own generator: starting an iteration draws a seed from it, never from the global RNG that the
    # student's initialisation and dropout use, so training does not depend on the worker count.
    generator = torch.Generator().manual_seed(order.seed)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_identity, generator=generator,
                      **_loader_kwargs(workers, device, persistent=persistent))


def dump_loader(dataset: DumpViews, rows: np.ndarray, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """Batches of images (each with all its views) for the rows still to dump, in order."""
    return DataLoader(dataset, batch_size=batch_size, sampler=rows.tolist(), **_loader_kwargs(workers, device))


def eval_loader(dataset: EvalViews, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_kwargs(workers, device))
