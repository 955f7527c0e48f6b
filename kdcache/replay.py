"""Replaying a cache in any PyTorch loop: a Dataset, a sampler and a collate function.

``kdcache train-student --cached`` is one loop over these same pieces; this
module lends them to loops kdcache does not own (a script, a Lightning module,
timm's ``train.py``)::

    replay = CacheReplay("cache.h5", data="digits")
    sampler = ReplaySampler(replay, seed=0, batch_size=64)
    loader = DataLoader(replay, batch_size=64, sampler=sampler, collate_fn=replay_collate, drop_last=True,
                        num_workers=4, persistent_workers=True)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            x = normalize(batch["images"].to(device), replay.prep)
            ...  kd_loss(model(x), batch["teacher_logits"].to(device), batch["labels"].to(device), ...)

A cache dumped with ``--features`` also gives ``batch["teacher_pooled"]`` and
``batch["teacher_attention"]``; :func:`kdcache.features.model_outputs` computes the
student's own, and :func:`kdcache.losses.feature_loss` compares them.

The epoch travels with every index: the sampler yields ``(row, epoch)`` pairs,
with the epoch read in the main process when an iteration starts, so workers
that live for the whole run (``persistent_workers=True``) serve each epoch's
own view and need no state. Under torchrun each rank's sampler yields its share
of the one-process batches (see :class:`~kdcache.loaders.EpochOrder`).

Batches hold uint8 crops, not normalised floats: a quarter of the bytes
through the workers' queues and host-to-device copies, normalised on the
device with the teacher's mean and std (``replay.prep``), which is what
``train-student`` does, so both give the same inputs. A cache dumped with a
recipe (``--mixup``, ``--aa``, ...) replays its views as the worker renders
them from the stored parameters: normalised float32 pixels, mixed and erased
where the view was, which :func:`~kdcache.augment.normalize` passes through;
such batches add ``partner_labels`` and ``mix_lambdas`` for the label term
(:func:`~kdcache.losses.label_targets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence, Sized

import torch
import torch.distributed as tdist

from .augment import Preprocess
from .cache import CacheInfo, CacheReader
from .compatibility import check_cache_fits
from .data import ImageSet, open_dataset
from .distributed import Dist
from .loaders import EpochBatch, EpochOrder, TrainViews
from .targets import CachedViews, preprocess_of_cache


class CacheReplay(TrainViews):
    """The cached crops of a dataset with their labels and teacher logits, indexed by ``(row, epoch)``.

    `cache` is a complete cache file (or an open :class:`CacheReader`), `data`
    the dataset it was dumped from (a ``--data`` value or an :class:`ImageSet`
    of its training split); a cache of other data is refused with a
    :class:`~kdcache.errors.CacheError` naming what differs. Epoch ``e``
    replays view ``e mod K`` (``(e*M + j) mod K``, j < M, with M
    `views_per_step`): the stored crop, resized to the teacher's input size,
    and the stored teacher logits, decoded by the cache's codec (fp32, fp16 or
    top-k) to float32 over all classes. `preload` as in ``--preload``
    (None: into memory when the file is small).

    Item ``(row, epoch)`` and batches (with :func:`replay_collate`) are dicts:
    ``images`` (B*M,3,S,S) uint8, ``labels`` (B*M,) int64, ``teacher_logits``
    (B*M,C) float32, ``rows`` (B*M,), and ``views`` (the M views of the
    epoch); with stored features also ``teacher_pooled`` (B*M,D) and
    ``teacher_attention`` (B*M,S,S) float32. A batch of ``(row, epoch)`` indices is read from the cache at once,
    in the worker.
    """

    def __init__(self, cache: str | Path | CacheReader, data: str | ImageSet, views_per_step: int = 1,
                 preload: bool | None = None) -> None:
        if views_per_step < 1:
            raise ValueError(f"views_per_step must be at least 1, got {views_per_step}")
        reader = cache if isinstance(cache, CacheReader) else CacheReader(cache, preload=preload)
        images = open_dataset(data, "train") if isinstance(data, str) else data
        check_cache_fits(reader, images)
        kinds = [f.kind for f in reader.features]  # every stored feature rides along with the logits
        super().__init__(images, CachedViews(reader, kinds), preprocess_of_cache(reader), views_per_step)
        self.reader = reader
        self.prep: Preprocess  # the teacher's input size, mean and std: normalise batches with it on the device

    @property
    def info(self) -> CacheInfo:
        """What the cache records about its dump (teacher, seed, store, input size, ...)."""
        return self.reader.info

    @property
    def num_classes(self) -> int:
        return self.reader.info.num_classes

    def __getitem__(self, index: tuple[int, int]) -> dict:
        """The crops, label and teacher logits of one image in one epoch, from ``(row, epoch)``."""
        row, epoch = _pair(index)
        return self.batch([row], epoch)

    def __getitems__(self, indices: Sequence[tuple[int, int]] | EpochBatch) -> dict:
        """A whole batch at once (the DataLoader calls this): one sorted read of the cache per view."""
        if isinstance(indices, EpochBatch):
            return super().__getitems__(indices)
        pairs = [_pair(i) for i in indices]
        epochs = {epoch for _, epoch in pairs}
        if len(epochs) > 1:  # not from ReplaySampler; keep the order asked
            return replay_collate([self.batch([row], epoch) for row, epoch in pairs])
        return self.batch([row for row, _ in pairs], epochs.pop())


def _pair(index: object) -> tuple[int, int]:
    try:
        row, epoch = index  # type: ignore[misc]
        return int(row), int(epoch)
    except (TypeError, ValueError):
        raise TypeError(f"CacheReplay is indexed by (row, epoch), got {index!r}; "
                        "use ReplaySampler as the DataLoader's sampler") from None


def replay_collate(samples: dict | list[dict]) -> dict:
    """One batch from :class:`CacheReplay`'s items: tensors concatenated in order, the epoch's views kept.

    A batch that :meth:`CacheReplay.__getitems__` already read whole passes
    through unchanged.
    """
    if isinstance(samples, dict):
        return samples
    first = samples[0]
    return {key: torch.cat([s[key] for s in samples]) if isinstance(value, torch.Tensor) else value
            for key, value in first.items()}


class ReplaySampler(EpochOrder):
    """``(row, epoch)`` indices in the order ``train-student`` uses: a permutation drawn from ``(seed, epoch)``.

    Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``;
    the epoch is read when an iteration starts. Alone, it yields every row
    once per epoch. Under torchrun, `rank` and `world_size` default to the
    process group's (or torchrun's ``RANK`` and ``WORLD_SIZE`` before it is
    joined), `batch_size` is the global batch, and each rank's DataLoader
    takes ``batch_size // world_size`` (:attr:`per_process_batch`): the ranks'
    step-s batches then make up the one-process step-s batch, so W processes
    train on the same (image, view) pairs at the same steps as one.
    """

    def __init__(self, dataset: Sized, seed: int = 0, batch_size: int | None = None, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if rank is None or world_size is None:
            here = _this_process()
            rank = here.rank if rank is None else rank
            world_size = here.world_size if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        super().__init__(len(dataset), seed, rank, world_size, batch_size)

    @property
    def per_process_batch(self) -> int | None:
        """The DataLoader's batch size on each rank: the global batch over the processes."""
        return None if self.batch_size is None else self.batch_size // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch  # read now, in the main process, before any index reaches a worker
        return ((row, epoch) for row in super().__iter__())


def _this_process() -> Dist:
    """This process's rank and world size: the process group's once joined, else torchrun's environment."""
    if tdist.is_available() and tdist.is_initialized():
        return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size())
    return Dist.from_env()
