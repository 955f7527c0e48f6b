"""Shared fixtures: tiny generated datasets and a small teacher checkpoint."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

TEACHER = "test_convnext"  # timm's tiny test models: real architectures, a fraction of a second per batch
STUDENT = "test_vit"


def write_image(path: Path, label: int, seed: int, size: tuple[int, int] = (40, 48)) -> None:
    """A small RGB image whose colour depends on its label, with per-file noise."""
    rng = np.random.default_rng(seed)
    base = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 40, size=(size[0], size[1], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def make_image_folder(root: Path, classes: int = 3, train: int = 8, test: int = 4) -> Path:
    for c in range(classes):
        for i in range(train):
            write_image(root / "train" / f"class{c}" / f"{i:03d}.jpg", c, seed=100 * c + i)
        for i in range(test):
            write_image(root / "test" / f"class{c}" / f"{i:03d}.png", c, seed=10_000 + 100 * c + i)
    return root


def make_stanford40(root: Path, actions: tuple[str, ...] = ("applauding", "climbing", "riding_a_bike"),
                    train: int = 6, test: int = 3, header: bool = True) -> Path:
    """A Stanford 40 Actions layout: JPEGImages/, ImageSplits/, XMLAnnotations/."""
    splits = root / "ImageSplits"
    splits.mkdir(parents=True)
    (root / "XMLAnnotations").mkdir()
    lines = ["action_name\tnumber_of_images"] if header else []
    all_train, all_test = [], []
    for label, action in enumerate(actions):
        names = [f"{action}_{i:03d}.jpg" for i in range(1, train + test + 1)]
        for i, name in enumerate(names):
            write_image(root / "JPEGImages" / name, label, seed=1000 * label + i, size=(48, 36))
            (root / "XMLAnnotations" / name.replace(".jpg", ".xml")).write_text("<annotation/>")
        (splits / f"{action}_train.txt").write_text("\n".join(names[:train]) + "\n")
        (splits / f"{action}_test.txt").write_text("\n".join(names[train:]) + "\n")
        all_train += names[:train]
        all_test += names[train:]
        lines.append(f"{action}\t{train + test}")
    (splits / "actions.txt").write_text("\n".join(lines) + "\n")
    (splits / "train.txt").write_text("\n".join(all_train) + "\n")
    (splits / "test.txt").write_text("\n".join(all_test) + "\n")
    return root


def recomputed(metrics: dict, data: str, prep) -> dict:
    """Top-1 and mAP of a run's saved checkpoint, evaluated here with preprocessing `prep`."""
    from kdcache.data import open_dataset
    from kdcache.models import build
    from kdcache.train import evaluate

    test = open_dataset(data, "test")
    model = build(metrics["model"], test.num_classes, metrics["img_size"], checkpoint=metrics["checkpoint"])
    return evaluate(model, test, prep, torch.device("cpu"), metrics["batch_size"], workers=0)


def rows_done(partial: Path) -> int:
    """Rows a (partial) dump file has marked done; 0 while it is not created yet or caught mid-write."""
    try:
        with h5py.File(partial, "r", locking=False) as h5:
            return int(h5["done"][:].sum())
    except (OSError, KeyError):
        return 0


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "folder")


@pytest.fixture
def stanford40(tmp_path: Path) -> Path:
    return make_stanford40(tmp_path / "stanford40")


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint of the test teacher with fixed random weights, for the 10 digit classes."""
    from kdcache.models import create_model, save_checkpoint

    torch.manual_seed(123)
    model = create_model(TEACHER, num_classes=10, img_size=32)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(model, path, {"arch": TEACHER, "num_classes": 10})
    return str(path)
