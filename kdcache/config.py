"""Frozen run configurations.

Every default is written once, here, with the reason for it. Every value is
checked once, here too: each object refuses a bad value when it is made
(``__post_init__``) with a :class:`~kdcache.errors.ConfigError` that names the
CLI option, so the CLI, the loop and the loaders take the values as valid. The
CLI builds these objects field by field from its options; a run saves its
config as JSON next to its outputs, so it can be audited and repeated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, KdcacheError
from .outputs import write_text

# torch.manual_seed takes seeds up to 2**64 - 1 (numpy's SeedSequence takes any size), so that is the range.
MAX_SEED = 2**64 - 1
IMG_SIZE_RANGE = (8, 2048)  # below 8 px a crop has no content; above 2048 no model of timm's fits memory


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _in_range(option: str, value: float, lo: float, hi: float) -> None:
    _require(lo <= value <= hi, f"{option} must be in [{lo:g}, {hi:g}], got {value:g}")


def _at_least(option: str, value: float, lo: float) -> None:
    _require(value >= lo, f"{option} must be at least {lo:g}, got {value:g}")


@dataclass(frozen=True)
class CropRanges:
    """Ranges for the RandomResizedCrop box and the horizontal flip."""

    # The torchvision / timm RandomResizedCrop defaults, which the paper's
    # ImageNet-style fine-tuning recipe uses.
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Half the views are mirrored, as in RandomHorizontalFlip().
    hflip: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.scale
        _require(0.0 < lo <= hi <= 1.0, f"--crop-scale must satisfy 0 < min <= max <= 1, got {lo:g} {hi:g}")
        lo, hi = self.ratio
        _require(0.0 < lo <= hi, f"--crop-ratio must satisfy 0 < min <= max, got {lo:g} {hi:g}")
        _in_range("--hflip", self.hflip, 0.0, 1.0)


@dataclass(frozen=True)
class Recipe:
    """The augmentation recipe beyond the crop: timm ``train.py``'s options, names and meanings.

    Every default is off, so the default recipe is the paper's (crop and flip
    only) and its pixels and caches are today's, bit for bit. Each random
    decision these options imply is a parameter of the view, drawn from
    ``(seed, sample id, view)`` and stored in the cache (see
    :mod:`kdcache.recipe`). The options are checked here; the ``--aa``
    string is parsed by timm (lazily: only when it is given).
    """

    mixup: float = 0.0  # Beta(alpha, alpha) mixup; 0 is off (timm's default)
    cutmix: float = 0.0  # Beta(alpha, alpha) CutMix; 0 is off (timm's default)
    mixup_prob: float = 1.0  # chance a view is mixed when mixup or cutmix is on (timm's default)
    mixup_switch_prob: float = 0.5  # with both on: the chance of CutMix instead of mixup (timm's default)
    # timm's auto-augment string: 'rand-m9-mstd0.5-inc1' and other 'rand-...' RandAugment strings, or
    # 'trivialaugment' (see kdcache.recipe.AA_ALIASES). '' is off: the paper's recipe.
    aa: str = ""
    # Brightness, contrast and saturation jitter (torchvision's ColorJitter(c, c, c)). 0 is off here, where
    # timm's train.py defaults to 0.4; as in timm's transforms_factory it is not applied with --aa (but 3a).
    color_jitter: float = 0.0
    reprob: float = 0.0  # random erasing probability (timm's RandomErasing, mode 'pixel'); 0 is off

    def __post_init__(self) -> None:
        for option, value in (("--mixup", self.mixup), ("--cutmix", self.cutmix),
                              ("--color-jitter", self.color_jitter)):
            _require(math.isfinite(value) and value >= 0, f"{option} must be a number >= 0, got {value:g}")
        _in_range("--mixup-prob", self.mixup_prob, 0.0, 1.0)
        _in_range("--mixup-switch-prob", self.mixup_switch_prob, 0.0, 1.0)
        _in_range("--reprob", self.reprob, 0.0, 1.0)
        if self.aa:
            from .recipe import augment_policy  # timm parses the string; imported only when one is given

            augment_policy(self.aa)  # raises ConfigError naming --aa

    @property
    def is_default(self) -> bool:
        """True for the paper's recipe: nothing beyond the crop and flip."""
        return self == Recipe()

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def jitter(self) -> bool:
        """Colour jitter is applied: asked for, and not replaced by --aa (timm keeps it only with a '3a' policy)."""
        return self.color_jitter > 0 and (not self.aa or "3a" in self.aa)

    def to_json(self) -> str:
        """The recipe as the cache records it; '' for the default recipe (a version-1 file has none)."""
        return "" if self.is_default else json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """The recipe of :meth:`to_json` ('' is the default); ConfigError when it is not one."""
        if not text:
            return cls()
        try:
            values = json.loads(text)
            return cls(**values)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"not a recipe: {e}") from None


