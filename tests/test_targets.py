"""A cache is refused for data it was not dumped from, with the first difference named; each branch once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TEACHER, make_image_folder, make_stanford40, write_image
from kdcache.cache import CacheReader
from kdcache.config import DumpConfig, RunOptions
from kdcache.data import open_dataset
from kdcache.errors import CacheError
from kdcache.targets import check_cache_fits
from kdcache.teacher import dump

pytestmark = pytest.mark.slow  # each module fixture dumps a teacher


def _dump(data: Path, out: Path) -> CacheReader:
    dump(DumpConfig(teacher=TEACHER, out=str(out), views=1,
                    run=RunOptions(data=str(data), img_size=32, batch_size=64, workers=0, device="cpu")))
    return CacheReader(out)


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CacheReader]:
    root = tmp_path_factory.mktemp("folder")
    data = make_image_folder(root / "data")  # 3 classes x 8 training images
    return data, _dump(data, root / "c.h5")


@pytest.fixture(scope="module")
def stanford_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CacheReader]:
    root = tmp_path_factory.mktemp("s40")
    data = make_stanford40(root / "data")
    return data, _dump(data, root / "c.h5")


def refused(reader: CacheReader, data: Path) -> str:
    with pytest.raises(CacheError) as caught:
        check_cache_fits(reader, open_dataset(str(data), "train"))
    message = str(caught.value)
    assert "\n" not in message and str(reader.path) in message
    return message


def edited_copy(data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / data.name
    shutil.copytree(data, copy)
    return copy


def test_the_same_data_fits(folder_cache, stanford_cache) -> None:
    for data, reader in (folder_cache, stanford_cache):
        check_cache_fits(reader, open_dataset(str(data), "train"))


def test_another_image_count(folder_cache, tmp_path: Path) -> None:
    data, reader = folder_cache
    copy = edited_copy(data, tmp_path)
    (copy / "train" / "class2" / "007.jpg").unlink()
    assert "another dataset than imagefolder:data (it holds 24 images, the training split has 23)" in \
        refused(reader, copy)


def test_another_class_count(folder_cache, tmp_path: Path) -> None:
    data, reader = folder_cache
    four = make_image_folder(tmp_path / "folder", classes=4, train=6)  # 24 images too
    assert "(it has 3 classes, the dataset has 4)" in refused(reader, four)


def test_sample_ids_differ(folder_cache, tmp_path: Path) -> None:
    data, reader = folder_cache
    copy = edited_copy(data, tmp_path)
    (copy / "train" / "class1" / "003.jpg").rename(copy / "train" / "class1" / "003b.jpg")  # same place in order
    assert "(1 sample ids differ (another dataset, split or file names))" in refused(reader, copy)


def test_labels_differ(stanford_cache, tmp_path: Path) -> None:
    """Stanford 40 ids are file names, so a file listed under another action keeps its id and changes its label."""
    data, reader = stanford_cache
    copy = edited_copy(data, tmp_path)
    splits = copy / "ImageSplits"
    moved = "climbing_002.jpg"
    for action, edit in (("climbing", lambda names: [n for n in names if n != moved]),
                         ("applauding", lambda names: names + [moved])):
        path = splits / f"{action}_train.txt"
        path.write_text("\n".join(edit(path.read_text().split())) + "\n")
    assert f"(labels differ, first at {copy.resolve() / 'JPEGImages' / moved})" in refused(reader, copy)


def test_one_changed_image(folder_cache, tmp_path: Path) -> None:
    data, reader = folder_cache
    copy = edited_copy(data, tmp_path)
    changed = copy / "train" / "class0" / "005.jpg"
    write_image(changed, label=0, seed=999)  # same name and class, other pixels
    assert f"(1 images changed since the dump, first {changed.resolve()})" in refused(reader, copy)


def test_class_names_differ(stanford_cache, tmp_path: Path) -> None:
    data, reader = stanford_cache
    copy = edited_copy(data, tmp_path)
    splits = copy / "ImageSplits"
    for split in ("train", "test"):
        (splits / f"riding_a_bike_{split}.txt").rename(splits / f"cycling_{split}.txt")
    actions = splits / "actions.txt"
    actions.write_text(actions.read_text().replace("riding_a_bike", "cycling"))
    assert "(the class names differ)" in refused(reader, copy)

