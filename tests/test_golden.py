"""Caches written by an older kdcache stay readable: golden files of each format version.

The files in tests/data/ were written once by the version named in
make_golden_v1.py and make_golden_v2.py and are committed. A change to the format that breaks them
fails here, not on a user's disk.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache import CacheReader

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("make_golden_v1", DATA / "make_golden_v1.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


@pytest.mark.parametrize("store", sorted(golden.STORES))
def test_golden_v1_cache_reads_with_todays_reader(store: str) -> None:
    expected = golden.golden_values()
    reader = CacheReader(DATA / golden.STORES[store])
    assert reader.attrs["format_version"] == 1
    assert reader.info == golden.golden_info(store)
    np.testing.assert_array_equal(reader.sample_ids, expected["sample_ids"])
    np.testing.assert_array_equal(reader.labels, expected["labels"])
    np.testing.assert_array_equal(reader.content_hashes, expected["content_hashes"])
    rows = np.array([4, 0, 2])  # unsorted on purpose: the reader must return them in the order asked
    for view in range(golden.K):
        boxes, flips, logits = reader.read(rows, view)
        np.testing.assert_array_equal(boxes, expected["crops"][rows, view])
        np.testing.assert_array_equal(flips, expected["flips"][rows, view].astype(bool))
        want = expected["logits"][rows, view]
        if store == "fp32":
            np.testing.assert_array_equal(logits, want)
        elif store == "fp16":
            np.testing.assert_array_equal(logits, want.astype(np.float16).astype(np.float32))
        else:  # top-2: the two largest logits (fp16) keep their classes; the tail is flat
            top = np.argsort(-want, axis=1)[:, :2]
            np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :2], top)
            np.testing.assert_allclose(np.take_along_axis(logits, top, 1), np.take_along_axis(want, top, 1),
                                       rtol=1e-3, atol=1e-3)
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            full = np.exp(want - want.max(1, keepdims=True))
            full /= full.sum(1, keepdims=True)
            np.testing.assert_allclose(np.take_along_axis(probs, top, 1), np.take_along_axis(full, top, 1),
                                       rtol=2e-3, atol=1e-4)
    reader.close()


_spec2 = importlib.util.spec_from_file_location("make_golden_v2", DATA / "make_golden_v2.py")
golden_v2r = importlib.util.module_from_spec(_spec2)
sys.modules.setdefault("make_golden_v1", golden)  # make_golden_v2 builds on the v1 values
_spec2.loader.exec_module(golden_v2r)


def test_golden_v2_recipe_cache_reads_with_todays_reader() -> None:
    """A cache with a recipe (format version 2): its recipe and every stored view parameter read back as written."""
    expected = golden_v2r.golden_values()
    reader = CacheReader(DATA / golden_v2r.NAME)
    assert reader.attrs["format_version"] == 2
    assert reader.info == golden_v2r.golden_info()
    assert reader.recipe.mixup == 0.8 and reader.recipe.aa == "rand-m9-mstd0.5-inc1"
    rows = np.array([4, 0, 2])
    for view in range(golden_v2r.K):
        records = reader.read_records(rows, view)
        np.testing.assert_array_equal(records["crops"], expected["crops"][rows, view])
        np.testing.assert_array_equal(records["teacher_logits"], expected["logits"][rows, view])
        for name in reader.params.names:
            np.testing.assert_array_equal(records[name], expected[name][rows, view], err_msg=name)
    assert reader.scan().ok
    reader.close()


_spec_v2 = importlib.util.spec_from_file_location("make_golden_v2_compact", DATA / "make_golden_v2_compact.py")
golden_v2 = importlib.util.module_from_spec(_spec_v2)
_spec_v2.loader.exec_module(golden_v2)


def test_golden_v2_compact_cache_reads_with_todays_reader() -> None:
    """Compact records: crops derived from the seed and the image sizes, the tail's float16 log-sum-exp."""
    from kdcache.augment import sample_crops

    expected = golden.golden_values()
    reader = CacheReader(DATA / golden_v2.NAME)  # its crop witness re-derives bit for bit, or this fails
    assert reader.attrs["format_version"] == 2 and not reader.stores_crops
    assert reader.info == golden_v2.golden_info()
    np.testing.assert_array_equal(reader.sample_ids, expected["sample_ids"])
    rows = np.array([4, 0, 2])
    sizes = [golden_v2.image_size(int(r)) for r in rows]
    for view in range(golden.K):
        boxes, flips, logits = reader.read(rows, view, sizes)
        want_boxes, want_flips = sample_crops(7, expected["sample_ids"][rows], sizes, view, reader.ranges)
        assert boxes.tobytes() == want_boxes.tobytes() and np.array_equal(flips, want_flips)
        want = expected["logits"][rows, view]
        top = np.argsort(-want, axis=1)[:, :2]
        np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :2], top)
        np.testing.assert_array_equal(np.take_along_axis(logits, top, 1),
                                      np.take_along_axis(want, top, 1).astype(np.float16).astype(np.float32))
        rest = np.ones_like(want, dtype=bool)
        np.put_along_axis(rest, top, False, 1)
        tail = np.log(np.exp(want[rest].reshape(-1, 2).astype(np.float64)).sum(1)) - np.log(2)
        np.testing.assert_allclose(logits[rest].reshape(-1, 2), np.repeat(tail[:, None], 2, 1), atol=4e-3)
    reader.close()