def default_workers() -> int:
    """Half the CPU cores, at most 8; none on a machine of two cores or fewer.

    Workers decode on the cores the model also needs, so on two cores they
    buy nothing measurable: a dump of convnext_nano at 32 px ran at 0.76-1.06
    of bare teacher inference with no worker and 0.80-1.03 with one, over
    three or four runs each on a shared 2-core machine.
    """
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


@dataclass(frozen=True)
class RunOptions:
    """What every command that runs a model shares."""

    data: str = "digits"
    # Input size in pixels. None: a cache's size in cached mode, else the paper's 224.
    # Use 32 for CIFAR and digits on a CPU.
    img_size: int | None = None
    batch_size: int = 64  # fits ConvNeXt-S at 224 px on a 16 GB GPU
    # DataLoader workers for decoding; see default_workers for the measured why.
    workers: int = field(default_factory=lambda: default_workers())
    device: str = "auto"  # CUDA when present, else CPU
    amp: bool = False  # mixed precision is opt-in; it only applies on CUDA
    seed: int = 0

    def __post_init__(self) -> None:
        _require(bool(self.data), "--data must name a dataset ('digits' or a folder)")
        if self.img_size is not None:
            _in_range("--img-size", self.img_size, *IMG_SIZE_RANGE)
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--workers", self.workers, 0)
        _require(0 <= self.seed <= MAX_SEED, f"--seed must be in [0, 2**64 - 1], got {self.seed}")


@dataclass(frozen=True)
class OptimOptions:
    """The paper's fine-tuning recipe: SGD, lr 1e-3, momentum 0.9, wd 1e-5, step decay."""

    opt: str = "sgd"  # any timm optimizer name (adamw, lamb, ...)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-5
    sched: str = "step"  # any timm scheduler name (cosine, ...)
    # Step decay: the rate falls tenfold every `decay_epochs` epochs; None means
    # a third of the run, so a short and a long run both see two drops.
    decay_epochs: int | None = None
    decay_rate: float = 0.1
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"--lr must be above 0, got {self.lr:g}")
        _in_range("--momentum", self.momentum, 0.0, 1.0)
        _at_least("--weight-decay", self.weight_decay, 0.0)
        if self.decay_epochs is not None:
            _at_least("--decay-epochs", self.decay_epochs, 1)
        _in_range("--decay-rate", self.decay_rate, 0.0, 1.0)
        _at_least("--warmup-epochs", self.warmup_epochs, 0)


