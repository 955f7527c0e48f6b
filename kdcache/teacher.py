"""The teacher: batched no-grad logits and the dump loop that fills a cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .augment import Preprocess, normalize
from .cache import CacheInfo, CacheWriter, parse_store
from .config import DumpConfig
from .data import open_dataset
from .errors import CacheError
from .loaders import DumpViews, dump_loader
from .models import build, file_sha256
from .report import Progress
from .train import amp_dtype, resolve_device


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, prep: Preprocess, device: torch.device,
                   amp: torch.dtype | None = None) -> torch.Tensor:
    """float32 logits (B,C) for uint8 crops (B,3,S,S), in eval mode."""
    x = normalize(images.to(device, non_blocking=True), prep)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return teacher(x).float()


def load_teacher(name: str, num_classes: int, img_size: int, device: torch.device, checkpoint: str | None = None,
                 pretrained: bool = False) -> nn.Module:
    """A teacher in eval mode on `device` (channels_last on CUDA)."""
    model = build(name, num_classes, img_size, pretrained=pretrained, checkpoint=checkpoint).to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def dump(config: DumpConfig, progress: Progress | None = None) -> dict:
    """Run the teacher once over K seeded views of every training image; write the cache.

    Resumes an interrupted dump of the same settings. Returns a summary dict.
    """
    progress = progress or Progress()
    run = config.run
    parse_store(config.store)  # reject a bad --store before any work
    if config.views < 1:
        raise CacheError(f"--views must be at least 1, got {config.views}")
    out = Path(config.out)
    if out.exists() and not config.force:
        raise CacheError(f"{out} already exists; pass --force to overwrite it")
    device = resolve_device(run.device)
    amp = amp_dtype(device, run.amp)
    img_size = run.img_size or 224
    train = open_dataset(run.data, "train")
    torch.manual_seed(run.seed)  # only matters for a teacher without weights (tests, smoke runs)
    teacher = load_teacher(config.teacher, train.num_classes, img_size, device, config.checkpoint, config.pretrained)
    prep = Preprocess.for_model(teacher, img_size)
    info = CacheInfo(
        num_samples=len(train), num_views=config.views, num_classes=train.num_classes, seed=run.seed,
        store=config.store, teacher=config.teacher, teacher_checkpoint=config.checkpoint or "",
        teacher_checkpoint_sha256=file_sha256(config.checkpoint) if config.checkpoint else "",
        teacher_pretrained=bool(config.pretrained and not config.checkpoint), input_size=img_size,
        mean=prep.mean, std=prep.std, interpolation=prep.interpolation, crop_pct=prep.crop_pct,
        crop_scale=tuple(config.crops.scale), crop_ratio=tuple(config.crops.ratio), hflip=config.crops.hflip,
        dataset_name=train.name, dataset_split=train.split, dataset_fingerprint=train.fingerprint,
        class_names=tuple(train.classes),
    )
    writer = CacheWriter(out, info, train.ids, train.labels, train.content_hashes, force=config.force)
    try:
        rows = writer.pending_rows()
        if writer.resumed_rows:
            progress.note(f"resuming {writer.partial}: {writer.resumed_rows} of {len(train)} images already done")
        images_per_batch = max(1, run.batch_size // config.views)
        loader = dump_loader(DumpViews(train, run.seed, config.crops, config.views, prep), rows,
                             images_per_batch, run.workers, device)
        progress.start(f"dump {config.teacher} x{config.views} views", len(rows) * config.views)
        start = time.perf_counter()
        correct = 0
        for batch in loader:
            b, k = batch["images"].shape[:2]
            logits = teacher_logits(teacher, batch["images"].flatten(0, 1), prep, device, amp).view(b, k, -1)
            logits = logits.cpu().numpy()
            batch_rows = batch["rows"].numpy()
            bad = ~np.isfinite(logits).all(axis=-1)
            if bad.any():
                i, v = np.argwhere(bad)[0]
                raise CacheError(f"the teacher returned NaN or Inf for {train.describe(int(batch_rows[i]))} view {v}; "
                                 "check the checkpoint (or dump without --amp)")
            writer.write(batch_rows, batch["boxes"].numpy(), batch["flips"].numpy(), logits)
            correct += int((logits.argmax(-1) == train.labels[batch_rows][:, None]).sum())
            progress.update(b * k)
        seconds = time.perf_counter() - start
        progress.stop()
        path = writer.finish()
    finally:
        writer.close()
    done = len(rows) * config.views
    return {"cache": str(path), "num_samples": len(train), "num_views": config.views,
            "num_classes": train.num_classes, "store": config.store, "records_dumped": done,
            "seconds": seconds, "records_per_second": done / max(seconds, 1e-9),
            "teacher_view_top1": 100.0 * correct / max(done, 1), "file_bytes": path.stat().st_size}
