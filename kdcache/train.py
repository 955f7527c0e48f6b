"""The training loop, shared by teacher fine-tuning and students in every mode.

:func:`fit` builds the run from a :class:`~kdcache.config.TrainConfig`, picks
the :class:`~kdcache.targets.TargetSource` once
(:func:`~kdcache.targets.create_target_source`), and runs
:func:`train_one_epoch` and :func:`evaluate`. Plain, cached and online runs
differ only in that object. One training DataLoader serves every epoch
(:meth:`Run.loader` sets the epoch), and everything that can be refused is
refused in :func:`prepare`, before the first epoch and the first output file.

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
from torch.utils.data import DataLoader

from . import distributed, outputs
from .augment import Preprocess
from .cache import CacheReader
from .config import TrainConfig, save_json
from .data import ImageSet, open_dataset
from .devices import amp_dtype, channels_last, model_input, resolve_device
from .distributed import Dist
from .errors import ConfigError, KdcacheError, OutputError
from .evaluation import evaluate, predict  # noqa: F401 (still importable from this module, as before)
from .features import FeatureStudent, target_kind
from .loaders import EpochOrder, TrainViews, train_loader
from .losses import feature_loss, kd_loss, label_targets, with_feature_term
from .models import PROJECTOR, build, check_input_size, checkpoint_bytes, save_checkpoint, save_checkpoint_elsewhere, \
    save_projector
from .report import Progress
from .targets import TargetSource, create_target_source

DEFAULT_IMG_SIZE = 224  # the paper's input size, when neither the user nor a cache says otherwise


@dataclass
class StepLog:
    """What one optimizer step reports to the `on_step` hook."""

    epoch: int
    step: int
    loss: float
    ce: float
    kd: float
    feature: float = 0.0  # the feature term (before --feature-weight); 0 without --feature-loss


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, targets: TargetSource,
                    prep: Preprocess, device: torch.device, alpha: float, temperature: float,
                    amp: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    epoch: int = 0, progress: Progress | None = None,
                    on_step: Callable[[StepLog], None] | None = None, smoothing: float = 0.0,
                    feature: str | None = None, feature_weight: float = 0.0) -> dict[str, float]:
    """One pass over `loader`; returns mean losses, images seen and wall seconds.

    The CE term's targets are the labels, smoothed by `smoothing` and mixed with the partners' labels where a
    batch's views are mixed (:func:`label_targets`). With `feature` (a ``--feature-loss``), `model` returns
    (logits, feature) (a :class:`~kdcache.features.FeatureStudent`) and ``feature_weight`` times the feature
    term joins the loss.

    The seconds include data loading and target reading, since a cache that
    is slow to read would slow training exactly there.
    """
    model.train()
    totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "feature": 0.0}
    images = steps = 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        x = model_input(batch["images"], prep, device)
        y = batch["labels"].to(device, non_blocking=True)
        teacher = targets.teacher_targets(batch, x)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            student = model(x)
        if feature is not None:
            student, student_feature = student
        partner = batch.get("partner_labels")
        target = label_targets(y, student.shape[-1], smoothing,
                               None if partner is None else partner.to(device, non_blocking=True),
                               None if partner is None else batch["mix_lambdas"].to(device, non_blocking=True))
        parts = kd_loss(student, teacher["logits"], target, alpha, temperature)
        if feature is not None:
            parts = with_feature_term(parts, feature_loss(feature, student_feature, teacher[target_kind(feature)]),
                                      feature_weight)
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
            totals[k] += values.get(k, 0.0)
        images += len(y)
        steps += 1
        if on_step is not None:
            on_step(StepLog(epoch, step, values["loss"], values["ce"], values["kd"], values.get("feature", 0.0)))
        if progress is not None:
            progress.update(len(y), loss=values["loss"])
    seconds = time.perf_counter() - start
    return {**{k: v / max(steps, 1) for k, v in totals.items()}, "images": images, "steps": steps, "seconds": seconds}


@dataclass
class Run:
    """Everything one training run needs, built once from its config.

    `batches` is the run's one training DataLoader; its workers (if any) live
    for the whole run. :meth:`loader` sets the epoch before an epoch is
    iterated, so the workers need no state of their own.
    """

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
    batches: DataLoader | None
    extra: dict
    dist: Dist = Dist()

    @property
    def module(self) -> nn.Module:
        """The trained module (without a DistributedDataParallel wrapper): the student, or it and its projector."""
        return distributed.unwrap(self.model)

    @property
    def student(self) -> nn.Module:
        """The student's own timm model (what model.pt holds)."""
        module = self.module
        return module.model if isinstance(module, FeatureStudent) else module

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration of the training DataLoader serve `epoch` (its order and its views)."""
        self.order.set_epoch(epoch)

    def loader(self, epoch: int) -> DataLoader:
        """This process's training DataLoader, set to `epoch`."""
        if self.batches is None:
            raise RuntimeError("the run's training DataLoader was closed")
        self.set_epoch(epoch)
        return self.batches

    def epoch_crops(self) -> int:
        """Crops this process trains on per epoch."""
        batches = self.batches.batch_sampler
        images = len(batches) * batches.batch_size if batches.drop_last else len(self.order)
        return self.config.views_per_step * images

    def close(self) -> None:
        """Stop the training DataLoader's workers (they hold memory that evaluation can use)."""
        self.batches = None

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
                                epoch, progress, on_step, c.smoothing, c.feature_loss, c.feature_weight)
        w = self.dist.world_size  # alone, the reductions below return the stats as they are
        loss, ce, kd, feature, images = self.dist.all_reduce([stats["loss"], stats["ce"], stats["kd"],
                                                              stats["feature"], stats["images"]])
        (seconds,) = self.dist.all_reduce([stats["seconds"]], op="max")
        # Every rank takes the same number of equal batches, so the mean of the ranks' means is the global mean.
        return {"loss": loss / w, "ce": ce / w, "kd": kd / w, "images": int(images), "steps": stats["steps"],
                "seconds": seconds, **({"feature": feature / w} if c.feature_loss else {})}


