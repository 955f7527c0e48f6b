"""The command line's shared options, and the config objects they become.

Click lives here and in :mod:`kdcache.cli` only. Each group of options is a
decorator shared by the commands that take it; each ``_run``/``_crops``/
``_optim`` turns a command's parsed options into one config object, field by
field, and the object checks the values (see :mod:`kdcache.config`).
"""

from __future__ import annotations

from typing import Any, Callable

import click

from .config import CropRanges, OptimOptions, Recipe, RunOptions, default_workers


class FloatList(click.ParamType):
    """Comma-separated numbers, such as 0.7,0.3."""

    name = "FLOAT[,FLOAT...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


def _with_options(f: Callable, options: list[Callable]) -> Callable:
    """`f` decorated with `options`, the first listed shown first in --help."""
    for option in reversed(options):
        f = option(f)
    return f


def run_options(default_batch: int = 64, batch_help: str = "Images per optimizer step.",
                img_help: str = "Input size in pixels; a cached student may take another size than the teacher's "
                               "(the stored crop boxes are resized to it). [default: the cache's size in cached "
                               "mode, else 224]") -> Callable:
    def decorate(f: Callable) -> Callable:
        return _with_options(f, [
            click.option("--data", default="digits", show_default=True,
                         help="'digits' (built in), an ImageFolder root with train/ and test/ (or val/), "
                              "or a Stanford 40 Actions root (has ImageSplits/)."),
            click.option("--img-size", type=int, default=None, help=img_help),
            click.option("--batch-size", type=int, default=default_batch, show_default=True, help=batch_help),
            click.option("--workers", type=int, default=default_workers(), show_default=True,
                         help="DataLoader worker processes for decoding (0: decode in the main process). "
                              "Default: half the CPU cores, at most 8; 0 on 2 cores or fewer."),
            click.option("--device", default="auto", show_default=True,
                         help="auto (CUDA when available), cpu, cuda or cuda:N."),
            click.option("--amp/--no-amp", default=False, show_default=True,
                         help="Mixed precision (bfloat16, or float16 on older GPUs); CUDA only."),
            click.option("--seed", type=int, default=0, show_default=True,
                         help="Seeds crops (with sample id and view), batch order and model init; 0 to 2**64 - 1."),
        ])
    return decorate


def crop_options(f: Callable) -> Callable:
    defaults = CropRanges()
    return _with_options(f, [
        click.option("--crop-scale", type=(float, float), default=defaults.scale, show_default=True,
                     help="RandomResizedCrop area range, as fractions of the image."),
        click.option("--crop-ratio", type=(float, float), default=defaults.ratio, show_default=True,
                     help="RandomResizedCrop aspect-ratio range."),
        click.option("--hflip", type=float, default=defaults.hflip, show_default=True,
                     help="Probability that a view is mirrored."),
    ])


def recipe_options(smoothing: bool = False) -> Callable:
    """timm train.py's augmentation options (same names and meanings); `smoothing` adds --smoothing (training)."""
    d = Recipe()

    def decorate(f: Callable) -> Callable:
        options = [
            click.option("--mixup", type=float, default=d.mixup, show_default=True,
                         help="Mixup alpha (Beta(alpha, alpha)); 0 is off. Each view's partner is another image's "
                              "same view, drawn from (seed, sample id, view)."),
            click.option("--cutmix", type=float, default=d.cutmix, show_default=True, help="CutMix alpha; 0 is off."),
            click.option("--mixup-prob", type=float, default=d.mixup_prob, show_default=True,
                         help="Probability that a view is mixed when --mixup or --cutmix is on."),
            click.option("--mixup-switch-prob", type=float, default=d.mixup_switch_prob, show_default=True,
                         help="With both on: probability of CutMix instead of Mixup."),
            click.option("--aa", default=d.aa, show_default=True,
                         help="RandAugment as a timm string, e.g. rand-m9-mstd0.5-inc1, or trivialaugment "
                              "(= rand-m10-n1-p1-mstd101-inc1). '' is off."),
            click.option("--color-jitter", type=float, default=d.color_jitter, show_default=True,
                         help="Brightness/contrast/saturation jitter; as in timm, not applied with --aa."),
            click.option("--reprob", type=float, default=d.reprob, show_default=True,
                         help="Random erasing probability (timm's RandomErasing, per-pixel noise)."),
        ]
        if smoothing:
            options.append(click.option("--smoothing", type=float, default=0.0, show_default=True,
                                        help="Label smoothing of the cross-entropy term."))
        return _with_options(f, options)
    return decorate


def optim_options(f: Callable) -> Callable:
    d = OptimOptions()
    return _with_options(f, [
        click.option("--opt", default=d.opt, show_default=True, help="timm optimizer name (sgd, adamw, ...)."),
        click.option("--lr", type=float, default=d.lr, show_default=True),
        click.option("--momentum", type=float, default=d.momentum, show_default=True),
        click.option("--weight-decay", type=float, default=d.weight_decay, show_default=True),
        click.option("--sched", default=d.sched, show_default=True, help="timm scheduler name (step, cosine, ...)."),
        click.option("--decay-epochs", type=int, default=None,
                     help="Step decay period. [default: a third of --epochs]"),
        click.option("--decay-rate", type=float, default=d.decay_rate, show_default=True),
        click.option("--warmup-epochs", type=int, default=d.warmup_epochs, show_default=True),
    ])


# The options of run_options, crop_options and optim_options become config objects here, field by field;
# the objects check the values (see kdcache.config).

def run_config(o: dict) -> RunOptions:
    return RunOptions(data=o["data"], img_size=o["img_size"], batch_size=o["batch_size"], workers=o["workers"],
                      device=o["device"], amp=o["amp"], seed=o["seed"])


def crop_ranges(o: dict) -> CropRanges:
    return CropRanges(scale=o["crop_scale"], ratio=o["crop_ratio"], hflip=o["hflip"])


def recipe_config(o: dict) -> Recipe:
    return Recipe(mixup=o["mixup"], cutmix=o["cutmix"], mixup_prob=o["mixup_prob"],
                  mixup_switch_prob=o["mixup_switch_prob"], aa=o["aa"], color_jitter=o["color_jitter"],
                  reprob=o["reprob"])


def optim_config(o: dict) -> OptimOptions:
    return OptimOptions(opt=o["opt"], lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                        sched=o["sched"], decay_epochs=o["decay_epochs"], decay_rate=o["decay_rate"],
                        warmup_epochs=o["warmup_epochs"])
