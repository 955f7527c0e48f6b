"""``kdcache compare``: how teacher-like each trained student became, in numbers and a heatmap.

For every RUN_DIR (a ``train-student`` output folder) the student and the
teacher are evaluated on the same fixed random subset of the test split, each
on its evaluation view, and compared: top-1 agreement, KL(teacher || student),
linear CKA of the final embeddings, cosine and Euclidean distance through the
student's learned projector (feature-KD runs), and linear CKA of every teacher
stage with every student stage (see :mod:`kdcache.similarity`). Writes
``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare.png``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from . import outputs
from .augment import Preprocess
from .config import CompareConfig
from .data import ImageSet, open_dataset
from .devices import model_input, resolve_device
from .errors import KdcacheError
from .features import layer_outputs
from .loaders import EvalViews, eval_loader
from .models import PROJECTOR, build, load_projector
from .report import Progress
from .similarity import cosine_and_distance, kl_divergence, linear_cka


@dataclass
class Outputs:
    """A model's outputs on the compared images: logits (n, C), pooled embedding (n, D), stage vectors."""

    logits: np.ndarray
    pooled: np.ndarray
    stages: list[np.ndarray]


@dataclass
class StudentRun:
    """What a train-student folder says about its student."""

    folder: Path
    metrics: dict
    checkpoint: Path
    projector: Path | None

    @classmethod
    def open(cls, folder: str) -> "StudentRun":
        path = Path(folder)
        metrics_path = path / "metrics.json"
        if not metrics_path.is_file():
            raise KdcacheError(f"{path} has no metrics.json; compare takes train-student --out folders")
        try:
            metrics = json.loads(metrics_path.read_text())
            metrics["model"], metrics["img_size"]  # noqa: B018 (both must be there)
        except (ValueError, KeyError, TypeError):
            raise KdcacheError(f"{metrics_path} is not a train-student metrics file (no model and img_size)") from None
        checkpoint = path / "model.pt" if (path / "model.pt").is_file() else Path(metrics.get("checkpoint") or "")
        if not checkpoint.is_file():
            raise KdcacheError(f"{path} holds no model.pt (and metrics.json names none that exists)")
        projector = path / PROJECTOR if (path / PROJECTOR).is_file() else None
        return cls(path, metrics, checkpoint, projector)

    @property
    def name(self) -> str:
        return self.folder.name


@torch.inference_mode()
def model_outputs_on(model: nn.Module, images: ImageSet, rows: np.ndarray, prep: Preprocess, device: torch.device,
                     batch_size: int, workers: int, progress: Progress, label: str) -> Outputs:
    """`model`'s logits, pooled embedding and stage vectors on the evaluation view of `rows` of `images`."""
    model.eval()
    loader = eval_loader(Subset(EvalViews(images, prep), rows.tolist()), batch_size, workers, device)
    logits, pooled, stages = [], [], []
    progress.start(label, len(rows))
    for x, _ in loader:
        out, pre, vectors = layer_outputs(model, model_input(x, prep, device))
        logits.append(out.float().cpu().numpy())
        pooled.append(pre.float().cpu().numpy())
        stages.append([v.cpu().numpy() for v in vectors])
        progress.update(len(x))
    progress.stop()
    return Outputs(np.concatenate(logits), np.concatenate(pooled),
                   [np.concatenate([batch[i] for batch in stages]) for i in range(len(stages[0]))])


def similarity(teacher: Outputs, student: Outputs, labels: np.ndarray, projector: nn.Module | None) -> dict:
    """Every number compare reports for one student against the teacher."""
    agree = float(np.mean(teacher.logits.argmax(1) == student.logits.argmax(1)) * 100)
    result = {"top1": float(np.mean(student.logits.argmax(1) == labels) * 100), "agreement": agree,
              "kl_teacher_student": kl_divergence(teacher.logits, student.logits),
              "cka_final": linear_cka(teacher.pooled, student.pooled), "cosine": None, "distance": None}
    if projector is not None and projector.out_features == teacher.pooled.shape[1]:
        with torch.no_grad():
            projected = projector(torch.from_numpy(student.pooled)).numpy()
        result["cosine"], result["distance"] = cosine_and_distance(projected, teacher.pooled)
    result["cka_layers"] = [[linear_cka(t, s) for s in student.stages] for t in teacher.stages]
    return result


