"""The cache file: round-trips for every store, validation, resume, worker reads."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from kdcache.cache import CacheInfo, CacheReader, CacheWriter, record_bytes, store_codec
from kdcache.errors import CacheError

N, K, C = 23, 3, 10


def info(store: str = "fp32", **over) -> CacheInfo:
    base = dict(num_samples=N, num_views=K, num_classes=C, seed=0, store=store, teacher="t", teacher_checkpoint="",
                teacher_checkpoint_sha256="", teacher_pretrained=False, input_size=32, mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.25, 0.25), interpolation="bilinear", crop_pct=0.875, crop_scale=(0.08, 1.0),
                crop_ratio=(0.75, 4 / 3), hflip=0.5, dataset_name="fake", dataset_split="train",
                dataset_fingerprint="abc", class_names=tuple(str(i) for i in range(C)))
    return CacheInfo(**{**base, **over})


def fake_records(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    top_left = rng.uniform(0.0, 0.5, (N, K, 2))
    size = rng.uniform(0.1, 0.5, (N, K, 2))
    return (np.concatenate([top_left, size], axis=-1).astype(np.float32), rng.random((N, K)) < 0.5,
            (rng.normal(0, 3, (N, K, C))).astype(np.float32))


def write_cache(path: Path, store: str = "fp32", rows: slice = slice(None), finish: bool = True, **over) -> Path:
    crops, flips, logits = fake_records()
    w = CacheWriter(path, info(store, **over), np.arange(N) * 7, np.arange(N) % C, np.arange(N, dtype=np.uint64))
    todo = w.pending_rows()[rows]
    for start in range(0, len(todo), 5):
        r = todo[start:start + 5]
        w.write(r, crops[r], flips[r], logits[r])
    if finish:
        w.finish()
    w.close()
    return path


@pytest.mark.parametrize("preload", [True, False])
@pytest.mark.parametrize("store", ["fp32", "fp16", "topk:3", f"topk:{C}"])
def test_round_trip_every_store(tmp_path: Path, store: str, preload: bool) -> None:
    crops, flips, logits = fake_records()
    reader = CacheReader(write_cache(tmp_path / "c.h5", store), preload=preload)
    rows = np.array([4, 0, 22, 4])
    for view in range(K):
        got_crops, got_flips, got = reader.read(rows, view)
        np.testing.assert_array_equal(got_crops, crops[rows, view])
        np.testing.assert_array_equal(got_flips, flips[rows, view])
        want = logits[rows, view]
        if store in ("fp32", f"topk:{C}"):
            np.testing.assert_allclose(got, want, rtol=1e-3 if store != "fp32" else 0, atol=2e-3 if store != "fp32" else 0)
        elif store == "fp16":
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        else:
            top = np.argsort(-want, axis=1)[:, :3]
            np.testing.assert_allclose(np.take_along_axis(got, top, 1), np.take_along_axis(want, top, 1), atol=1e-2)
            probs = np.exp(got - got.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            true = np.exp(want - want.max(1, keepdims=True))
            true /= true.sum(1, keepdims=True)
            rest = np.ones_like(want, dtype=bool)
            np.put_along_axis(rest, top, False, 1)
            # The kept classes keep their probability; the tail is flat and holds the rest.
            np.testing.assert_allclose(np.take_along_axis(probs, top, 1), np.take_along_axis(true, top, 1), rtol=5e-3)  # fp16 logits
            tail = probs[rest].reshape(len(rows), C - 3)
            np.testing.assert_allclose(tail, tail[:, :1].repeat(C - 3, 1), rtol=1e-5)


def test_record_bytes() -> None:
    assert record_bytes(info("fp32")) == C * 4 + 17
    assert record_bytes(info("fp16")) == C * 2 + 17
    assert record_bytes(info("topk:3")) == 3 * 2 + 3 * 2 + 4 + 17


def test_topk_expand_matches_compress_order() -> None:
    logits = np.array([[[5.0, 1.0, 3.0, -2.0]]], dtype=np.float32)
    codec = store_codec("topk:2")
    full = codec.decode(codec.encode(logits), 4)
    assert full[0, 0, 0] == pytest.approx(5.0, abs=1e-2) and full[0, 0, 2] == pytest.approx(3.0, abs=1e-2)
    assert full[0, 0, 1] == pytest.approx(full[0, 0, 3])


def test_version_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "c.h5")
    with h5py.File(path, "r+") as h5:
        h5.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="version 99.*reads versions 1 and 2; upgrade kdcache"):
        CacheReader(path)
    with h5py.File(path, "r+") as h5:
        h5.attrs["format_version"] = 0
    with pytest.raises(CacheError, match="version 0.*re-dump the teacher"):
        CacheReader(path)


def test_missing_incomplete_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="does not exist"):
        CacheReader(tmp_path / "nope.h5")
    write_cache(tmp_path / "half.h5", rows=slice(0, 10), finish=False)
    with pytest.raises(CacheError, match="half.h5.partial exists"):
        CacheReader(tmp_path / "half.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        CacheReader(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = 1
    with pytest.raises(CacheError, match="not a kdcache cache"):
        CacheReader(tmp_path / "other.h5")


def test_existing_cache_needs_force_and_force_overwrites_it(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "c.h5")
    with pytest.raises(CacheError, match="--force"):
        write_cache(path)
    crops, flips, logits = fake_records(seed=1)
    w = CacheWriter(path, info(seed=9), np.arange(N) * 7, np.arange(N) % C, np.arange(N, dtype=np.uint64), force=True)
    assert w.resumed_rows == 0
    w.write(np.arange(N), crops, flips, logits)
    w.finish()
    w.close()
    reader = CacheReader(path)
    assert reader.info == info(seed=9)
    for view in range(K):
        got_crops, got_flips, got = reader.read(np.arange(N), view)
        np.testing.assert_array_equal(got, logits[:, view])
        np.testing.assert_array_equal(got_crops, crops[:, view])
        np.testing.assert_array_equal(got_flips, flips[:, view])


def test_force_discards_a_partial_of_other_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    write_cache(path, rows=slice(0, 10), finish=False)
    crops, flips, logits = fake_records(seed=1)
    w = CacheWriter(path, info(seed=5), np.arange(N) * 7, np.arange(N) % C, np.arange(N, dtype=np.uint64), force=True)
    assert w.resumed_rows == 0 and list(w.pending_rows()) == list(range(N))
    w.write(np.arange(N), crops, flips, logits)
    w.finish()
    w.close()
    reader = CacheReader(path)
    assert reader.info.seed == 5
    np.testing.assert_array_equal(reader.read(np.arange(N), 2)[2], logits[:, 2])
    assert not path.with_name("c.h5.partial").exists()


@pytest.mark.parametrize("store", ["fp32", "fp16", "topk:1", "topk:3", f"topk:{C}"])
def test_store_codec_round_trip_error_bounds(store: str) -> None:
    """encode -> decode for every kind: exact (fp32), half-precision rounding (fp16), the kept classes' logits and
    probabilities and a flat tail holding the rest of the mass (top-k)."""
    codec = store_codec(store, C)
    logits = fake_records()[2]
    arrays = codec.encode(logits)
    per_record = sum(a.dtype.itemsize * int(np.prod(a.shape[2:], dtype=np.int64)) for a in arrays.values())
    assert per_record == codec.record_bytes(C)
    assert {k: (a.shape[2:], a.dtype) for k, a in arrays.items()} == codec.datasets(C)
    got = codec.decode(arrays, C)
    assert got.dtype == np.float32 and got.shape == logits.shape
    if codec.classes_kept is None:
        bound = 0.0 if store == "fp32" else 2.0**-11  # fp16: round to nearest, 11 significant bits
        assert np.all(np.abs(got - logits) <= bound * np.abs(logits))
        return
    k = codec.classes_kept
    top = np.argsort(-logits, axis=-1)[..., :k]
    kept, want = np.take_along_axis(got, top, -1), np.take_along_axis(logits, top, -1)
    assert np.all(np.abs(kept - want) <= 2.0**-11 * np.abs(want))
    probs = np.exp(got - got.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    true = np.exp(logits - logits.max(-1, keepdims=True))
    true /= true.sum(-1, keepdims=True)
    # Each kept logit moves by at most delta, so each kept probability by at most a factor exp(+-2 delta).
    delta = 2.0**-11 * np.abs(want).max(-1, keepdims=True)
    p_kept, p_true = np.take_along_axis(probs, top, -1), np.take_along_axis(true, top, -1)
    assert np.all(np.abs(p_kept - p_true) <= (np.exp(2 * delta) - 1) * p_true + 1e-7)
    if k < C:
        rest = np.ones(logits.shape, dtype=bool)
        np.put_along_axis(rest, top, False, -1)
        tail = probs[rest].reshape(logits.shape[:-1] + (C - k,))
        np.testing.assert_allclose(tail, tail[..., :1].repeat(C - k, -1), rtol=1e-5)
        np.testing.assert_allclose(tail.sum(-1), 1 - np.take_along_axis(true, top, -1).sum(-1), atol=3e-3)


def test_store_codec_syntax() -> None:
    assert [store_codec(s).store for s in ("fp16", "fp32", "topk:7")] == ["fp16", "fp32", "topk:7"]
    assert [store_codec(s).tolerance for s in ("fp32", "fp16", "topk:7")] == [1e-3, 2e-2, 2e-2]
    assert store_codec("topk:10", 10).classes_kept == 10
    for bad in ("fp8", "topk:", "topk:0", "topk:-1", "topk:x", "", "FP16"):
        with pytest.raises(CacheError, match="--store must be fp16, fp32 or topk:K with K >= 1"):
            store_codec(bad)
    with pytest.raises(CacheError, match="--store topk:11 keeps more classes than the teacher has \\(10\\)"):
        store_codec("topk:11", 10)


def test_resume_continues_and_refuses_other_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    write_cache(path, rows=slice(0, 10), finish=False)
    with pytest.raises(CacheError, match="different settings.*seed"):
        write_cache(path, seed=5)
    w = CacheWriter(path, info(), np.arange(N) * 7, np.arange(N) % C, np.arange(N, dtype=np.uint64))
    assert w.resumed_rows == 10 and list(w.pending_rows()) == list(range(10, N))
    w.close()
    w.close()
    write_cache(path)  # finishes the remaining rows
    crops, flips, logits = fake_records()
    reader = CacheReader(path)
    np.testing.assert_array_equal(reader.read(np.arange(N), 1)[2], logits[:, 1])


class ReadInWorkers(Dataset):
    def __init__(self, reader: CacheReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> np.ndarray:
        return self.reader.read(np.array([i]), i % K)[2][0]


@pytest.mark.parametrize("preload", [True, False])
def test_reader_opens_lazily_in_workers(tmp_path: Path, preload: bool) -> None:
    reader = CacheReader(write_cache(tmp_path / "c.h5"), preload=preload)
    reader.read(np.array([0]), 0)  # the parent has an open handle before the fork
    got = np.concatenate([b.numpy() for b in DataLoader(ReadInWorkers(reader), batch_size=4, num_workers=2)])
    logits = fake_records()[2]
    np.testing.assert_array_equal(got, logits[np.arange(N), np.arange(N) % K])


def test_truncated_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "c.h5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="not a readable HDF5 file") as e:
        CacheReader(path)
    assert "\n" not in str(e.value)