def _optimizer_and_scheduler(model: nn.Module, config: TrainConfig,
                             extra: nn.Module | None = None) -> tuple[torch.optim.Optimizer, object]:
    """timm's optimizer over `model` (its own parameter names), `extra`'s parameters (a projector) added, and
    the scheduler over both."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optim = config.optim
    try:
        optimizer = create_optimizer_v2(model, opt=optim.opt, lr=optim.lr, weight_decay=optim.weight_decay,
                                        momentum=optim.momentum)
    except ValueError as e:
        raise ConfigError(f"--opt {optim.opt}: {e} (any timm optimizer name: sgd, adamw, ...)") from None
    if extra is not None:
        optimizer.add_param_group({"params": list(extra.parameters())})
    decay_epochs = optim.decay_epochs or max(1, config.epochs // 3)
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=optim.sched, num_epochs=config.epochs,
                                           decay_epochs=decay_epochs, decay_rate=optim.decay_rate,
                                           warmup_epochs=optim.warmup_epochs)
    except ValueError as e:
        raise ConfigError(f"--sched {optim.sched}: {e} (any timm scheduler name: step, cosine, ...)") from None
    return optimizer, scheduler


def prepare(config: TrainConfig, progress: Progress | None = None) -> Run:
    """Open the data, pick the mode, build the student, its optimizer and scheduler.

    Everything that can be refused is refused here, before the first epoch:
    a cache of other data, a model that cannot take the input size (one
    forward of a blank image), an output folder without room for the
    checkpoint. Under torchrun this joins the process group (see
    :func:`kdcache.distributed.init`).
    """
    progress = progress or Progress()
    run = config.run
    dist, device = distributed.init(resolve_device(run.device))
    if run.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {run.batch_size} is the global batch and is split evenly over the "
                          f"{dist.world_size} processes: make it a multiple of {dist.world_size}")
    if dist.is_main():
        outputs.check_writable(config.out)  # before the data are read, which can take a while
    amp = amp_dtype(device, run.amp)
    # Under torchrun a rank reads only its own records from the file unless --preload asks for a full copy
    # in every process's memory.
    preload = config.preload if config.preload is not None or not dist.enabled else False
    readers = [CacheReader(path, preload=preload) for path in config.cached]
    train = open_dataset(run.data, "train")
    test = open_dataset(run.data, "test")
    if train.num_classes == 1:
        progress.note(f"the training split of {train.name} has one class ({train.classes[0]}): every prediction "
                      "is that class, so top-1 is 100 % and says nothing about the model")
    img_size = run.img_size or (readers[0].info.input_size if readers else DEFAULT_IMG_SIZE)
    targets = create_target_source(config, readers, train, img_size, device, amp, progress)
    # The student's initialisation (and dropout) is the one use of global torch RNG; seeding here,
    # after any teacher is built, gives every mode the same starting weights.
    torch.manual_seed(run.seed)
    model = build(config.model, train.num_classes, img_size, pretrained=config.pretrained,
                  checkpoint=config.checkpoint, allow_new_head=True).to(device)
    model = channels_last(model, device)
    check_input_size(model, config.model, img_size, device)  # eval mode, no grad: the weights stay as seeded
    student = model
    if config.feature_loss is not None:
        sizes = targets.feature_sizes
        model = FeatureStudent(student, config.feature_loss, sizes.get("pooled", 0), sizes.get("attention", 0),
                               img_size).to(device)
    if dist.is_main():
        outputs.check_room(config.out, checkpoint_bytes(model), f"the checkpoint of {config.model}")
    # KD modes train on exactly the pixels the teacher saw, normalised as the teacher's were.
    own = Preprocess.for_model(model, img_size)
    prep = targets.prep or own
    if (own.mean, own.std) != (prep.mean, prep.std) and (config.pretrained or config.checkpoint):
        progress.note(f"{config.model} was pretrained with mean {own.mean} and std {own.std}; it trains here on "
                      f"the teacher's normalisation (mean {prep.mean}, std {prep.std}) so both see the same input")
    optimizer, scheduler = _optimizer_and_scheduler(student, config, getattr(model, "projector", None))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    # Wrapped after the optimizer is built, so timm sees the student's own parameter names.
    model = dist.wrap(model, device)
    order = EpochOrder(len(train), run.seed, dist.rank, dist.world_size, run.batch_size)
    dataset = TrainViews(train, targets.views, prep, config.views_per_step)
    batches = train_loader(dataset, order, run.batch_size // dist.world_size, run.workers, device)
    extra = {**targets.record, "crop_scale": list(targets.crops.scale),
             "recipe": targets.views.recipe.to_json() or "crop and flip only"}
    if config.feature_loss is not None:
        extra.update(feature_loss=config.feature_loss, feature_weight=config.feature_weight,
                     feature_sizes=dict(targets.feature_sizes))
    return Run(config=config, device=device, amp=amp, train=train, test=test, img_size=img_size, targets=targets,
               prep=prep, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, dataset=dataset,
               order=order, batches=batches, extra=extra, dist=dist)


def fit(config: TrainConfig, progress: Progress | None = None,
        on_step: Callable[[StepLog], None] | None = None) -> dict:
    """Train `config.model` in the mode the config names; write config.json, a checkpoint and metrics.json.

    Returns the metrics dict that is also written to ``OUT/metrics.json``.
    ``OUT/config.json`` is written once the run is prepared, before the first
    epoch. Under torchrun every process trains; rank 0 alone evaluates on the
    full test set and writes the outputs, and the other ranks return the
    training part of the summary (without ``top1`` and ``mAP``).
    """
    with distributed.session():
        return _fit(config, progress or Progress(), on_step)


def _fit(config: TrainConfig, progress: Progress, on_step: Callable[[StepLog], None] | None) -> dict:
    wall_start = time.perf_counter()
    r = prepare(config, progress)
    out = Path(config.out)
    if r.dist.is_main():
        save_json(config, out / "config.json", _resolved(r))
    m = config.views_per_step
    history: list[dict] = []
    train_seconds = 0.0
    train_images = 0
    for epoch in range(config.epochs):
        loader = r.loader(epoch)
        progress.start(f"{r.targets.mode} {config.model} {epoch + 1}/{config.epochs}", r.epoch_crops())
        stats = r.train_epoch(epoch, loader, progress, on_step)
        progress.stop()
        if r.scheduler is not None:
            r.scheduler.step(epoch + 1)
        train_seconds += stats["seconds"]
        train_images += stats["images"]
        views = r.dataset.epoch_views(epoch)
        history.append({"epoch": epoch, "view": views[0], "views": views,
                        "lr": r.optimizer.param_groups[0]["lr"], **stats})
    r.close()

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
        "params_m": sum(p.numel() for p in r.student.parameters()) / 1e6,
        **r.extra,
    }
    if not r.dist.is_main():
        return {**summary, "rank": r.dist.rank, "wall_seconds": time.perf_counter() - wall_start}

    progress.start(f"evaluate {config.model}", len(r.test))
    result = evaluate(r.student, r.test, r.prep, r.device, config.run.batch_size, config.run.workers, r.amp)
    progress.update(len(r.test))
    progress.stop()
    summary = {**summary, "top1": result["top1"], "mAP": result["mAP"], "checkpoint": str(out / "model.pt")}
    return _save_outputs(r, out, summary, history, wall_start)


def _resolved(r: Run) -> dict:
    """What config.json adds to the options: the sizes the student and (cached) the teachers saw."""
    sizes = {"img_size": r.img_size}
    if "teacher_img_sizes" in r.extra:
        sizes["teacher_img_sizes"] = r.extra["teacher_img_sizes"]
    return sizes


def _save_outputs(r: Run, out: Path, summary: dict, history: list[dict], wall_start: float) -> dict:
    """Write model.pt, metrics.json and history.json; when the checkpoint cannot be written, keep what can be."""
    meta = {"arch": r.config.model, "num_classes": r.train.num_classes, "img_size": r.img_size,
            "classes": list(r.train.classes)}
    try:
        save_checkpoint(r.student, out / "model.pt", meta)
        if isinstance(r.module, FeatureStudent) and r.module.projector is not None:
            save_projector(r.module.projector, out / PROJECTOR)
            summary = {**summary, "projector": str(out / PROJECTOR)}
    except OutputError as e:
        kept = save_checkpoint_elsewhere(r.student, meta)
        summary = {**summary, "checkpoint": str(kept) if kept else "",
                   "wall_seconds": time.perf_counter() - wall_start}
        written = [name for name, value in (("metrics.json", summary), ("history.json", history))
                   if _try_write(out / name, value)]
        where = f"the trained model was saved to {kept} instead" if kept else "the trained model could not be kept"
        also = f"; {' and '.join(written)} written to {out}" if written else ""
        raise OutputError(f"{e}; {where}{also}") from None
    summary = {**summary, "wall_seconds": time.perf_counter() - wall_start}
    for name, value in (("metrics.json", summary), ("history.json", history)):
        try:
            outputs.write_text(out / name, json.dumps(value, indent=2) + "\n")
        except OutputError as e:
            raise OutputError(f"{e}; the checkpoint {out / 'model.pt'} was saved") from None
    return summary


def _try_write(path: Path, value: object) -> bool:
    try:
        outputs.write_text(path, json.dumps(value, indent=2) + "\n")
        return True
    except KdcacheError:
        return False
