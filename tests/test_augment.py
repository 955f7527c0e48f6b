"""Crops are a function of (seed, sample_id, view) only."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kdcache.augment import Preprocess, apply_crop, box_pixels, sample_crop, view_rng
from kdcache.config import CropRanges

RANGES = CropRanges()


def crops_for(seed: int, ids: list[int], views: int, h: int = 375, w: int = 500) -> np.ndarray:
    out = []
    for sid in ids:
        for v in range(views):
            box, flip = sample_crop(view_rng(seed, sid, v), h, w, RANGES)
            out.append(np.append(box, float(flip)))
    return np.array(out)


class CropSet(Dataset):
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        # Disturb the global generators first: crops must not depend on them.
        np.random.seed(i)
        torch.manual_seed(i)
        return torch.from_numpy(crops_for(7, [self.ids[i]], 3))


def test_same_triple_same_crop_different_triple_different() -> None:
    a = crops_for(0, [5], 1)
    assert np.array_equal(a, crops_for(0, [5], 1))
    assert not np.array_equal(a, crops_for(1, [5], 1))
    assert not np.array_equal(a, crops_for(0, [6], 1))
    assert not np.array_equal(crops_for(0, [5], 2)[0], crops_for(0, [5], 2)[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_parent_and_workers_agree(workers: int) -> None:
    ids = [3, 17, 2**62 + 11, 40, 9]
    parent = crops_for(7, ids, 3)
    loader = DataLoader(CropSet(ids), batch_size=2, num_workers=workers, shuffle=False)
    from_workers = torch.cat([b.flatten(0, 1) for b in loader]).numpy()
    assert np.array_equal(parent, from_workers)


@pytest.mark.slow
def test_same_crops_in_a_fresh_process() -> None:
    code = ("import numpy as np; from kdcache.augment import sample_crop, view_rng; from kdcache.config import CropRanges;"
            "print(repr([sample_crop(view_rng(7, i, v), 375, 500, CropRanges())[0].tolist() for i in (1, 99) for v in (0, 4)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = [sample_crop(view_rng(7, i, v), 375, 500, RANGES)[0].tolist() for i in (1, 99) for v in (0, 4)]
    assert out.strip() == repr(here)


def test_boxes_lie_inside_the_image_and_respect_ranges() -> None:
    ranges = CropRanges(scale=(0.2, 0.6), ratio=(0.5, 2.0), hflip=0.0)
    for sid in range(300):
        box, flip = sample_crop(view_rng(0, sid, 0), 120, 90, ranges)
        top, left, h, w = box_pixels(box, 120, 90)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 90
        assert not flip
        assert 0.15 <= (h * w) / (120 * 90) <= 0.65  # rounding to whole pixels moves the area a little


def test_flip_probability_is_respected() -> None:
    flips = [sample_crop(view_rng(0, sid, 0), 64, 64, CropRanges(hflip=0.5))[1] for sid in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55


def test_apply_crop_output_and_flip() -> None:
    prep = Preprocess(size=16, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=0.875)
    image = torch.arange(3 * 40 * 50, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 40, 50)
    box = np.array([0.1, 0.2, 0.5, 0.5], dtype=np.float32)
    plain = apply_crop(image, box, False, prep)
    flipped = apply_crop(image, box, True, prep)
    assert plain.shape == (3, 16, 16) and plain.dtype == torch.uint8
    assert torch.equal(flipped, plain.flip(-1))
