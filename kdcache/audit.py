"""Auditing a cache: what it holds (inspect) and whether it is right (verify)."""

from __future__ import annotations

import numpy as np
import torch

from .augment import view_rng
from .cache import CacheInfo, CacheReader, record_bytes, store_codec
from .cache.features import MIN_COSINE, cosine
from .compatibility import check_cache_fits
from .config import CropRanges
from .data import ImageSet, open_dataset
from .errors import CacheError
from .report import Progress
from .recipe import sample_view
from .targets import CachedViews, preprocess_of_cache, ranges_of_cache
from .devices import resolve_device

STATS_ROWS = 50_000  # per-view statistics use at most this many rows (a fixed sample)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits` / `temperature`, in the dtype of `logits`."""
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def kl_per_record(p_logits: np.ndarray, q_logits: np.ndarray, temperature: float) -> np.ndarray:
    """KL(softmax(p/T) || softmax(q/T)) per row."""
    p = softmax(p_logits.astype(np.float64), temperature)
    q = softmax(q_logits.astype(np.float64), temperature)
    return np.sum(p * (np.log(np.clip(p, 1e-300, None)) - np.log(np.clip(q, 1e-300, None))), axis=-1)


class _ViewStats:
    """Per-view teacher statistics, summed over blocks of valid records."""

    def __init__(self, views: int) -> None:
        self.count, self.correct = np.zeros(views), np.zeros(views)
        self.confidence, self.entropy = np.zeros(views), np.zeros(views)

    def add(self, views: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> None:
        probs = softmax(logits)
        k = len(self.count)
        self.count += np.bincount(views, minlength=k)
        self.correct += np.bincount(views, weights=(logits.argmax(1) == labels).astype(np.float64), minlength=k)
        self.confidence += np.bincount(views, weights=probs.max(1), minlength=k)
        self.entropy += np.bincount(views, weights=-(probs * np.log(np.clip(probs, 1e-12, None))).sum(1), minlength=k)

    def per_view(self) -> list[dict]:
        """top1 (%), confidence and entropy of each view; None where a view has no valid record."""
        def mean(total: np.ndarray, view: int, scale: float = 1.0) -> float | None:
            return float(scale * total[view] / self.count[view]) if self.count[view] else None
        return [{"view": v, "top1": mean(self.correct, v, 100.0), "confidence": mean(self.confidence, v),
                 "entropy": mean(self.entropy, v)} for v in range(len(self.count))]


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def inspect_cache(path: str, progress: Progress | None = None) -> dict:
    """A summary of a cache: provenance, sizes, per-view teacher statistics and invalid records.

    Every stored record is checked (a block at a time, so any size fits in
    memory); ``ok`` is False when some are invalid, and ``first_bad_records``
    names a few. The statistics use the valid records of a fixed sample of at
    most STATS_ROWS rows. Every float in the result is finite (None where
    nothing is known), so the result is valid JSON.
    """
    reader = CacheReader(path, preload=False)
    info, codec = reader.info, reader.codec
    n = info.num_samples
    rows = np.arange(n) if n <= STATS_ROWS else np.sort(np.random.default_rng(0).choice(n, STATS_ROWS, replace=False))
    sampled = np.zeros(n, dtype=bool)
    sampled[rows] = True
    stats = _ViewStats(info.num_views)
    shares = {"mixed": 0, "cutmix": 0, "erased": 0, "augmented": 0}  # views with each recipe step, of all records

    def visit(first_row: int, arrays: dict[str, np.ndarray], valid: np.ndarray) -> None:
        for key, name, used in (("mixed", "mix_partners", lambda a: a >= 0),
                                ("cutmix", "cutmix_boxes", lambda a: a[..., 2] > 0),
                                ("erased", "erase_boxes", lambda a: a[..., 2] > 0),
                                ("augmented", "ra_ops", lambda a: (a >= 0).any(axis=-1))):
            if name in arrays:
                shares[key] += int(used(arrays[name]).sum())
        picked = np.flatnonzero(sampled[first_row:first_row + len(valid)])
        row, view = np.nonzero(valid[picked])
        if len(row):
            targets = {name: arrays[name][picked][row, view] for name in reader.store_names}
            stats.add(view, codec.decode(targets, info.num_classes), reader.labels[first_row + picked[row]])

    scan = reader.scan(visit, progress)
    reader.close()
    per_view = stats.per_view()
    return {
        "path": str(reader.path), "ok": scan.ok, "bad_records": scan.bad_records,
        "first_bad_records": scan.first_bad,
        "format_version": reader.attrs.get("format_version"),
        "kdcache_version": reader.attrs.get("kdcache_version"), "created": reader.attrs.get("created"),
        "teacher": info.teacher, "teacher_checkpoint": info.teacher_checkpoint,
        "teacher_checkpoint_sha256": info.teacher_checkpoint_sha256, "teacher_pretrained": info.teacher_pretrained,
        "dataset": info.dataset_name, "dataset_split": info.dataset_split,
        "dataset_fingerprint": info.dataset_fingerprint, "content_hash": info.content_hash,
        "num_samples": n, "num_views": info.num_views, "crops": _crops_worded(reader),
        "num_classes": info.num_classes, "store": info.store, "seed": info.seed, "input_size": info.input_size,
        "mean": list(info.mean), "std": list(info.std), "interpolation": info.interpolation,
        "crop_scale": list(info.crop_scale), "crop_ratio": list(info.crop_ratio), "hflip": info.hflip,
        "recipe": info.recipe or "crop and flip only",
        **{f"{key}_views_pct": 100.0 * count / max(1, n * info.num_views) for key, count in shares.items()
           if info.recipe},
        "file_bytes": reader.file_size, "bytes_per_record": record_bytes(info),
        "features": [f.spec for f in reader.features],
        # What each stored feature adds to the file: per record, and over all N x K records.
        "feature_bytes": {f.spec: f.record_bytes() * n * info.num_views for f in reader.features},
        "stats_rows": int(len(rows)),
        "teacher_top1_mean": _mean([v["top1"] for v in per_view]),
        "confidence_mean": _mean([v["confidence"] for v in per_view]),
        "entropy_mean": _mean([v["entropy"] for v in per_view]),
        "per_view": per_view,
        "library_versions": reader.attrs.get("library_versions"),
    }


def _crops_worded(reader: CacheReader) -> str:
    if reader.stores_crops:
        return "stored"
    return (f"derived from (seed, sample id, view) (compact; {len(reader.witness['witness_ids'])} witness records "
            "re-derived on open: equal)")


def default_tolerance(store: str) -> float:
    """Largest accepted |cached - live| logit difference, relative to the record's largest |logit| (the store's)."""
    return store_codec(store).tolerance


def _load_verify_teacher(info: CacheInfo, teacher: str, checkpoint: str | None, pretrained: bool,
                         device: torch.device, progress: Progress) -> torch.nn.Module:
    """The teacher to verify against, built as the dump built it; notes where it cannot be the dump's."""
    from .models import file_sha256
    from .teacher import load_teacher

    if teacher != info.teacher:
        progress.note(f"the cache was dumped by '{info.teacher}', verifying against '{teacher}'")
    dumped_with = info.teacher_checkpoint or "no checkpoint"
    if checkpoint and file_sha256(checkpoint) != info.teacher_checkpoint_sha256:
        progress.note(f"the cache was dumped with {dumped_with}; {checkpoint} has other contents")
    elif not checkpoint and info.teacher_checkpoint_sha256:
        progress.note(f"the cache was dumped with {dumped_with}; verifying without --checkpoint")
    if not info.teacher_checkpoint_sha256 and not info.teacher_pretrained:
        torch.manual_seed(info.seed)  # the dump seeds a teacher without weights this way; the same weights follow
    return load_teacher(teacher, info.num_classes, info.input_size, device, checkpoint, pretrained)


def verify_cache(path: str, data: str, teacher: str, checkpoint: str | None, samples: int = 256, seed: int = 0,
                 device: str = "auto", pretrained: bool = False, tolerance: float | None = None,
                 temperature: float = 4.0, progress: Progress | None = None) -> dict:
    """Check every stored record, then run the teacher on `samples` random (image, view) records and compare.

    Checks, for every record, that it is valid (finite logits, a box inside
    the image, no damaged chunk, ...) and that its stored view parameters
    (the crop and flip and, under a recipe, the ops, jitter, erased box,
    partner, lambda and CutMix box) are the ones ``(seed, sample_id, view)``
    gives, bit for bit (this needs only each image's size, read from its
    header); and, for each sampled record, that the stored logits match the
    teacher's on the view rebuilt from the stored parameters (a mixed view
    with its partner's stored view) for the classes the store keeps exactly.
    Returns the figures and ``ok``.
    """
    from .features import FeatureSpec
    from .loaders import render_views
    from .teacher import teacher_outputs

    progress = progress or Progress()
    reader = CacheReader(path, preload=False)
    info, codec = reader.info, reader.codec
    train = open_dataset(data, "train")
    check_cache_fits(reader, train)
    parameters = _ParameterCheck(reader, train, ranges_of_cache(reader))
    scan = reader.scan(visit=parameters, progress=progress)
    dev = resolve_device(device)
    model = _load_verify_teacher(info, teacher, checkpoint, pretrained, dev, progress)
    prep = preprocess_of_cache(reader)
    tolerance = codec.tolerance if tolerance is None else tolerance
    total = info.num_samples * info.num_views
    rng = np.random.default_rng(seed)
    picks = rng.choice(total, size=min(samples, total), replace=False)
    rows, views = np.divmod(picks, info.num_views)
    feature_sizes = {f.kind: f.size for f in reader.features}
    spec = FeatureSpec(pooled="pooled" in feature_sizes, attention=feature_sizes.get("attention", 0))
    source = CachedViews(reader, tuple(feature_sizes))  # the stored parameters, logits and every feature
    cosines: dict[str, list[float]] = {f.spec: [] for f in reader.features}

    worst_rel, worst_abs, kls, worst_at, compared = 0.0, 0.0, [], "", 0
    progress.start("verify", len(picks))
    for start in range(0, len(picks), 64):
        r, v = rows[start:start + 64], views[start:start + 64]
        crops, cached, where, cached_features = [], [], [], []
        for row, view in zip(r, v):
            rows_asked = np.array([row])
            image = train.load(int(row))
            size = [(int(image.shape[-2]), int(image.shape[-1]))]
            try:  # a compact cache derives the crop from the image's size (its witness was checked at open)
                fetched = source.fetch(rows_asked, train.ids[rows_asked], size, int(view))
                crop, _ = render_views(train, source, prep, rows_asked, [image], [(int(view), fetched)])
            except CacheError:
                continue  # an invalid record (or its partner's): the scan above counted it
            crops.append(crop[0])
            cached.append(fetched["teacher_logits"][0].numpy())
            cached_features.append({kind: fetched[f"teacher_{kind}"].numpy() for kind in source.kinds})
            where.append(f"{train.describe(int(row))} view {int(view)}")
        progress.update(len(r))
        if not crops:
            continue
        live, live_features = teacher_outputs(model, torch.stack(crops), prep, dev, spec=spec)
        live = live.cpu().numpy()
        for f in reader.features:
            kept = np.concatenate([c[f.kind] for c in cached_features])
            cosines[f.spec] += cosine(kept, live_features[f.kind].cpu().numpy()).tolist()
        cached_arr = np.stack(cached)
        idx = codec.compared_classes(cached_arr)
        diff = np.abs(np.take_along_axis(cached_arr, idx, 1) - np.take_along_axis(live, idx, 1)).max(1)
        diff = np.where(np.isfinite(diff), diff, np.inf)  # a teacher that returns NaN matches nothing
        rel = diff / np.maximum(1.0, np.abs(np.nan_to_num(live, posinf=0, neginf=0)).max(1))
        i = int(rel.argmax())
        if rel[i] > worst_rel:
            worst_rel, worst_at = float(rel[i]), where[i]
        worst_abs = max(worst_abs, float(diff.max()))
        kls.extend(kl_per_record(live, cached_arr, temperature).tolist())
        compared += len(crops)
    progress.stop()
    reader.close()
    min_cosine = {name: float(min(values)) if values else None for name, values in cosines.items()}
    features_ok = all(c is None or c >= MIN_COSINE for c in min_cosine.values())
    ok = worst_rel <= tolerance and not parameters.count and scan.ok and features_ok
    return {"cache": str(reader.path), "samples": int(len(picks)), "compared": compared, "store": info.store,
            "bad_records": scan.bad_records, "first_bad_record": scan.first_bad[0] if scan.first_bad else "",
            "max_abs_logit_diff": worst_abs, "max_rel_logit_diff": worst_rel, "worst_record": worst_at,
            "tolerance": tolerance, "mean_kl": float(np.mean(kls)) if kls else None, "temperature": temperature,
            "crop_mismatches": parameters.count, "first_crop_mismatch": parameters.first,
            "min_feature_cosine": min_cosine, "feature_cosine_tolerance": MIN_COSINE, "features_ok": features_ok,
            "ok": bool(ok)}


class _ParameterCheck:
    """A :meth:`CacheReader.scan` visitor: derives every valid record's view parameters from ``(seed, sample id,
    view)`` and counts the records where a stored one differs (`first` names the first, 'IMAGE view V').

    A compact cache stores no crops and flips; the parameters it does store
    are still checked.
    """

    def __init__(self, reader: CacheReader, train: ImageSet, ranges: CropRanges) -> None:
        self.reader, self.train, self.ranges = reader, train, ranges
        self.count, self.first = 0, ""

    def __call__(self, first_row: int, arrays: dict[str, np.ndarray], valid: np.ndarray) -> None:
        info = self.reader.info
        for i in range(len(valid)):
            if not valid[i].any():
                continue
            row = first_row + i
            height, width = self.train.image_size(row)
            for view in np.flatnonzero(valid[i]):
                expect = sample_view(view_rng(info.seed, int(self.train.ids[row]), int(view)), height, width,
                                     self.ranges, self.reader.recipe, info.num_samples, row, info.input_size)
                if any(name in arrays and not np.array_equal(value, arrays[name][i, view])
                       for name, value in expect.items()):
                    self.first = self.first or f"{self.train.describe(row)} view {int(view)}"
                    self.count += 1


def require_ok(result: dict) -> None:
    """Raise a CacheError that says what failed when `result` is not ok."""
    if result["ok"]:
        return
    if result.get("bad_records"):
        raise CacheError(f"verify failed: {result['bad_records']} stored records are invalid (first: "
                         f"{result['first_bad_record']}); re-dump the teacher or restore the cache")
    if result["crop_mismatches"]:
        raise CacheError(f"verify failed: {result['crop_mismatches']} stored crops differ from their seeds "
                         f"(or another stored view parameter does; first: {result['first_crop_mismatch']})")
    if not result.get("features_ok", True):
        worst = min((c, name) for name, c in result["min_feature_cosine"].items() if c is not None)
        raise CacheError(f"verify failed: stored {worst[1]} features have cosine {worst[0]:.6f} with the live "
                         f"teacher's, below {result['feature_cosine_tolerance']}")
    raise CacheError(f"verify failed: logits differ by up to {result['max_rel_logit_diff']:.3g} (relative) at "
                     f"{result['worst_record']}; tolerance {result['tolerance']:.3g}")
