"""The kdcache command line: parse, validate, build a config, call one library function.

Library modules are imported inside the commands so that ``--help`` is quick.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .cli_options import FloatList, crop_options, crop_ranges, optim_config, optim_options, recipe_config, \
    recipe_options, run_config, run_options
from .config import CompareConfig, DumpConfig, RunOptions, TrainConfig, save_json


def _clean_message(e: Exception) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with a traceback."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


class _Group(click.Group):
    """Turns kdcache's own errors into a one-line message: exit code 2 for a bad option, 1 for the rest."""

    def invoke(self, ctx: click.Context) -> Any:
        from .errors import ConfigError, KdcacheError

        try:
            return super().invoke(ctx)
        except KdcacheError as e:
            from .distributed import tell_launcher

            message = _clean_message(e)
            tell_launcher(message)
            if isinstance(e, ConfigError):
                raise click.UsageError(message) from None
            raise click.ClickException(message) from None
        except KeyboardInterrupt:
            click.echo("interrupted; a dump resumes when the same command runs again", err=True)
            sys.exit(130)


def _is_main() -> bool:
    """False in torchrun's ranks other than 0: they print nothing and write no shared files."""
    from .distributed import Dist

    return Dist.from_env().is_main()


def _progress():
    from .report import Progress, RichProgress

    return RichProgress() if _is_main() else Progress()


def _print_result(title: str, result: dict, keys: list[str]) -> None:
    from rich.console import Console

    from .report import table

    Console().print(table(title, ["field", "value"], [(k, result[k]) for k in keys if k in result]))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdcache")
def main() -> None:
    """Offline knowledge distillation with a replayable teacher cache.

    \b
    The two-phase workflow:
      1. kdcache train-teacher ...            (or bring a checkpoint)
      2. kdcache dump-teacher ... --out c.h5  (the teacher runs once, K seeded views per image)
      3. kdcache train-student ... --cached c.h5   (the teacher never runs again)

    `kdcache demo` runs the whole pipeline on the built-in digits dataset.
    """


def _train(config: TrainConfig, mode_title: str) -> None:
    """Run `config` (fit writes OUT/config.json once the run is prepared) and print its results."""
    from .train import fit

    result = fit(config, progress=_progress())
    if _is_main():
        _print_result(f"{mode_title}: {result['model']} ({result['mode']})", result,
                      ["top1", "mAP", "epochs", "processes", "views_per_step", "images_per_second",
                       "train_seconds", "wall_seconds", "checkpoint"])
        click.echo(f"metrics: {Path(config.out) / 'metrics.json'}")


