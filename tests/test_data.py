"""Datasets: stable ids, fingerprints, the Stanford 40 layout and clear errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_stanford40, write_image
from kdcache.data import CONTENT_HASH_SCHEMES, HEAD_TAIL, WHOLE_FILE, open_dataset
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


def _bmp_folder(root: Path) -> Path:
    """An ImageFolder of 300x300 BMPs: 270 KB files whose middle no 64 KiB head or tail covers."""
    rng = np.random.default_rng(0)
    for c in range(2):
        for split in ("train", "test"):
            path = root / split / f"class{c}" / "0.bmp"
            path.parent.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(path)
    return root


def test_fingerprint_sees_a_change_in_the_middle_of_a_large_file(tmp_path: Path) -> None:
    root = _bmp_folder(tmp_path / "bmp")
    before = open_dataset(str(root), "train")
    assert before.content_hash_scheme == WHOLE_FILE
    old = {scheme: (before.fingerprint_for(scheme), before.content_hashes_for(scheme)) for scheme in
           CONTENT_HASH_SCHEMES}
    assert before.fingerprint == old[WHOLE_FILE][0] and np.array_equal(before.content_hashes, old[WHOLE_FILE][1])

    target = root / "train" / "class1" / "0.bmp"
    size = target.stat().st_size
    pixels = np.array(Image.open(target))
    pixels[100:200] = 0  # rows 100-199 black: bytes ~90 K to ~180 K of 270 K change
    Image.fromarray(pixels).save(target)
    assert target.stat().st_size == size > 256 * 1024

    after = open_dataset(str(root), "train")
    assert after.fingerprint != old[WHOLE_FILE][0]
    changed = np.flatnonzero(after.content_hashes != old[WHOLE_FILE][1])
    assert [after.relpaths[i] for i in changed] == ["class1/0.bmp"]
    # The scheme of caches written before misses it, which is why new dumps hash whole files.
    assert after.fingerprint_for(HEAD_TAIL) == old[HEAD_TAIL][0]


def test_content_hash_schemes(tmp_path: Path, image_folder: Path) -> None:
    # The old scheme is still computed as before: size, then the first and last 64 KiB.
    root = _bmp_folder(tmp_path / "bmp")
    ds = open_dataset(str(root), "train")
    data = ds.path(0).read_bytes()
    span = 64 * 1024
    digest = hashlib.blake2b(len(data).to_bytes(8, "little") + data[:span] + data[-span:], digest_size=8).digest()
    assert int(ds.content_hashes_for(HEAD_TAIL)[0]) == int.from_bytes(digest, "little") >> 1
    whole = hashlib.blake2b(len(data).to_bytes(8, "little") + data, digest_size=8).digest()
    assert int(ds.content_hashes_for(WHOLE_FILE)[0]) == int.from_bytes(whole, "little") >> 1
    # Files up to 128 KiB are hashed whole by both schemes, so their older caches keep fitting.
    small = open_dataset(str(image_folder), "train")
    assert small.fingerprint_for(HEAD_TAIL) == small.fingerprint_for(WHOLE_FILE)
    digits = open_dataset("digits", "train")  # pixels, under every scheme
    assert digits.fingerprint_for(HEAD_TAIL) == digits.fingerprint_for(WHOLE_FILE) == digits.fingerprint
    with pytest.raises(DataError, match="unknown content hash scheme 'xxh3'"):
        digits.fingerprint_for("xxh3")


def test_image_size_from_the_header_is_the_decoded_size(tmp_path: Path, image_folder: Path) -> None:
    """verify derives every record's crop from image_size(); it must be load()'s (H, W) for any file."""
    odd = tmp_path / "odd"
    (odd / "train" / "a").mkdir(parents=True)
    (odd / "test" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8)).save(odd / "train" / "a" / "grey.png")
    rotated = Image.fromarray(rng.integers(0, 255, (20, 44, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90 degrees": a viewer would show it 44 x 20
    rotated.save(odd / "train" / "a" / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 255, (17, 9, 4), dtype=np.uint8)).save(odd / "train" / "a" / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(odd / "test" / "a" / "x.png")
    for root in (image_folder, odd):
        train = open_dataset(str(root), "train")
        for row in range(len(train)):
            assert train.image_size(row) == tuple(train.load(row).shape[-2:]), train.describe(row)
    odd_train = open_dataset(str(odd), "train")
    assert sorted(odd_train.image_size(row) for row in range(3)) == [(17, 9), (20, 44), (30, 50)]
    digits = open_dataset("digits", "train")
    assert digits.image_size(0) == tuple(digits.load(0).shape[-2:])
