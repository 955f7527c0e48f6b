"""kdcache: offline knowledge distillation with a replayable, verifiable teacher cache."""

__version__ = "0.1.0"

from .augment import Preprocess, apply_crop, normalize, sample_crop, view_rng
from .cache import FORMAT_VERSION, CacheInfo, CacheReader, CacheWriter, store_codec
from .config import CropRanges, DumpConfig, OptimOptions, Recipe, RunOptions, TrainConfig
from .data import ImageSet, open_dataset
from .errors import CacheError, CheckpointError, ConfigError, DataError, KdcacheError, OutputError
from .features import FeatureSpec, FeatureStudent, model_outputs
from .losses import ensemble_logits, feature_loss, kd_loss, label_targets
from .metrics import mean_average_precision, top1
from .models import create_model
from .replay import CacheReplay, ReplaySampler, replay_collate
from .teacher import dump
from .train import fit

__all__ = [
    "__version__", "FORMAT_VERSION", "CacheError", "CacheInfo", "CacheReader", "CacheReplay", "CacheWriter",
    "CheckpointError", "ConfigError", "CropRanges", "DataError", "DumpConfig", "ImageSet", "KdcacheError",
    "OptimOptions", "OutputError", "Preprocess", "Recipe", "ReplaySampler", "RunOptions", "TrainConfig", "apply_crop", "create_model",
    "FeatureSpec", "FeatureStudent", "model_outputs", "feature_loss",
    "dump", "ensemble_logits", "fit", "kd_loss", "label_targets", "mean_average_precision", "normalize", "open_dataset", "replay_collate", "sample_crop",
    "store_codec", "top1", "view_rng",
]