def compare(config: CompareConfig, progress: Progress | None = None) -> dict:
    """Compare each run's student with the teacher; write compare.json, compare.md and compare.png under OUT."""
    progress = progress or Progress()
    runs = [StudentRun.open(folder) for folder in config.runs]  # every folder is checked before any model runs
    outputs.check_writable(config.out)
    out = Path(config.out)
    device = resolve_device(config.run.device)
    test = open_dataset(config.run.data, "test")
    rng = np.random.default_rng(config.run.seed)
    rows = np.sort(rng.choice(len(test), size=min(config.samples, len(test)), replace=False))
    labels = test.labels[rows]
    first = runs[0].metrics
    teacher_size = config.run.img_size or (first.get("teacher_img_sizes") or [first["img_size"]])[0]
    teacher = build(config.teacher, test.num_classes, teacher_size, pretrained=config.teacher_pretrained,
                    checkpoint=config.teacher_checkpoint).to(device)
    teacher_prep = Preprocess.for_model(teacher, teacher_size)
    b, w = config.run.batch_size, config.run.workers
    t_out = model_outputs_on(teacher, test, rows, teacher_prep, device, b, w, progress, f"teacher {config.teacher}")
    students = []
    for run in runs:
        m = run.metrics
        model = build(m["model"], test.num_classes, m["img_size"], checkpoint=str(run.checkpoint)).to(device)
        # KD students trained on the teacher's normalisation, plain ones on their own (see prepare in train.py).
        prep = Preprocess.for_model(model if m.get("mode") == "plain" else teacher, m["img_size"])
        s_out = model_outputs_on(model, test, rows, prep, device, b, w, progress, f"student {run.name}")
        projector = load_projector(run.projector) if run.projector else None
        students.append({"run": str(run.folder), "name": run.name, "model": m["model"], "mode": m.get("mode"),
                         "feature_loss": m.get("feature_loss"), "img_size": m["img_size"],
                         **similarity(t_out, s_out, labels, projector)})
    report = {"teacher": config.teacher, "teacher_checkpoint": config.teacher_checkpoint or "",
              "teacher_img_size": teacher_size, "dataset": test.name, "split": test.split, "images": int(len(rows)),
              "teacher_top1": float(np.mean(t_out.logits.argmax(1) == labels) * 100), "students": students}
    outputs.write_text(out / "compare.json", json.dumps(report, indent=2) + "\n")
    outputs.write_text(out / "compare.md", markdown(report))
    heatmaps(report, out / "compare.png")
    return {**report, "out": str(out)}


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as Markdown: one summary table, then each student's layer-by-layer CKA."""
    lines = [f"# Teacher-student similarity: {report['teacher']} on {report['dataset']} ({report['split']}, "
             f"{report['images']} images)", "",
             f"Teacher top-1 on these images: {report['teacher_top1']:.2f} %.", "",
             "| run | student | mode | feature loss | top-1 % | agreement % | KL(t‖s) | CKA final | cosine | distance |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in report["students"]:
        lines.append(f"| {s['name']} | {s['model']} | {s['mode']} | {s['feature_loss'] or '–'} | {s['top1']:.2f} | "
                     f"{s['agreement']:.2f} | {_num(s['kl_teacher_student'])} | {_num(s['cka_final'])} | "
                     f"{_num(s['cosine'])} | {_num(s['distance'])} |")
    lines += ["", "Cosine and distance are between the teacher's pooled embedding and the student's, mapped by "
              "the student's learned projector (feature-KD runs only).", ""]
    for s in report["students"]:
        matrix = s["cka_layers"]
        lines += [f"## Layer CKA: {s['name']} (rows: teacher stages, columns: student stages)", "",
                  "| teacher \\ student | " + " | ".join(str(j) for j in range(len(matrix[0]))) + " |",
                  "|---|" + "---:|" * len(matrix[0])]
        lines += [f"| {i} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for i, row in enumerate(matrix)]
        lines.append("")
    return "\n".join(lines)


def heatmaps(report: dict, path: Path) -> None:
    """One layer-CKA heatmap per student (teacher stages down, student stages across), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = report["students"]
    cols = min(len(students), 4)  # rows of four: ten students stay readable, plain/cached pairs share a row
    rows = -(-len(students) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1.2, 3.6 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(students):]:
        ax.set_visible(False)
    image = None
    for i, (ax, s) in enumerate(zip(axes.flat, students)):
        matrix = np.array(s["cka_layers"])
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        ax.set_title(f"{s['name']}\nCKA final {s['cka_final']:.2f}", fontsize=9)
        ax.set_xlabel(f"{s['model']} stage", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel(f"{report['teacher']} stage")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="linear CKA")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    outputs.write_atomic(path, lambda f: f.write(buffer.getvalue()))
