"""The training loop, shared by teacher fine-tuning and students in every mode.

:func:`fit` builds the run from a :class:`~kdcache.config.TrainConfig`, picks
the :class:`~kdcache.targets.TargetSource` once, and runs
:func:`train_one_epoch` and :func:`evaluate`. Plain, cached and online runs
differ only in that object.

Under torchrun every process builds the same run; :mod:`kdcache.distributed`
wraps the student in DistributedDataParallel and :class:`~kdcache.loaders.EpochOrder`
gives each rank its share of every one-process batch (``--batch-size`` is the
global batch), so W processes take the same optimizer steps on the same
(sample, view) pairs as one. Rank 0 alone evaluates and writes the outputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import distributed, metrics
from .augment import Preprocess, normalize
from .cache import CacheReader
from .config import TrainConfig
from .data import ImageSet, open_dataset
from .distributed import Dist
from .errors import CacheError, KdcacheError
from .loaders import EpochOrder, EvalViews, TrainViews, eval_loader, train_loader
from .losses import kd_loss
from .models import build, file_sha256, save_checkpoint
from .report import Progress
from .targets import CachedTargets, OnlineTeacher, PlainTargets, TargetSource, preprocess_of_cache, ranges_of_cache

DEFAULT_IMG_SIZE = 224  # the paper's input size, when neither the user nor a cache says otherwise


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdcacheError(f"--device {name} was asked for, but CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bfloat16 where the GPU supports it, else float16; None on CPU or when off."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class StepLog:
    """What one optimizer step reports to the `on_step` hook."""

    epoch: int
    step: int
    loss: float
    ce: float
    kd: float


def _to_device(batch_images: torch.Tensor, prep: Preprocess, device: torch.device) -> torch.Tensor:
    x = normalize(batch_images.to(device, non_blocking=True), prep)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, targets: TargetSource,
                    prep: Preprocess, device: torch.device, alpha: float, temperature: float,
                    amp: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    epoch: int = 0, progress: Progress | None = None,
                    on_step: Callable[[StepLog], None] | None = None) -> dict[str, float]:
    """One pass over `loader`; returns mean losses, images seen and wall seconds.

    The seconds include data loading and target reading, since a cache that
    is slow to read would slow training exactly there.
    """
    model.train()
    totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    images = steps = 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        x = _to_device(batch["images"], prep, device)
        y = batch["labels"].to(device, non_blocking=True)
        teacher = targets.teacher_logits(batch, x)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            student = model(x)
        parts = kd_loss(student, teacher, y, alpha, temperature)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(parts["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            parts["loss"].backward()
            optimizer.step()
        values = {k: float(v.detach()) for k, v in parts.items()}
        if not np.isfinite(values["loss"]):
            raise KdcacheError(f"the loss became {values['loss']} at epoch {epoch} step {step}; lower --lr or check the inputs")
        for k in totals:
            totals[k] += values[k]
        images += len(y)
        steps += 1
        if on_step is not None:
            on_step(StepLog(epoch, step, values["loss"], values["ce"], values["kd"]))
        if progress is not None:
            progress.update(len(y), loss=values["loss"])
    seconds = time.perf_counter() - start
    return {**{k: v / max(steps, 1) for k, v in totals.items()}, "images": images, "steps": steps, "seconds": seconds}


@torch.inference_mode()
def predict(model: nn.Module, loader, prep: Preprocess, device: torch.device,
            amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,C) float32 and labels (N,) over an evaluation loader."""
    model.eval()
    scores, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(_to_device(x, prep, device))
        scores.append(out.float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(scores), np.concatenate(labels)


def evaluate(model: nn.Module, images: ImageSet, prep: Preprocess, device: torch.device, batch_size: int,
             workers: int, amp: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 and mAP (percent) on the deterministic evaluation view of `images`."""
    scores, labels = predict(model, eval_loader(EvalViews(images, prep), batch_size, workers, device), prep, device, amp)
    return metrics.summarize(scores, labels)


def check_cache_fits(reader: CacheReader, train: ImageSet, img_size: int) -> None:
    """Refuse a cache made for another dataset, split, class count or input size."""
    info, path = reader.info, reader.path
    if info.dataset_fingerprint != train.fingerprint:
        if len(reader.sample_ids) != len(train):
            why = f"it holds {len(reader.sample_ids)} images, the training split has {len(train)}"
        elif not np.array_equal(reader.sample_ids, train.ids):
            n = int(np.sum(reader.sample_ids != train.ids))
            why = f"{n} sample ids differ (another dataset, split or file names)"
        elif not np.array_equal(reader.labels, train.labels):
            row = int(np.flatnonzero(reader.labels != train.labels)[0])
            why = f"labels differ, first at {train.describe(row)}"
        elif not np.array_equal(reader.content_hashes, train.content_hashes):
            rows = np.flatnonzero(reader.content_hashes != train.content_hashes)
            why = f"{len(rows)} images changed since the dump, first {train.describe(int(rows[0]))}"
        else:
            why = "the class names differ"
        raise CacheError(f"{path} was dumped from another dataset than {train.name} ({why})")
    if info.num_classes != train.num_classes:
        raise CacheError(f"{path} has {info.num_classes} classes, the dataset has {train.num_classes}")
    if img_size != info.input_size:
        raise CacheError(f"{path} was dumped at {info.input_size} px, but --img-size is {img_size}; "
                         f"train at {info.input_size} or dump a new cache")


def _build_targets(config: TrainConfig, reader: CacheReader | None, train: ImageSet, img_size: int,
                   device: torch.device, amp: torch.dtype | None,
                   progress: Progress) -> tuple[TargetSource, Preprocess | None, dict]:
    """The run's mode as one object, plus the teacher's preprocessing (None: the student's own)."""
    if reader is not None:
        check_cache_fits(reader, train, img_size)
        k, m = reader.info.num_views, config.views_per_step
        if m > k:
            progress.note(f"--views-per-step {m} but {k} cached views: each step trains on some views of an "
                          "image more than once")
        elif config.epochs * m > k:
            rule = f"epoch e uses view e mod {k}" if m == 1 else f"epoch e uses views (e*{m} + j) mod {k}, j < {m}"
            progress.note(f"{config.epochs} epochs x {m} views per step but {k} cached views: {rule}, "
                          "so views are reused")
        extra = {"cache": str(reader.path), "cache_views": reader.info.num_views, "teacher": reader.info.teacher,
                 "cache_store": reader.info.store}
        return CachedTargets(reader), preprocess_of_cache(reader), extra
    if config.online_teacher:
        teacher = build(config.online_teacher, train.num_classes, img_size, pretrained=config.teacher_pretrained,
                        checkpoint=config.teacher_checkpoint).to(device)
        if device.type == "cuda":
            teacher = teacher.to(memory_format=torch.channels_last)
        extra = {"teacher": config.online_teacher,
                 "teacher_checkpoint_sha256": file_sha256(config.teacher_checkpoint) if config.teacher_checkpoint else ""}
        return OnlineTeacher(teacher, config.run.seed, config.crops, amp), Preprocess.for_model(teacher, img_size), extra
    return PlainTargets(config.run.seed, config.crops), None, {}


@dataclass
class Run:
    """Everything one training run needs, built once from its config."""

    config: TrainConfig
    device: torch.device
    amp: torch.dtype | None
    train: ImageSet
    test: ImageSet
    img_size: int
    targets: TargetSource
    prep: Preprocess
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    dataset: TrainViews
    order: EpochOrder
    extra: dict
    dist: Dist = Dist()

    @property
    def module(self) -> nn.Module:
        """The student itself (without a DistributedDataParallel wrapper)."""
        return distributed.unwrap(self.model)

    def loader(self, epoch: int):
        """This process's DataLoader of the epoch: view and batch order set for `epoch`."""
        self.dataset.epoch = self.order.epoch = epoch
        run = self.config.run
        return train_loader(self.dataset, self.order, run.batch_size // self.dist.world_size, run.workers,
                            self.device)

    def train_epoch(self, epoch: int, loader=None, progress: Progress | None = None,
                    on_step: Callable[[StepLog], None] | None = None) -> dict[str, float]:
        """One epoch (or the batches of `loader`, if given) with this run's loss settings.

        Under torchrun the returned stats cover all processes: mean losses over
        every crop, the images of all ranks, and the slowest rank's seconds.
        `on_step` sees this process's own batch.
        """
        c = self.config
        stats = train_one_epoch(self.model, loader if loader is not None else self.loader(epoch), self.optimizer,
                                self.targets, self.prep, self.device, c.alpha, c.temperature, self.amp, self.scaler,
                                epoch, progress, on_step)
        w = self.dist.world_size  # alone, the reductions below return the stats as they are
        loss, ce, kd, images = self.dist.all_reduce([stats["loss"], stats["ce"], stats["kd"], stats["images"]])
        (seconds,) = self.dist.all_reduce([stats["seconds"]], op="max")
        # Every rank takes the same number of equal batches, so the mean of the ranks' means is the global mean.
        return {"loss": loss / w, "ce": ce / w, "kd": kd / w, "images": int(images), "steps": stats["steps"],
                "seconds": seconds}


def prepare(config: TrainConfig, progress: Progress | None = None) -> Run:
    """Open the data, pick the mode, build the student, its optimizer and scheduler.

    Under torchrun this joins the process group (see :func:`kdcache.distributed.init`).
    """
    progress = progress or Progress()
    run = config.run
    if config.cached and config.online_teacher:
        raise KdcacheError("choose one teacher source: --cached or --online-teacher, not both")
    if config.views_per_step < 1:
        raise KdcacheError(f"--views-per-step must be at least 1, got {config.views_per_step}")
    dist, device = distributed.init(resolve_device(run.device))
    if run.batch_size % dist.world_size:
        raise KdcacheError(f"--batch-size {run.batch_size} is the global batch and is split evenly over the "
                           f"{dist.world_size} processes: make it a multiple of {dist.world_size}")
    amp = amp_dtype(device, run.amp)
    # Under torchrun a rank reads only its own records from the file unless --preload asks for a full copy
    # in every process's memory.
    preload = config.preload if config.preload is not None or not dist.enabled else False
    reader = CacheReader(config.cached, preload=preload) if config.cached else None
    train = open_dataset(run.data, "train")
    test = open_dataset(run.data, "test")
    img_size = run.img_size or (reader.info.input_size if reader else DEFAULT_IMG_SIZE)
    targets, teacher_prep, extra = _build_targets(config, reader, train, img_size, device, amp, progress)
    crop_ranges = ranges_of_cache(reader) if reader else config.crops  # cached crops follow the dump's ranges
    extra["crop_scale"] = list(crop_ranges.scale)
    # The student's initialisation (and dropout) is the one use of global torch RNG; seeding here,
    # after any teacher is built, gives every mode the same starting weights.
    torch.manual_seed(run.seed)
    model = build(config.model, train.num_classes, img_size, pretrained=config.pretrained,
                  checkpoint=config.checkpoint, allow_new_head=True).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # KD modes train on exactly the pixels the teacher saw, normalised as the teacher's were.
    own = Preprocess.for_model(model, img_size)
    prep = teacher_prep or own
    if (own.mean, own.std) != (prep.mean, prep.std) and (config.pretrained or config.checkpoint):
        progress.note(f"{config.model} was pretrained with mean {own.mean} and std {own.std}; it trains here on "
                      f"the teacher's normalisation (mean {prep.mean}, std {prep.std}) so both see the same input")

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optim = config.optim
    optimizer = create_optimizer_v2(model, opt=optim.opt, lr=optim.lr, weight_decay=optim.weight_decay,
                                    momentum=optim.momentum)
    decay_epochs = optim.decay_epochs or max(1, config.epochs // 3)
    scheduler, _ = create_scheduler_v2(optimizer, sched=optim.sched, num_epochs=config.epochs,
                                       decay_epochs=decay_epochs, decay_rate=optim.decay_rate,
                                       warmup_epochs=optim.warmup_epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    # Wrapped after the optimizer is built, so timm sees the student's own parameter names.
    model = dist.wrap(model, device)
    order = EpochOrder(len(train), run.seed, dist.rank, dist.world_size, run.batch_size)
    return Run(config=config, device=device, amp=amp, train=train, test=test, img_size=img_size, targets=targets,
               prep=prep, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               dataset=TrainViews(train, targets.views, prep, config.views_per_step), order=order, extra=extra,
               dist=dist)


def fit(config: TrainConfig, progress: Progress | None = None,
        on_step: Callable[[StepLog], None] | None = None) -> dict:
    """Train `config.model` in the mode the config names; write a checkpoint and metrics.json.

    Returns the metrics dict that is also written to ``OUT/metrics.json``. Under
    torchrun every process trains; rank 0 alone evaluates on the full test set
    and writes the outputs, and the other ranks return the training part of the
    summary (without ``top1`` and ``mAP``).
    """
    with distributed.session():
        return _fit(config, progress or Progress(), on_step)


def _fit(config: TrainConfig, progress: Progress, on_step: Callable[[StepLog], None] | None) -> dict:
    wall_start = time.perf_counter()
    r = prepare(config, progress)
    m = config.views_per_step
    history: list[dict] = []
    train_seconds = 0.0
    train_images = 0
    for epoch in range(config.epochs):
        loader = r.loader(epoch)
        progress.start(f"{r.targets.mode} {config.model} {epoch + 1}/{config.epochs}",
                       m * (len(loader) * loader.batch_size if loader.drop_last else len(r.order)))
        stats = r.train_epoch(epoch, loader, progress, on_step)
        progress.stop()
        if r.scheduler is not None:
            r.scheduler.step(epoch + 1)
        train_seconds += stats["seconds"]
        train_images += stats["images"]
        views = r.dataset.epoch_views(epoch)
        history.append({"epoch": epoch, "view": views[0], "views": views,
                        "lr": r.optimizer.param_groups[0]["lr"], **stats})

    out = Path(config.out)
    checkpoint = out / "model.pt"
    summary = {
        "mode": r.targets.mode,
        "model": config.model,
        "dataset": r.train.name,
        "epochs": config.epochs,
        "img_size": r.img_size,
        "batch_size": config.run.batch_size,
        "views_per_step": m,
        "processes": r.dist.world_size,
        # Crops the student trained on (batch_size * views_per_step per step), over all processes.
        "train_images": train_images,
        "train_seconds": train_seconds,
        "images_per_second": train_images / max(train_seconds, 1e-9),
        "decoded_images_per_second": train_images / m / max(train_seconds, 1e-9),
        "device": str(r.device),
        "params_m": sum(p.numel() for p in r.module.parameters()) / 1e6,
        **r.extra,
    }
    if not r.dist.is_main():
        return {**summary, "rank": r.dist.rank, "wall_seconds": time.perf_counter() - wall_start}

    progress.start(f"evaluate {config.model}", len(r.test))
    result = evaluate(r.module, r.test, r.prep, r.device, config.run.batch_size, config.run.workers, r.amp)
    progress.update(len(r.test))
    progress.stop()
    save_checkpoint(r.module, checkpoint, {"arch": config.model, "num_classes": r.train.num_classes,
                                           "img_size": r.img_size, "classes": list(r.train.classes)})
    summary = {**summary, "top1": result["top1"], "mAP": result["mAP"], "checkpoint": str(checkpoint),
               "wall_seconds": time.perf_counter() - wall_start}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    return summary
