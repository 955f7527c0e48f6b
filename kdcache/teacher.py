"""The teacher: batched no-grad logits and the dump loop that fills a cache (or, under torchrun, one part of it)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed, parts
from .augment import Preprocess
from .background import BackgroundWriter
from .cache import CacheInfo, CacheReader, CacheWriter, growth_mismatch, make_witness, store_codec
from .config import DumpConfig
from .data import ImageSet, open_dataset
from .errors import CacheError, KdcacheError
from .features import FeatureSpec, last_map_size, model_outputs, pooled_width
from .loaders import DumpViews, dump_loader
from .lock import FileLock
from .models import build, file_sha256
from .report import Progress
from .devices import amp_dtype, channels_last, model_input, resolve_device

# How long rank 0 waits at the merge for the slowest rank. After a resume one rank may still have its whole
# shard to dump while the others are done, so this is a day, not torch's default of minutes; a rank that
# dies is caught by torchrun, which stops the others, so a long wait never hides a failure.
MERGE_WAIT = _dt.timedelta(hours=24)


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, prep: Preprocess, device: torch.device,
                   amp: torch.dtype | None = None) -> torch.Tensor:
    """float32 logits (B,C) for uint8 crops (B,3,S,S), in eval mode."""
    return teacher_outputs(teacher, images, prep, device, amp)[0]


@torch.inference_mode()
def teacher_outputs(teacher: nn.Module, images: torch.Tensor, prep: Preprocess, device: torch.device,
                    amp: torch.dtype | None = None,
                    spec: FeatureSpec = FeatureSpec()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """float32 logits (B,C) and the float32 features of `spec` for uint8 crops (B,3,S,S), from one forward."""
    x = model_input(images, prep, device)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits, features = model_outputs(teacher, x, spec)
    return logits.float(), {k: v.float() for k, v in features.items()}


def load_teacher(name: str, num_classes: int, img_size: int, device: torch.device, checkpoint: str | None = None,
                 pretrained: bool = False) -> nn.Module:
    """A teacher in eval mode on `device` (channels_last on CUDA)."""
    model = build(name, num_classes, img_size, pretrained=pretrained, checkpoint=checkpoint).to(device).eval()
    return channels_last(model, device)


def dump(config: DumpConfig, progress: Progress | None = None) -> dict:
    """Run the teacher once over K seeded views of every training image; write the cache.

    Resumes an interrupted dump of the same settings. An existing complete
    cache of the same settings with fewer views grows: its views are kept bit
    for bit and only the new ones are dumped (in one process; see
    :class:`~kdcache.cache.CacheWriter`). Under torchrun each rank
    dumps its share of the images into a part file and rank 0 merges the parts
    (see :mod:`kdcache.parts`); the cache is the one a single process writes.
    Everything that can be checked (the store against the classes, the input
    size against the teacher) is checked before any file is made, and the
    files of the dump are locked for its whole length (see :mod:`kdcache.lock`).
    Returns a summary dict (on ranks other than 0 without the file's path and size).
    """
    with distributed.session():
        return _dump(config, progress or Progress())


def _dump(config: DumpConfig, progress: Progress) -> dict:
    run = config.run
    out = Path(config.out)
    several = distributed.Dist.from_env().enabled
    # A rerun after a merge that was killed between its rename and its clean-up finds OUT and part files;
    # it may finish the job (below), and a cache with fewer views may grow, so only the rest is refused this early.
    if out.exists() and not config.force and not several and not parts.leftover_parts(out):
        _refuse_unless_fewer_views(out, config.views)
    dist, device = distributed.init(resolve_device(run.device), timeout=MERGE_WAIT)
    amp = amp_dtype(device, run.amp)
    img_size = run.img_size or 224
    train = open_dataset(run.data, "train")
    store_codec(config.store, train.num_classes)  # a top-k store wider than the classes fails before any file
    torch.manual_seed(run.seed)  # only matters for a teacher without weights (tests, smoke runs)
    teacher = load_teacher(config.teacher, train.num_classes, img_size, device, config.checkpoint, config.pretrained)
    prep = Preprocess.for_model(teacher, img_size)
    check_input_size(teacher, config.teacher, img_size, prep, device, amp)
    spec = FeatureSpec.parse(config.features) if config.features else FeatureSpec()
    features = tuple((f"pooled:{pooled_width(teacher, img_size)}",) if spec.pooled else ()) + \
        tuple((f"attention:{spec.attention}",) if spec.attention else ())
    if spec.attention and min(last_map_size(teacher, img_size)) < spec.attention:
        h, w = last_map_size(teacher, img_size)
        progress.note(f"{config.teacher}'s last feature map is {h}x{w} at {img_size} px, coarser than attention:"
                      f"{spec.attention}: its maps are upsampled{' and constant' if h == w == 1 else ''}; a larger "
                      "--img-size gives finer maps")

    # Only now are files made, and every one of them under a lock.
    with contextlib.ExitStack() as stack:
        targets = [parts.part_path(out, dist.rank, dist.world_size)] if dist.enabled else []
        targets += [out] if dist.is_main() else []
        for target in sorted(targets):
            lock = stack.enter_context(FileLock(target))
            if lock.unsupported:
                progress.note(f"the file system of {target} cannot lock files; make sure no other dump writes it")
        info = cache_info(config, train, prep, img_size, features)
        grow = out.exists() and not config.force
        if grow:
            summary = _already_done(config, info, train, dist, progress)
            if summary is not None:
                return summary
        stale = parts.other_parts(out, dist.world_size)
        if stale:
            progress.note(f"{len(stale)} part files of a dump with another number of processes are not used "
                          f"(e.g. {stale[0].name}); delete them when this dump is done")
        dumper = _Dumper(teacher, train, prep, device, amp, config, progress, spec)
        if not dist.enabled:
            return _dump_alone(config, info, train, dumper, progress, grow)
        return _dump_part_and_merge(config, info, train, dumper, dist, progress)


def check_input_size(teacher: nn.Module, name: str, img_size: int, prep: Preprocess, device: torch.device,
                     amp: torch.dtype | None = None) -> None:
    """One forward pass of a blank image, so an input the teacher cannot take fails before any work or file."""
    blank = torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8)
    try:
        teacher_logits(teacher, blank, prep, device, amp)
    except torch.cuda.OutOfMemoryError:
        raise  # not the input size's fault
    except (RuntimeError, ValueError, AssertionError) as e:  # torch and timm word a bad input size in these
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise KdcacheError(f"teacher {name} cannot take --img-size {img_size} inputs: {first}") from None


def cache_info(config: DumpConfig, train: ImageSet, prep: Preprocess, img_size: int,
               features: tuple[str, ...] = ()) -> CacheInfo:
    """The settings the dump records in its cache (hashes every image, for the fingerprint).

    `features` are the stored features' entries (``pooled:D``, ``attention:S``; see :mod:`kdcache.cache.features`).
    """
    return CacheInfo(
        num_samples=len(train), num_views=config.views, num_classes=train.num_classes, seed=config.run.seed,
        store=config.store, teacher=config.teacher, teacher_checkpoint=config.checkpoint or "",
        teacher_checkpoint_sha256=file_sha256(config.checkpoint) if config.checkpoint else "",
        teacher_pretrained=bool(config.pretrained and not config.checkpoint), input_size=img_size,
        mean=prep.mean, std=prep.std, interpolation=prep.interpolation, crop_pct=prep.crop_pct,
        crop_scale=tuple(config.crops.scale), crop_ratio=tuple(config.crops.ratio), hflip=config.crops.hflip,
        dataset_name=train.name, dataset_split=train.split, dataset_fingerprint=train.fingerprint,
        class_names=tuple(train.classes), content_hash=train.content_hash_scheme, features=features,
        compact=config.compact, recipe=config.recipe.to_json(),
    )


def witness_of(info: CacheInfo, train: ImageSet, rows: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """The crop witness of a compact cache of `info` over dataset `rows` (all by default); None when not compact."""
    if not info.compact:
        return None
    rows = np.arange(len(train)) if rows is None else rows

    def size_of(i: int) -> tuple[int, int]:
        return tuple(train.load(int(rows[i])).shape[-2:])

    return make_witness(info, train.ids[rows], size_of)


def _refuse_unless_fewer_views(out: Path, views: int) -> None:
    """Before any work: refuse an existing OUT unless it is a cache with fewer views, which this dump may grow."""
    try:
        with contextlib.closing(CacheReader(out, preload=False)) as cache:
            found = cache.info.num_views
    except CacheError:
        found = views
    if found > views:
        raise CacheError(f"{out} already holds {found} views, more than --views {views}, and a cache never shrinks; "
                         f"pass --views {found} or more to grow it, or --force to overwrite it")
    if found == views:
        raise CacheError(f"{out} already exists; pass --force to overwrite it")


def _already_done(config: DumpConfig, info: CacheInfo, train: ImageSet, dist: distributed.Dist,
                  progress: Progress) -> dict | None:
    """OUT exists: if it is this very dump, complete, finish a merge that died after its rename; None if it grows.

    OUT grows (None) when it is a complete cache of these settings with fewer
    views, and only in one process; anything else is refused, naming the
    first settings that differ.

    Under torchrun, or when part files of this dump are left, a complete OUT of
    exactly these settings means the merge renamed it into place and was
    stopped before deleting the parts (or before the config JSON was written):
    the parts are deleted and the dump is done, with nothing dumped.
    """
    out = Path(config.out)
    leftovers = parts.matching_parts(out, info, train.ids)
    if (dist.enabled or leftovers) and parts.is_finished(out, info, train.ids):
        if dist.is_main():
            for part in leftovers:
                part.unlink(missing_ok=True)
            if leftovers:
                progress.note(f"{out} was already complete; deleted the {len(leftovers)} part files left behind")
        summary = _summary(config, train, 0, 0, 0.0) | ({"processes": dist.world_size} if dist.enabled else {})
        if not dist.is_main():
            return summary | {"rank": dist.rank}
        return summary | {"cache": str(out), "file_bytes": out.stat().st_size}
    try:
        cache = CacheReader(out, preload=False)
    except CacheError:
        raise CacheError(f"{out} already exists; pass --force to overwrite it") from None
    with contextlib.closing(cache):
        differ = growth_mismatch(cache, info, train.ids)
        found = cache.info.num_views
    if differ:
        raise CacheError(f"{out} already exists; pass --force to overwrite it (it was dumped with other settings: "
                         f"{differ})")
    if found >= config.views:
        _refuse_unless_fewer_views(out, config.views)
    if dist.enabled:
        raise CacheError(f"growing {out} from {found} to {config.views} views runs in one process; run the same "
                         "command without torchrun")
    return None


def _dump_alone(config: DumpConfig, info: CacheInfo, train: ImageSet, dumper: _Dumper, progress: Progress,
                grow: bool = False) -> dict:
    """One process; with `grow`, OUT is a cache of these settings with fewer views, which this dump grows."""
    source = CacheReader(config.out, preload=False) if grow else None
    try:
        if source is not None:
            progress.note(f"growing {config.out} from {source.info.num_views} to {config.views} views (the first "
                          f"{source.info.num_views} are kept, not recomputed)")
        writer = CacheWriter(config.out, info, train.ids, train.labels, train.content_hashes, force=config.force,
                             grow_from=source, progress=progress, witness=witness_of(info, train))
    finally:
        if source is not None:
            source.close()  # the copy is made: OUT is not read again, only replaced when the grown file is complete
    try:
        if writer.resumed_rows:
            progress.note(f"resuming {writer.partial}: {writer.resumed_rows} of {len(train)} images already done")
        done, correct, seconds = dumper.fill(writer, np.arange(len(train)))
        path = writer.finish()
    finally:
        writer.close()
    return _summary(config, train, done, correct, seconds) | {"cache": str(path), "file_bytes": path.stat().st_size}


def _dump_part_and_merge(config: DumpConfig, info: CacheInfo, train: ImageSet, dumper: _Dumper,
                         dist: distributed.Dist, progress: Progress) -> dict:
    """Several processes: this rank's part, then rank 0 merges all of them."""
    out = Path(config.out)
    rows = dist.shard(len(train))
    part = parts.part_path(out, dist.rank, dist.world_size)
    part_info = parts.part_info(info, rows)
    writer, resumed = None, len(rows)
    if part.exists():
        try:
            parts.check_part(part, part_info, dist.rank, dist.world_size, train.ids[rows]).close()
        except CacheError:
            if not config.force:
                raise
            part.unlink()  # --force: a finished part of other settings is discarded, like OUT itself
    if not part.exists():
        writer = CacheWriter(part, part_info, train.ids[rows], train.labels[rows], train.content_hashes[rows],
                             force=config.force, extra_attrs=parts.part_attrs(dist.rank, dist.world_size),
                             witness=witness_of(part_info, train, rows))
        resumed = writer.resumed_rows
    try:
        (resumed_all,) = dist.all_reduce([resumed])
        if resumed_all:
            progress.note(f"resuming a {dist.world_size}-process dump: {int(resumed_all)} of {len(train)} images "
                          "already done")
        done = correct = seconds = 0.0
        if writer is not None:
            done, correct, seconds = dumper.fill(writer, rows)
            writer.finish()
    finally:
        if writer is not None:
            writer.close()
    dist.barrier()  # every part is complete
    done, correct = dist.all_reduce([done, correct])
    (seconds,) = dist.all_reduce([seconds], op="max")
    summary = _summary(config, train, int(done), int(correct), seconds) | {"processes": dist.world_size}
    if not dist.is_main():
        return summary | {"rank": dist.rank}
    path = parts.merge_parts(out, info, train.ids, train.labels, train.content_hashes, dist.world_size,
                             force=config.force, progress=progress, witness=witness_of(info, train))
    return summary | {"cache": str(path), "file_bytes": path.stat().st_size}


def _summary(config: DumpConfig, train: ImageSet, done: int, correct: int, seconds: float) -> dict:
    return {"num_samples": len(train), "num_views": config.views, "num_classes": train.num_classes,
            "store": config.store, "records_dumped": done, "seconds": seconds,
            "records_per_second": done / max(seconds, 1e-9), "teacher_view_top1": 100.0 * correct / max(done, 1)}


class _Dumper:
    """The teacher over all K views of images, writing into one cache writer."""

    def __init__(self, teacher: nn.Module, train: ImageSet, prep: Preprocess, device: torch.device, amp: torch.dtype | None,
                 config: DumpConfig, progress: Progress, spec: FeatureSpec = FeatureSpec()) -> None:
        self.teacher, self.train, self.prep, self.device, self.amp = teacher, train, prep, device, amp
        self.config, self.progress, self.spec = config, progress, spec

    def fill(self, writer: CacheWriter, rows: np.ndarray) -> tuple[int, int, float]:
        """Dump the dataset rows `rows` (writer row i is dataset row ``rows[i]``) that are still pending.

        Returns the records written, those whose teacher top-1 is the label, and the seconds taken.
        """
        config, run, train = self.config, self.config.run, self.train
        todo = rows[writer.pending_rows()]
        first = writer.first_view
        views = config.views - first
        images_per_batch = max(1, run.batch_size // views)
        dataset = DumpViews(train, run.seed, config.crops, config.views, self.prep, first_view=first,
                            recipe=config.recipe)
        loader = dump_loader(dataset, todo, images_per_batch, run.workers, self.device)
        label = f"x{config.views} views" if not first else f"view {first}" if views == 1 else \
            f"views {first}..{config.views - 1}"
        self.progress.start(f"dump {config.teacher} {label}", len(todo) * views)
        start = time.perf_counter()
        correct = 0
        background = BackgroundWriter(writer)  # batch i is stored while the teacher computes batch i+1
        try:
            for batch in loader:
                b, k = batch["images"].shape[:2]
                logits, features = teacher_outputs(self.teacher, batch["images"].flatten(0, 1), self.prep,
                                                   self.device, self.amp, self.spec)
                logits = logits.view(b, k, -1).cpu().numpy()
                features = {name: f.view(b, k, *f.shape[1:]).cpu().numpy() for name, f in features.items()}
                batch_rows = batch["rows"].numpy()
                bad = ~np.isfinite(logits).all(axis=-1)
                if bad.any():
                    i, v = np.argwhere(bad)[0]
                    raise CacheError(f"the teacher returned NaN or Inf for {train.describe(int(batch_rows[i]))} "
                                     f"view {first + v}; check the checkpoint (or dump without --amp)")
                params = {name: value.numpy() for name, value in batch.get("params", {}).items()}
                background.put(np.searchsorted(rows, batch_rows), batch["boxes"].numpy(), batch["flips"].numpy(),
                               logits, params, features)
                correct += int((logits.argmax(-1) == train.labels[batch_rows][:, None]).sum())
                self.progress.update(b * k)
        except BaseException:
            background.abort()  # stores what is queued: the partial resumes from there
            raise
        background.close()
        seconds = time.perf_counter() - start
        self.progress.stop()
        return len(todo) * views, correct, seconds

