"""Where a training step's crops and teacher logits come from.

A run picks its mode once, as one :class:`TargetSource`:

* :class:`PlainTargets`: seeded crops, no teacher.
* :class:`CachedTargets`: crops and teacher logits replayed from a cache
  (view ``epoch mod K``, or ``(epoch*M + j) mod K`` with M views per step);
  the teacher never runs. Several caches of the same crops replay as one
  ensemble teacher (:class:`EnsembleViews`), once :func:`check_caches_agree`
  has proved that they store the same crops.
* :class:`OnlineTeacher`: seeded crops, the teacher runs live on them.

Each source hands the DataLoader a small picklable *view source* that runs in
the workers (sampling or reading crops, reading cached logits), and gives the
training loop the teacher logits for a batch. The loop, the loss and the
batch order are the same for all three. :func:`create_target_source` picks the
source for a :class:`~kdcache.config.TrainConfig`, after
:func:`check_cache_fits` has made sure a cache belongs to the run's data.
A cache's crop boxes are fractions of the image, so a student may train at
another input size than the teacher saw: the same boxes, resized to its size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .augment import Preprocess, sample_crops
from .cache import CacheReader
from .compatibility import check_cache_fits, check_caches_agree  # re-exported: the checks a run's caches pass
from .config import CropRanges, Recipe, TrainConfig
from .data import ImageSet
from .devices import channels_last
from .errors import CacheError
from .features import FeatureSpec, model_outputs, pooled_width, target_kind
from .losses import ensemble_logits
from .models import build, check_input_size, file_sha256
from .recipe import replay_notes, sample_records
from .report import Progress


class SeededViews:
    """Crops drawn from ``(seed, sample_id, view)``, with ``view = slot`` (the epoch when M = 1)."""

    def __init__(self, seed: int, ranges: CropRanges, recipe: Recipe | None = None, num_rows: int = 0) -> None:
        self.seed, self.ranges = seed, ranges
        self.recipe = recipe or Recipe()  # beyond crop and flip, the views' parameters come from sample_view
        self.num_rows = num_rows  # the rows a mixing partner is drawn from

    def view(self, slot: int) -> int:
        """The view of view slot ``epoch * views_per_step + j``."""
        return slot

    def fetch(self, rows: np.ndarray, ids: np.ndarray, sizes: list[tuple[int, int]], view: int,
              size: int | None = None) -> dict:
        """Crop boxes and flips of `rows` (and, under a recipe, every parameter of views of input size `size`)."""
        if self.recipe.is_default:
            boxes, flips = sample_crops(self.seed, ids, sizes, view, self.ranges)
            return {"boxes": boxes, "flips": flips}
        records = sample_records(self.seed, rows, ids, sizes, view, self.ranges, self.recipe, self.num_rows, size)
        return {"boxes": records.pop("crops"), "flips": records.pop("flips").astype(bool), **records}


class CachedViews:
    """Crops and teacher logits (and the features `kinds`) read from a cache, with ``view = slot mod K``
    (slot: the epoch when M = 1).

    A compact cache stores no crops: the reader derives them from the image
    `sizes` with the code :class:`SeededViews` uses.
    """

    def __init__(self, reader: CacheReader, kinds: Sequence[str] = ()) -> None:
        self.reader = reader
        self.recipe = reader.recipe  # replayed from the stored parameters, never sampled
        self.kinds = tuple(kinds)

    def view(self, slot: int) -> int:
        """The cached view of view slot ``epoch * views_per_step + j``; views repeat after K slots."""
        return slot % self.reader.info.num_views

    def fetch(self, rows: np.ndarray, ids: np.ndarray, sizes: list[tuple[int, int]], view: int,
              size: int | None = None) -> dict:
        records = self.reader.read_records(rows, view, sizes)  # flips and the recipe's parameters as they are
        features = records.pop("features")
        records["boxes"], records["teacher_logits"] = records.pop("crops"), torch.from_numpy(records["teacher_logits"])
        records.update({f"teacher_{kind}": torch.from_numpy(features[kind]) for kind in self.kinds})
        return records


class EnsembleViews:
    """Crops read from the first of several caches that store the same crops; their teachers combined as one target.

    The target's softmax at `temperature` is the `weights`-weighted mean of
    the teachers' softmax at it (:func:`~kdcache.losses.ensemble_logits`).
    Views repeat after the smallest K of the caches: view ``v`` of every cache
    is the crop of ``(seed, sample id, v)``, so their first views agree.
    """

    def __init__(self, readers: Sequence[CacheReader], weights: Sequence[float], temperature: float) -> None:
        self.readers = list(readers)
        self.weights = tuple(weights)
        self.temperature = temperature
        self.num_views = min(r.info.num_views for r in self.readers)
        self.recipe = self.readers[0].recipe  # the caches' recipes are checked equal (SHARED_SETTINGS)

    def view(self, slot: int) -> int:
        """The cached view of view slot ``epoch * views_per_step + j``; views repeat after the smallest K."""
        return slot % self.num_views

    def fetch(self, rows: np.ndarray, ids: np.ndarray, sizes: list[tuple[int, int]], view: int,
              size: int | None = None) -> dict:
        reads = [reader.read_records(rows, view, sizes) for reader in self.readers]
        first = reads[0]  # the others' crops were checked equal, bit for bit, at open; their recipes equal
        first["teacher_logits"] = ensemble_logits([torch.from_numpy(r["teacher_logits"]) for r in reads],
                                                  self.weights, self.temperature)
        first["boxes"] = first.pop("crops")
        del first["features"]  # feature KD replays one cache (TrainConfig refuses an ensemble)
        return first


class TargetSource:
    """The mode of a training run: its view source and its teacher logits.

    `prep` is the teacher's preprocessing at the student's input size, which
    the student then trains on too (None: no teacher, the student's own);
    `crops` are the ranges its crops follow; `record` holds what the run's
    metrics say about the teacher.
    """

    mode = "plain"
    views: SeededViews | CachedViews
    prep: Preprocess | None = None
    crops: CropRanges
    record: dict
    # The teacher feature the run distils, if any, and its size: {'pooled': D} or {'attention': S}.
    feature_sizes: dict[str, int] = {}

    def teacher_logits(self, batch: dict, inputs: torch.Tensor) -> torch.Tensor | None:
        """Teacher logits for `batch` (already on the device as `inputs`), or None."""
        return None

    def teacher_targets(self, batch: dict, inputs: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The teacher's targets for `batch`: ``logits`` (None in plain mode) and the distilled feature, if any."""
        return {"logits": self.teacher_logits(batch, inputs)}


class PlainTargets(TargetSource):
    """No teacher: cross-entropy on the labels only."""

    def __init__(self, seed: int, ranges: CropRanges, recipe: Recipe | None = None, num_rows: int = 0) -> None:
        self.views, self.crops, self.record = SeededViews(seed, ranges, recipe, num_rows), ranges, {}


class CachedTargets(TargetSource):
    """Teacher logits and crops replayed from a cache file, or from several as an ensemble teacher.

    The student trains at `img_size` (the first cache's input size when
    None) on the caches' crop boxes, normalised with their mean, std and
    interpolation. `weights` (one per cache, summing to 1; None: equal) and
    `temperature` combine several teachers; one cache replays its logits as
    stored.
    """

    mode = "cached"

    def __init__(self, readers: CacheReader | Sequence[CacheReader], img_size: int | None = None,
                 weights: Sequence[float] | None = None, temperature: float = 1.0,
                 feature_loss: str | None = None, attention_size: int | None = None) -> None:
        readers = [readers] if isinstance(readers, CacheReader) else list(readers)
        first = readers[0]
        weights = tuple(weights) if weights is not None else (1.0 / len(readers),) * len(readers)
        self.readers = readers
        if feature_loss is not None:
            self.feature_sizes = cached_feature_size(first, feature_loss, attention_size)
        kinds = tuple(self.feature_sizes)
        self.views = CachedViews(first, kinds) if len(readers) == 1 else EnsembleViews(readers, weights, temperature)
        self.prep = preprocess_of_cache(first, img_size)
        self.crops = ranges_of_cache(first)  # cached crops follow the dump's ranges
        infos = [r.info for r in readers]
        self.record = {"cache_views": min(i.num_views for i in infos), "caches": [str(r.path) for r in readers],
                       "teachers": [i.teacher for i in infos], "teacher_weights": list(weights),
                       "teacher_img_sizes": [i.input_size for i in infos]}
        if len(readers) == 1:
            self.record.update(cache=str(first.path), teacher=first.info.teacher, cache_store=first.info.store)

    def teacher_logits(self, batch: dict, inputs: torch.Tensor) -> torch.Tensor:
        return batch["teacher_logits"].to(inputs.device, non_blocking=True)

    def teacher_targets(self, batch: dict, inputs: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {"logits": self.teacher_logits(batch, inputs),
                **{k: batch[f"teacher_{k}"].to(inputs.device, non_blocking=True) for k in self.feature_sizes}}


def cached_feature_size(reader: CacheReader, feature_loss: str, attention_size: int | None = None) -> dict[str, int]:
    """{kind: size} of the feature `feature_loss` needs, from `reader`; a cache without it is refused in one line."""
    kind = target_kind(feature_loss)
    stored = {f.kind: f.size for f in reader.features}
    if kind not in stored:
        option = "pooled" if kind == "pooled" else "attention:S"
        raise CacheError(f"{reader.path} stores no {kind} features, which --feature-loss {feature_loss} needs; "
                         f"dump it again with dump-teacher --features {option}")
    if kind == "attention" and attention_size not in (None, stored[kind]):
        raise CacheError(f"{reader.path} stores {stored[kind]}x{stored[kind]} attention maps, not --attention-size "
                         f"{attention_size}; leave --attention-size out to use the cache's")
    return {kind: stored[kind]}


class OnlineTeacher(TargetSource):
    """A live teacher run on exactly the crops the student sees."""

    mode = "online"

    def __init__(self, teacher: nn.Module, seed: int, ranges: CropRanges, amp_dtype: torch.dtype | None = None,
                 prep: Preprocess | None = None, record: dict | None = None, recipe: Recipe | None = None,
                 num_rows: int = 0, feature_sizes: dict[str, int] | None = None) -> None:
        self.teacher = teacher.eval()
        self.feature_sizes = dict(feature_sizes or {})
        self.spec = FeatureSpec(pooled="pooled" in self.feature_sizes, attention=self.feature_sizes.get("attention", 0))
        self.views = SeededViews(seed, ranges, recipe, num_rows)
        self.amp_dtype, self.prep, self.crops, self.record = amp_dtype, prep, ranges, record or {}

    def teacher_logits(self, batch: dict, inputs: torch.Tensor) -> torch.Tensor:
        return self._outputs(inputs)[0]

    def teacher_targets(self, batch: dict, inputs: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if self.spec.empty:  # logits only: through teacher_logits, as before features existed
            return {"logits": self.teacher_logits(batch, inputs)}
        logits, features = self._outputs(inputs)
        return {"logits": logits, **features}

    @torch.no_grad()  # not inference_mode: the loss saves these targets for backward
    def _outputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same computation as the dump's (:func:`kdcache.features.model_outputs`), on the student's crops."""
        with torch.autocast(inputs.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits, features = model_outputs(self.teacher, inputs, self.spec)
        return logits.float(), {k: v.float() for k, v in features.items()}


def preprocess_of_cache(reader: CacheReader, size: int | None = None) -> Preprocess:
    """The preprocessing the teacher saw when the cache was dumped, at input size `size` (None: the teacher's)."""
    info = reader.info
    return Preprocess(size=size or info.input_size, mean=tuple(info.mean), std=tuple(info.std),
                      interpolation=info.interpolation, crop_pct=info.crop_pct)


def ranges_of_cache(reader: CacheReader) -> CropRanges:
    info = reader.info
    return CropRanges(scale=tuple(info.crop_scale), ratio=tuple(info.crop_ratio), hflip=info.hflip)


def _note_sizes(readers: Sequence[CacheReader], img_size: int, progress: Progress) -> None:
    views = [r.info.num_views for r in readers]
    if len(set(views)) > 1:
        k = min(views)
        held = ", ".join(f"{r.path} {v}" for r, v in zip(readers, views))
        progress.note(f"the caches hold different view counts ({held}): the ensemble replays views 0..{k - 1} "
                      "of each, the views they share")
    for reader in readers:
        if reader.info.input_size != img_size:
            progress.note(f"{reader.path} was dumped at {reader.info.input_size} px; the student trains at "
                          f"{img_size} px on the same crop boxes, resized to {img_size} px")


def _note_view_reuse(config: TrainConfig, num_views: int, progress: Progress) -> None:
    k, m = num_views, config.views_per_step
    if m > k:
        progress.note(f"--views-per-step {m} but {k} cached views: each step trains on some views of an "
                      "image more than once")
    elif config.epochs * m > k:
        rule = f"epoch e uses view e mod {k}" if m == 1 else f"epoch e uses views (e*{m} + j) mod {k}, j < {m}"
        progress.note(f"{config.epochs} epochs x {m} views per step but {k} cached views: {rule}, "
                      "so views are reused")


def create_target_source(config: TrainConfig, readers: CacheReader | Sequence[CacheReader] | None, train: ImageSet,
                         img_size: int, device: torch.device, amp: torch.dtype | None,
                         progress: Progress | None = None) -> TargetSource:
    """The run's mode as one object: replay `readers` (the open ``config.cached`` files, one or an ensemble),
    run ``config.online_teacher`` live, or plain training on labels.

    Each cache is checked against the training split, and several caches
    against each other; the student may train at another `img_size` than the
    teacher saw (noted). An online teacher is built on `device` and tried on
    one `img_size` input.
    """
    progress = progress or Progress()
    readers = [readers] if isinstance(readers, CacheReader) else list(readers or ())
    if readers:
        for reader in readers:
            check_cache_fits(reader, train)
        check_caches_agree(readers)
        _note_sizes(readers, img_size, progress)
        _note_view_reuse(config, min(r.info.num_views for r in readers), progress)
        for note in replay_notes(config.recipe, readers[0].recipe, readers[0].attrs, readers[0].path):
            progress.note(note)
        return CachedTargets(readers, img_size, config.teacher_weights, config.temperature, config.feature_loss,
                             config.attention_size)
    if config.online_teacher:
        teacher = build(config.online_teacher, train.num_classes, img_size, pretrained=config.teacher_pretrained,
                        checkpoint=config.teacher_checkpoint).to(device)
        teacher = channels_last(teacher, device)
        check_input_size(teacher, config.online_teacher, img_size, device)
        record = {"teacher": config.online_teacher,
                  "teacher_checkpoint_sha256": file_sha256(config.teacher_checkpoint) if config.teacher_checkpoint
                  else ""}
        sizes = {}
        if config.feature_loss is not None:
            kind = target_kind(config.feature_loss)
            sizes = {kind: config.attention_size if kind == "attention" else pooled_width(teacher, img_size)}
        return OnlineTeacher(teacher, config.run.seed, config.crops, amp, Preprocess.for_model(teacher, img_size),
                             record, config.recipe, len(train), sizes)
    return PlainTargets(config.run.seed, config.crops, config.recipe, len(train))
