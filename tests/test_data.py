"""Datasets: stable ids, fingerprints, the Stanford 40 layout and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_stanford40, write_image
from kdcache.data import open_dataset
from kdcache.errors import DataError


def test_digits_split_is_fixed() -> None:
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    assert (len(train), len(test)) == (1348, 449)
    assert set(train.ids).isdisjoint(test.ids) and all(i % 4 == 3 for i in test.ids)
    image = train.load(0)
    assert image.shape == (3, 32, 32) and image.dtype.is_floating_point is False
    assert train.fingerprint == open_dataset("digits", "train").fingerprint != test.fingerprint


def test_image_folder_ids_do_not_depend_on_listing(image_folder: Path) -> None:
    a = open_dataset(str(image_folder), "train")
    assert len(a) == 24 and a.classes == ["class0", "class1", "class2"]
    assert np.array_equal(np.bincount(a.labels), [8, 8, 8])
    id_of = dict(zip(a.relpaths, a.ids))
    # A new file changes the rows but not the ids of the files already there.
    write_image(image_folder / "train" / "class1" / "000a.jpg", 1, seed=5)
    b = open_dataset(str(image_folder), "train")
    assert all(id_of[p] == i for p, i in zip(b.relpaths, b.ids) if p in id_of)
    assert a.fingerprint != b.fingerprint
    test = open_dataset(str(image_folder), "test")
    assert len(test) == 12 and test.load(0).shape == (3, 40, 48)


def test_fingerprint_sees_a_changed_image(image_folder: Path) -> None:
    before = open_dataset(str(image_folder), "train")
    assert len(before.fingerprint) == 64  # computed now, before the change
    write_image(image_folder / "train" / "class2" / "003.jpg", 0, seed=999)
    after = open_dataset(str(image_folder), "train")
    assert before.fingerprint != after.fingerprint
    changed = np.flatnonzero(before.content_hashes != after.content_hashes)
    assert [after.relpaths[i] for i in changed] == ["class2/003.jpg"]


def test_image_folder_errors(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "missing"), "train")
    with pytest.raises(DataError, match="no train/ folder"):
        open_dataset(str(tmp_path), "train")
    (image_folder / "train" / "class3").mkdir()
    with pytest.raises(DataError, match="class3: empty class folder"):
        open_dataset(str(image_folder), "train")
    os.rmdir(image_folder / "train" / "class3")
    bad = image_folder / "train" / "class0" / "000.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = open_dataset(str(image_folder), "train")
    with pytest.raises(DataError, match="cannot decode image .*class0/000.jpg"):
        ds.load(ds.relpaths.index("class0/000.jpg"))


def test_stanford40_layout(stanford40: Path) -> None:
    train, test = open_dataset(str(stanford40), "train"), open_dataset(str(stanford40), "test")
    assert train.classes == ["applauding", "climbing", "riding_a_bike"]  # actions.txt order, header skipped
    assert (len(train), len(test)) == (18, 9)
    row = train.relpaths.index("climbing_002.jpg")
    assert train.labels[row] == 1 and train.load(row).shape == (3, 48, 36)


def test_stanford40_without_header_and_errors(tmp_path: Path) -> None:
    root = make_stanford40(tmp_path / "a", header=False)
    assert len(open_dataset(str(root), "train").classes) == 3
    (root / "JPEGImages" / "climbing_001.jpg").unlink()
    with pytest.raises(DataError, match="climbing_001.jpg"):
        open_dataset(str(root), "train")
    root = make_stanford40(tmp_path / "b")
    (root / "ImageSplits" / "climbing_train.txt").unlink()
    with pytest.raises(DataError, match="climbing"):
        open_dataset(str(root), "train")