@dataclass(frozen=True)
class TrainConfig:
    """One training run: a teacher fine-tune, or a student in any mode."""

    model: str
    out: str
    run: RunOptions = field(default_factory=RunOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    epochs: int = 15  # the paper trains its students for 15 epochs
    # Crops per image per step (FKD's multi-crop): each image is decoded once and
    # trained on M views, so the step sees batch_size * M crops. 1 keeps one view
    # per image per epoch, the paper's setting; raise it when decoding is the bottleneck.
    views_per_step: int = 1
    crops: CropRanges = field(default_factory=CropRanges)
    # Plain and online runs follow it; a cached run replays the cache's own recipe (its stored parameters).
    recipe: Recipe = field(default_factory=Recipe)
    # Label smoothing of the CE term (timm's --smoothing); 0 keeps the paper's hard labels.
    smoothing: float = 0.0
    pretrained: bool = False
    checkpoint: str | None = None  # local weights to start from
    # KD: the paper's loss is (1-alpha)*T^2*KL + alpha*CE. alpha=0.5 weighs
    # labels and teacher equally; T=4 is Hinton et al.'s common choice.
    alpha: float = 0.5
    temperature: float = 4.0
    # Cached mode: the cache file, or several (an ensemble of teachers on the same crops); a str is one file.
    # Online mode: the teacher and its weights.
    cached: str | Sequence[str] = ()
    # One positive weight per cache, normalised to sum 1 (None: equal weights): the ensemble's target is
    # the weighted mean of the teachers' probabilities at the temperature.
    teacher_weights: Sequence[float] | None = None
    preload: bool | None = None  # None: load the cache into memory when it is small
    online_teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_pretrained: bool = False
    # Feature KD: None (logits only), "mse" or "cosine" (the pooled embedding through a learned projector) or
    # "attention" (attention transfer), weighted by feature_weight and added to the KD loss.
    feature_loss: str | None = None
    feature_weight: float = 1.0  # the AT and projected-embedding terms are O(1) at the start, like KL*T^2
    # S of the attention maps in online mode; cached mode reads it from the cache (None: the cache's).
    attention_size: int | None = None

    def __post_init__(self) -> None:
        _require(bool(self.model), "--model must name a timm model")
        _require(bool(self.out), "--out must name an output folder")
        _at_least("--epochs", self.epochs, 1)
        _at_least("--views-per-step", self.views_per_step, 1)
        _in_range("--alpha", self.alpha, 0.0, 1.0)
        _require(self.temperature > 0, f"--temperature must be above 0, got {self.temperature:g}")
        _require(0.0 <= self.smoothing < 1.0, f"--smoothing must be in [0, 1), got {self.smoothing:g}")
        self._normalise_teachers()
        _require(not (self.cached and self.online_teacher),
                 "--cached and --online-teacher are two teacher sources; choose one")
        _require(bool(self.online_teacher) or not (self.teacher_checkpoint or self.teacher_pretrained),
                 "--teacher-checkpoint and --teacher-pretrained go with --online-teacher")
        _require(bool(self.cached) or self.preload is None, "--preload and --no-preload go with --cached")
        self._check_features()

    def _check_features(self) -> None:
        """--feature-loss needs one teacher source (one cache, or an online teacher) and its settings."""
        from .features import FEATURE_LOSSES

        if self.feature_loss is None:
            _require(self.attention_size is None, "--attention-size goes with --feature-loss attention")
            return
        _require(self.feature_loss in FEATURE_LOSSES,
                 f"--feature-loss must be {', '.join(FEATURE_LOSSES)}, got '{self.feature_loss}'")
        _require(bool(self.cached or self.online_teacher),
                 f"--feature-loss {self.feature_loss} needs a teacher: add --cached CACHE or --online-teacher NAME")
        _require(len(self.cached) <= 1, "--feature-loss takes one --cached file; an ensemble's features do not "
                 "combine into one target")
        _require(math.isfinite(self.feature_weight) and self.feature_weight >= 0,
                 f"--feature-weight must be a number >= 0, got {self.feature_weight:g}")
        if self.attention_size is not None:
            _require(self.feature_loss == "attention", "--attention-size goes with --feature-loss attention")
            _in_range("--attention-size", self.attention_size, 1, 64)
        _require(not (self.online_teacher and self.feature_loss == "attention" and self.attention_size is None),
                 "--feature-loss attention with --online-teacher needs --attention-size S (the S x S map size)")

    def _normalise_teachers(self) -> None:
        """`cached` becomes a tuple of paths and `teacher_weights` a tuple that sums to 1, one per cache."""
        cached = (self.cached,) if isinstance(self.cached, str) else tuple(self.cached or ())
        _require(all(isinstance(p, str) and p for p in cached), "--cached must name cache files")
        for i, path in enumerate(cached):
            _require(os.path.normpath(path) not in map(os.path.normpath, cached[:i]),
                     f"--cached names {path} twice; give each cache once (weigh it with --teacher-weights)")
        weights = self.teacher_weights
        if weights is None:
            weights = (1.0,) * len(cached)
        else:
            weights = tuple(float(w) for w in weights)
            _require(bool(cached), "--teacher-weights goes with --cached")
            _require(len(weights) == len(cached), f"--teacher-weights has {len(weights)} value{'s' * (len(weights) != 1)} for "
                     f"{len(cached)} --cached files; give one weight per cache")
            for w in weights:
                _require(math.isfinite(w) and w > 0, f"--teacher-weights must be positive numbers, got {w:g}")
        total = sum(weights)
        object.__setattr__(self, "cached", cached)  # frozen: normalised once, here, where the value is born
        object.__setattr__(self, "teacher_weights", tuple(w / total for w in weights))


@dataclass(frozen=True)
class DumpConfig:
    """One teacher dump: K seeded views of every training image into one cache."""

    teacher: str
    out: str
    run: RunOptions = field(default_factory=RunOptions)
    checkpoint: str | None = None
    pretrained: bool = False
    views: int = 15  # one view per student epoch of the paper's 15-epoch schedule
    crops: CropRanges = field(default_factory=CropRanges)
    recipe: Recipe = field(default_factory=Recipe)  # the default: crop and flip only, a version-1 cache
    store: str = "fp16"  # half the bytes of fp32; logits lose < 1e-3 relative
    # Store no crops or flips (17 bytes per record; derived from (seed, sample id, view) on read) and top-k's
    # log-sum-exp in float16. Off by default: such a cache is format version 2, which older releases cannot read.
    compact: bool = False
    force: bool = False  # overwrite a complete cache; discard a partial one of other settings
    # Teacher features stored with the logits: "pooled", "attention:S" or both, comma-separated; "" for none.
    features: str = ""

    def __post_init__(self) -> None:
        from .cache import parse_store  # the store kinds are the cache's; imported here, not at the CLI's start

        _require(bool(self.teacher), "--teacher must name a timm model")
        _require(bool(self.out), "--out must name the cache file to write")
        _at_least("--views", self.views, 1)
        # A compact cache derives crops on read; the recipe's other parameters are stored, not yet derived there.
        _require(not (self.compact and not self.recipe.is_default),
                 "--compact does not take a recipe (--mixup, --cutmix, --aa, --color-jitter, --reprob) yet")
        try:
            parse_store(self.store)  # fp16 | fp32 | topk:K with K >= 1; K <= classes is checked with the data
        except KdcacheError as e:
            raise ConfigError(str(e)) from None
        if self.features:
            from .features import FeatureSpec

            try:
                FeatureSpec.parse(self.features)
            except ValueError as e:
                raise ConfigError(f"--features must be pooled, attention:S or both (comma-separated): "
                                  f"{e}") from None


@dataclass(frozen=True)
class CompareConfig:
    """A teacher-student similarity report over train-student output folders."""

    teacher: str
    runs: tuple[str, ...]
    out: str
    run: RunOptions = field(default_factory=RunOptions)  # data, the teacher's img_size, batch, device
    teacher_checkpoint: str | None = None
    teacher_pretrained: bool = False
    # Test images compared (a fixed random subset): CKA's n x n Gram matrices and every stage's embeddings
    # of 1000 images take a few MB, and 1000 gives CKA within about 0.01 of its value on more.
    samples: int = 1000

    def __post_init__(self) -> None:
        _require(bool(self.teacher), "--teacher must name a timm model")
        _require(len(self.runs) >= 1, "name at least one RUN_DIR (a train-student --out folder)")
        _require(bool(self.out), "--out must name an output folder")
        _at_least("--samples", self.samples, 2)
        object.__setattr__(self, "runs", tuple(self.runs))


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def save_json(config: Any, path: str | Path, resolved: dict[str, Any] | None = None) -> None:
    """Write `config` as indented JSON, atomically, creating the parent folder.

    `resolved` adds what the run settled from its inputs (e.g. the input sizes
    a cache implies), so the file says what ran, not only what was asked.
    """
    write_text(path, json.dumps({**to_dict(config), **(resolved or {})}, indent=2, sort_keys=True) + "\n")
