"""Auditing a cache: what it holds (inspect) and whether it is right (verify)."""

from __future__ import annotations

import numpy as np
import torch

from .augment import apply_crop, sample_crop, view_rng
from .cache import CacheReader, parse_store, record_bytes
from .data import open_dataset
from .errors import CacheError
from .report import Progress
from .targets import check_cache_fits, preprocess_of_cache, ranges_of_cache
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


def inspect_cache(path: str) -> dict:
    """A summary of a cache: provenance, sizes and per-view teacher statistics."""
    reader = CacheReader(path, preload=False)
    info = reader.info
    n = info.num_samples
    rows = np.arange(n) if n <= STATS_ROWS else np.sort(np.random.default_rng(0).choice(n, STATS_ROWS, replace=False))
    per_view = []
    for view in range(info.num_views):
        logits = reader.read(rows, view)[2]
        probs = softmax(logits)
        per_view.append({
            "view": view,
            "top1": float(100.0 * np.mean(logits.argmax(1) == reader.labels[rows])),
            "confidence": float(probs.max(1).mean()),
            "entropy": float(-(probs * np.log(np.clip(probs, 1e-12, None))).sum(1).mean()),
        })
    reader.close()
    return {
        "path": str(reader.path), "format_version": reader.attrs.get("format_version"),
        "kdcache_version": reader.attrs.get("kdcache_version"), "created": reader.attrs.get("created"),
        "teacher": info.teacher, "teacher_checkpoint": info.teacher_checkpoint,
        "teacher_checkpoint_sha256": info.teacher_checkpoint_sha256, "teacher_pretrained": info.teacher_pretrained,
        "dataset": info.dataset_name, "dataset_split": info.dataset_split,
        "dataset_fingerprint": info.dataset_fingerprint, "num_samples": n, "num_views": info.num_views,
        "num_classes": info.num_classes, "store": info.store, "seed": info.seed, "input_size": info.input_size,
        "mean": list(info.mean), "std": list(info.std), "interpolation": info.interpolation,
        "crop_scale": list(info.crop_scale), "crop_ratio": list(info.crop_ratio), "hflip": info.hflip,
        "file_bytes": reader.file_size, "bytes_per_record": record_bytes(info),
        "stats_rows": int(len(rows)),
        "teacher_top1_mean": float(np.mean([v["top1"] for v in per_view])),
        "confidence_mean": float(np.mean([v["confidence"] for v in per_view])),
        "entropy_mean": float(np.mean([v["entropy"] for v in per_view])),
        "per_view": per_view,
        "library_versions": reader.attrs.get("library_versions"),
    }


def default_tolerance(store: str) -> float:
    """Largest accepted |cached - live| logit difference, relative to the record's largest |logit|.

    fp32 allows for a different batch composition or BLAS (float32 rounding);
    fp16 and top-k for half-precision storage (2^-11 relative) and a dump under
    AMP.
    """
    kind, _ = parse_store(store)
    return 1e-3 if kind == "fp32" else 2e-2


def verify_cache(path: str, data: str, teacher: str, checkpoint: str | None, samples: int = 256, seed: int = 0,
                 device: str = "auto", pretrained: bool = False, tolerance: float | None = None,
                 temperature: float = 4.0, progress: Progress | None = None) -> dict:
    """Recompute `samples` random (image, view) records with the teacher and compare.

    Checks, for each sampled record, that the stored crop is the one
    ``(seed, sample_id, view)`` gives, and that the stored logits match the
    teacher's on that crop. Returns the figures and ``ok``.
    """
    from .teacher import load_teacher, teacher_logits

    progress = progress or Progress()
    reader = CacheReader(path, preload=False)
    info = reader.info
    train = open_dataset(data, "train")
    check_cache_fits(reader, train, info.input_size)
    dev = resolve_device(device)
    model = load_teacher(teacher, info.num_classes, info.input_size, dev, checkpoint, pretrained)
    if teacher != info.teacher:
        progress.note(f"the cache was dumped by '{info.teacher}', verifying against '{teacher}'")
    prep = preprocess_of_cache(reader)
    ranges = ranges_of_cache(reader)
    tolerance = default_tolerance(info.store) if tolerance is None else tolerance
    total = info.num_samples * info.num_views
    rng = np.random.default_rng(seed)
    picks = rng.choice(total, size=min(samples, total), replace=False)
    rows, views = np.divmod(picks, info.num_views)
    kind, top = parse_store(info.store)

    crop_mismatch: list[str] = []
    worst_rel, worst_abs, kls, worst_at = 0.0, 0.0, [], ""
    progress.start("verify", len(picks))
    for start in range(0, len(picks), 64):
        r, v = rows[start:start + 64], views[start:start + 64]
        crops, cached = [], []
        for row, view in zip(r, v):
            boxes, flips, logits = reader.read(np.array([row]), int(view))
            image = train.load(int(row))
            expect_box, expect_flip = sample_crop(view_rng(info.seed, int(train.ids[row]), int(view)),
                                                  int(image.shape[-2]), int(image.shape[-1]), ranges)
            if not (np.array_equal(expect_box, boxes[0]) and expect_flip == bool(flips[0])):
                crop_mismatch.append(f"{train.describe(int(row))} view {int(view)}")
            crops.append(apply_crop(image, boxes[0], bool(flips[0]), prep))
            cached.append(logits[0])
        live = teacher_logits(model, torch.stack(crops), prep, dev).cpu().numpy()
        cached_arr = np.stack(cached)
        if kind == "topk":  # only the kept classes are stored exactly
            idx = np.argsort(-cached_arr, axis=1)[:, :top]
            diff = np.abs(np.take_along_axis(cached_arr, idx, 1) - np.take_along_axis(live, idx, 1)).max(1)
        else:
            diff = np.abs(cached_arr - live).max(1)
        scale = np.maximum(1.0, np.abs(live).max(1))
        rel = diff / scale
        i = int(rel.argmax())
        if rel[i] > worst_rel:
            worst_rel, worst_at = float(rel[i]), f"{train.describe(int(r[i]))} view {int(v[i])}"
        worst_abs = max(worst_abs, float(diff.max()))
        kls.extend(kl_per_record(live, cached_arr, temperature).tolist())
        progress.update(len(r))
    progress.stop()
    reader.close()
    ok = worst_rel <= tolerance and not crop_mismatch
    return {"cache": str(reader.path), "samples": int(len(picks)), "store": info.store,
            "max_abs_logit_diff": worst_abs, "max_rel_logit_diff": worst_rel, "worst_record": worst_at,
            "tolerance": tolerance, "mean_kl": float(np.mean(kls)), "temperature": temperature,
            "crop_mismatches": len(crop_mismatch), "first_crop_mismatch": crop_mismatch[0] if crop_mismatch else "",
            "ok": bool(ok)}


def require_ok(result: dict) -> None:
    """Raise a CacheError that says what failed when `result` is not ok."""
    if result["ok"]:
        return
    if result["crop_mismatches"]:
        raise CacheError(f"verify failed: {result['crop_mismatches']} stored crops differ from their seeds "
                         f"(first: {result['first_crop_mismatch']})")
    raise CacheError(f"verify failed: logits differ by up to {result['max_rel_logit_diff']:.3g} (relative) at "
                     f"{result['worst_record']}; tolerance {result['tolerance']:.3g}")