@main.command("train-teacher")
@click.option("--model", default="convnext_small", show_default=True, help="timm model name of the teacher.")
@click.option("--epochs", type=int, default=TrainConfig.epochs, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (checkpoint, metrics.json).")
@click.option("--pretrained", is_flag=True, help="Start from timm's pretrained weights (needs network access).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Start from local weights (.pt/.pth via weights_only, or .safetensors); a head of another "
                   "size is replaced.")
@run_options(img_help="Input size in pixels. [default: 224]")
@optim_options
@crop_options
@recipe_options(smoothing=True)
def train_teacher(model: str, epochs: int, out: str, pretrained: bool, checkpoint: str | None, **o: Any) -> None:
    """Train or fine-tune a teacher with plain supervised training.

    Defaults follow the paper's recipe: SGD, lr 1e-3, momentum 0.9, weight
    decay 1e-5, step decay. Writes OUT/model.pt and OUT/metrics.json.

    \b
    Example:
      kdcache train-teacher --data cifar10-jpg --model convnext_atto --img-size 32 --epochs 10 --out runs/teacher
    """
    _train(TrainConfig(model=model, out=out, run=run_config(o), optim=optim_config(o), epochs=epochs, crops=crop_ranges(o),
                       recipe=recipe_config(o), smoothing=o["smoothing"], pretrained=pretrained,
                       checkpoint=checkpoint), "teacher")


@main.command("dump-teacher")
@click.option("--teacher", required=True, help="timm model name of the teacher.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="The teacher's weights (e.g. OUT/model.pt of train-teacher).")
@click.option("--pretrained", is_flag=True, help="Use timm's pretrained weights instead of --checkpoint.")
@click.option("--views", type=int, default=DumpConfig.views, show_default=True,
              help="Seeded crops per image (a student epoch e uses view e mod K). On an existing cache of the "
                   "same settings with fewer views, adds the missing views (the others are kept, not recomputed).")
@click.option("--store", default="fp16", show_default=True, help="Logit storage: fp16, fp32 or topk:K.")
@click.option("--compact", is_flag=True,
              help="Compact records: store no crop box or flip (17 of topk:5's 41 bytes per image and view) and "
                   "top-k's log-sum-exp in float16 (2 more): topk:5 then takes 22 bytes. Readers re-derive each "
                   "crop from (seed, sample id, view) and the image size, and every open checks 64 stored "
                   "records against that derivation. Format version 2: releases reading only version 1 refuse it.")
@click.option("--features", default="", help="Also store teacher features per view: pooled (the pre-logits "
              "embedding), attention:S (an S x S attention map of the last feature map) or both, e.g. "
              "pooled,attention:7; float32 with --store fp32, else float16. [default: none]")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The cache file to write (.h5).")
@click.option("--force", is_flag=True,
              help="Overwrite an existing cache, and discard a partial dump made with other settings.")
@run_options(default_batch=256, batch_help="Crops per teacher forward pass (images x views).",
             img_help="Input size in pixels. [default: 224]")
@crop_options
@recipe_options()
def dump_teacher(teacher: str, checkpoint: str | None, pretrained: bool, views: int, store: str, compact: bool,
                 features: str, out: str, force: bool, **o: Any) -> None:
    """Run the teacher once over K seeded views of every training image into one HDF5 cache.

    The crop of (seed, sample id, view) is stored with the teacher's logits, so
    students replay it exactly (with --compact it is derived again on read). An interrupted dump resumes when the same
    command runs again; the file appears under its name only when complete.
    Run on a complete cache of the same settings with more --views, it grows
    that cache: the new views are dumped, the old ones copied bit for bit, and
    OUT is replaced only by the complete grown cache (one process only).
    With --mixup, --cutmix, --aa, --color-jitter or --reprob the teacher sees
    the mixed, augmented views; every view's parameters are stored (a format
    version 2 cache), so students replay exactly those pixels.

    \b
    Example:
      kdcache dump-teacher --data cifar10-jpg --teacher convnext_atto --checkpoint runs/teacher/model.pt \\
          --views 10 --img-size 32 --out cache.h5

    \b
    Several processes (GPUs, nodes): torchrun --nproc_per_node N -m kdcache dump-teacher ...
    Each rank dumps every N-th image into OUT.rankR-of-N; rank 0 merges the parts into OUT.
    --batch-size then counts crops per forward pass of each process.
    """
    from .teacher import dump

    config = DumpConfig(teacher=teacher, out=out, run=run_config(o), checkpoint=checkpoint, pretrained=pretrained,
                        views=views, crops=crop_ranges(o), recipe=recipe_config(o), store=store, compact=compact,
                        force=force, features=features)
    main_process = _is_main()
    if checkpoint is None and not pretrained and main_process:
        click.echo("note: no --checkpoint or --pretrained: the teacher has random weights", err=True)
    result = dump(config, progress=_progress())
    if main_process:
        save_json(config, Path(out).with_name(Path(out).name + ".config.json"))
        _print_result(f"cache {out}", result, ["num_samples", "num_views", "num_classes", "store", "processes",
                                               "records_dumped", "records_per_second", "teacher_view_top1",
                                               "file_bytes"])


@main.command("train-student")
@click.option("--model", required=True, help="timm model name of the student.")
@click.option("--epochs", type=int, default=TrainConfig.epochs, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (checkpoint, metrics.json).")
@click.option("--cached", type=click.Path(dir_okay=False), multiple=True,
              help="Cached KD: replay crops and teacher logits from this cache. Repeat it to train from an "
                   "ensemble of caches dumped on the same crops (same --data, --seed, crop ranges).")
@click.option("--teacher-weights", type=FloatList(), multiple=True,
              help="One positive weight per --cached file, e.g. 0.7,0.3 (or repeated): the ensemble target is the "
                   "weighted mean of the teachers' probabilities at --temperature. [default: equal weights]")
@click.option("--preload/--no-preload", default=None,
              help="Load the cache into memory. [default: when it is under 2 GiB]")
@click.option("--online-teacher", default=None, help="Online KD: run this timm teacher live on the same crops.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Weights of --online-teacher.")
@click.option("--teacher-pretrained", is_flag=True, help="Online teacher with timm's pretrained weights.")
@click.option("--alpha", type=float, default=TrainConfig.alpha, show_default=True,
              help="Weight of the label cross-entropy, in [0, 1]; 1 - alpha weighs the KD term.")
@click.option("--temperature", type=float, default=TrainConfig.temperature,
              show_default=True, help="Softmax temperature T (> 0) of the KD term (scaled by T^2).")
@click.option("--feature-loss", type=click.Choice(["mse", "cosine", "attention"]), default=None,
              help="Add a feature term: mse or cosine between the student's pooled embedding (through a learned "
                   "projector, saved as OUT/projector.safetensors) and the teacher's, or attention transfer "
                   "between S x S attention maps. Cached mode needs a cache dumped with --features.")
@click.option("--feature-weight", type=float, default=TrainConfig.feature_weight, show_default=True,
              help="Weight (>= 0) of the feature term added to the loss.")
@click.option("--attention-size", type=int, default=None,
              help="S of the attention maps with --online-teacher. [default: the cache's S in cached mode]")
@click.option("--pretrained", is_flag=True, help="Start the student from timm's pretrained weights.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Start the student from local weights.")
@click.option("--views-per-step", type=int, default=TrainConfig.views_per_step, show_default=True,
              help="Decode each image once per step and train on M of its views (FKD's multi-crop): the step "
                   "sees batch-size x M crops; epoch e uses views e*M .. e*M+M-1 (mod K when cached).")
@run_options()
@optim_options
@crop_options
@recipe_options(smoothing=True)
def train_student(model: str, epochs: int, out: str, cached: tuple[str, ...],
                  teacher_weights: tuple[tuple[float, ...], ...], preload: bool | None,
                  online_teacher: str | None, teacher_checkpoint: str | None, teacher_pretrained: bool, alpha: float,
                  temperature: float, feature_loss: str | None, feature_weight: float, attention_size: int | None,
                  pretrained: bool, checkpoint: str | None, views_per_step: int, **o: Any) -> None:
    """Train a student: plain, with cached KD (--cached) or with online KD (--online-teacher).

    \b
    Loss: (1-alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha * CE(y, s)
          [+ feature-weight * feature term, with --feature-loss]
    The three modes share one loop and one loss; only where the teacher
    logits come from differs. Without --cached or --online-teacher the
    student trains on labels alone.

    \b
    Examples:
      kdcache train-student --data cifar10-jpg --model pvt_v2_b0 --epochs 10 --cached cache.h5 --out runs/kd
      kdcache train-student --data cifar10-jpg --model pvt_v2_b0 --epochs 10 --cached a.h5 --cached b.h5 \\
          --teacher-weights 0.7,0.3 --out runs/ensemble
      kdcache train-student --data cifar10-jpg --model pvt_v2_b0 --epochs 10 --img-size 32 \\
          --online-teacher convnext_atto --teacher-checkpoint runs/teacher/model.pt --out runs/online

    \b
    Several processes (GPUs, nodes): torchrun --nproc_per_node N -m kdcache train-student ...
    --batch-size is then the global batch, split evenly over the N processes (DDP),
    so the run takes the same steps on the same crops as one process.
    """
    _train(TrainConfig(model=model, out=out, run=run_config(o), optim=optim_config(o), epochs=epochs,
                       views_per_step=views_per_step, crops=crop_ranges(o), recipe=recipe_config(o),
                       smoothing=o["smoothing"], pretrained=pretrained, checkpoint=checkpoint,
                       alpha=alpha, temperature=temperature, cached=cached,
                       teacher_weights=tuple(w for ws in teacher_weights for w in ws) or None, preload=preload,
                       online_teacher=online_teacher, teacher_checkpoint=teacher_checkpoint,
                       teacher_pretrained=teacher_pretrained, feature_loss=feature_loss,
                       feature_weight=feature_weight, attention_size=attention_size), "student")


@main.command()
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
def inspect(cache: str, as_json: bool) -> None:
    """Summarise CACHE: provenance, sizes, per-view teacher accuracy, entropy and confidence.

    Every record is read and checked; the exit code is 1 when any is damaged.
    """
    from .audit import inspect_cache

    summary = inspect_cache(cache)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        from .report import print_inspect

        print_inspect(cache, summary)
    if not summary["ok"]:  # the summary is printed either way; the exit code tells a script
        bad = summary["bad_records"]
        raise click.ClickException(f"{cache}: {bad} damaged record{'s' if bad != 1 else ''} (first: "
                                   f"{summary['first_bad_records'][0]}); 'kdcache verify' checks the rest")


@main.command()
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--data", default="digits", show_default=True, help="The dataset the cache was dumped from.")
@click.option("--teacher", required=True, help="timm model name of the teacher.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="The teacher's weights.")
@click.option("--pretrained", is_flag=True, help="Use timm's pretrained weights instead of --checkpoint.")
@click.option("--samples", type=click.IntRange(1), default=256, show_default=True,
              help="Random (image, view) records to run the teacher on. Every record's crop and recipe "
                   "parameters are checked against their seeds whatever this is.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Which records are drawn.")
@click.option("--tolerance", type=click.FloatRange(0), default=None,
              help="Largest accepted logit difference relative to the record's largest |logit|. "
                   "[default: 1e-3 for fp32, 2e-2 for fp16 and top-k]")
@click.option("--device", default="auto", show_default=True)
def verify(cache: str, data: str, teacher: str, checkpoint: str | None, pretrained: bool, samples: int, seed: int,
           tolerance: float | None, device: str) -> None:
    """Recompute random records of CACHE with the teacher; exit 1 if they differ.

    Each sampled record's crop must be the one its (seed, sample id, view)
    gives, and its logits must match the teacher's on that crop.
    """
    from .audit import require_ok, verify_cache

    result = verify_cache(cache, data, teacher, checkpoint, samples=samples, seed=seed, device=device,
                          pretrained=pretrained, tolerance=tolerance, progress=_progress())
    _print_result(f"verify {cache}", result, ["samples", "store", "max_abs_logit_diff", "max_rel_logit_diff",
                                              "tolerance", "mean_kl", "crop_mismatches", "min_feature_cosine",
                                              "ok"])
    require_ok(result)
    click.echo("ok: the cache matches the teacher")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--data", default="digits", show_default=True, help="The dataset whose test split is compared on.")
@click.option("--teacher", required=True, help="timm model name of the teacher.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None, help="The teacher's weights.")
@click.option("--teacher-pretrained", is_flag=True, help="Use timm's pretrained weights for the teacher.")
@click.option("--img-size", type=int, default=None,
              help="The teacher's input size. [default: the first run's teacher size, else its own]")
@click.option("--samples", type=int, default=CompareConfig.samples, show_default=True,
              help="Test images compared (a fixed random subset; bounds time and memory).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Which test images are drawn.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for compare.json, compare.md and compare.png.")
def compare(runs: tuple[str, ...], data: str, teacher: str, teacher_checkpoint: str | None, teacher_pretrained: bool,
            img_size: int | None, samples: int, batch_size: int, device: str, seed: int, out: str) -> None:
    """How teacher-like each student of RUNS (train-student --out folders) became.

    Per student, on the test split: top-1 agreement with the teacher, KL(teacher || student), linear CKA of the
    final embeddings, cosine and distance through its projector (feature KD), and a layer-by-layer CKA heatmap.

    \b
    Example:
      kdcache compare --data cifar10-jpg --teacher convnext_atto --teacher-checkpoint runs/teacher/model.pt \\
          runs/plain runs/kd --out runs/compare
    """
    from .compare import compare as run_compare

    config = CompareConfig(teacher=teacher, runs=runs, out=out, teacher_checkpoint=teacher_checkpoint,
                           teacher_pretrained=teacher_pretrained, samples=samples,
                           run=RunOptions(data=data, img_size=img_size, batch_size=batch_size, workers=0,
                                          device=device, seed=seed))
    result = run_compare(config, progress=_progress())
    _print_result(f"compare against {teacher} ({result['images']} test images)", {
        s["name"]: f"agreement {s['agreement']:.1f} %, KL {s['kl_teacher_student']:.3f}, CKA {s['cka_final']:.3f}"
        for s in result["students"]}, [s["name"] for s in result["students"]])
    click.echo(f"report: {Path(out) / 'compare.md'} (and compare.json, compare.png)")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every output of the demo.")
@click.option("--device", default="auto", show_default=True)
def demo(out: str, device: str) -> None:
    """The whole pipeline on the built-in digits dataset, in a few minutes on a CPU.

    Trains a teacher, dumps it once, trains one student plain, with cached KD
    and with online KD, and prints a table of the results.
    """
    from rich.console import Console

    from .demo import run_demo
    from .report import table

    rows = run_demo(out, device=device, progress=_progress())
    console = Console()
    console.print(table("kdcache demo (digits, 32 px)", ["run", "mode", "top-1 %", "mAP %", "wall s", "train img/s"],
                        [(r["name"], r["mode"], r["top1"], r["mAP"], r["wall_seconds"], r["images_per_second"])
                         for r in rows]))
    console.print(f"outputs: {Path(out).resolve()} (cache, checkpoints, metrics.json per run, summary.json)")


if __name__ == "__main__":
    main()
