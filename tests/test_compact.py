"""Compact caches (format version 2): no stored crops or flips, top-k's log-sum-exp in float16, a crop witness."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import STUDENT, TEACHER, make_image_folder
from kdcache import augment, parts
from kdcache.audit import inspect_cache, kl_per_record, verify_cache
from kdcache.cache import CacheReader, CacheWriter, record_bytes, store_codec
from kdcache.cache import reader as reader_module
from kdcache.cli import main
from kdcache.config import DumpConfig, OptimOptions, RunOptions, TrainConfig
from kdcache.data import open_dataset
from kdcache.errors import CacheError
from kdcache.targets import check_cache_fits, check_caches_agree
from kdcache.teacher import dump, witness_of
from kdcache.train import fit

RUN = RunOptions(img_size=32, batch_size=8, workers=0, device="cpu", seed=5)
PER_RECORD = ("topk_values", "topk_indices")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 classes (room for topk:5) of 3 images of 40x48 px."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "folder", classes=8, train=3, test=1)


def dump_to(folder: Path, out: Path, compact: bool, views: int = 2, **kwargs) -> Path:
    run = dataclasses.replace(RUN, data=str(folder))
    dump(DumpConfig(teacher=TEACHER, out=str(out), views=views, store="topk:5", compact=compact, run=run, **kwargs))
    return out


@pytest.fixture(scope="module")
def caches(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(stored crops, compact) caches of the same dump settings."""
    tmp = tmp_path_factory.mktemp("caches")
    return dump_to(folder, tmp / "stored.h5", False), dump_to(folder, tmp / "compact.h5", True)


def copy_of(path: Path, out: Path) -> Path:
    out.write_bytes(path.read_bytes())
    return out


def test_a_compact_cache_stores_no_crops_and_is_version_2(caches: tuple[Path, Path]) -> None:
    stored, compact = caches
    with h5py.File(compact) as h5:
        assert h5.attrs["format_version"] == 2 and h5.attrs["compact"] is np.True_
        assert "crops" not in h5 and "flips" not in h5 and "logsumexp" not in h5
        assert h5["tail_logsumexp_gap"].shape == (24, 2) and h5["tail_logsumexp_gap"].dtype == np.float16
        assert h5["witness_ids"].shape == (24,) and h5["witness_crops"].shape == (24, 4)  # min(64, N) records
    with h5py.File(stored) as h5:
        assert h5.attrs["format_version"] == 1 and h5.attrs["compact"] is np.False_
    reader = CacheReader(compact)
    assert record_bytes(reader.info) == 5 * 2 + 5 * 2 + 2  # 22 bytes per (image, view); TinyViT's record is 24
    assert record_bytes(CacheReader(stored).info) == 5 * 2 + 5 * 2 + 4 + 16 + 1
    assert reader.record_names == ("topk_values", "topk_indices", "tail_logsumexp_gap")


def test_derived_crops_equal_the_stored_ones_bit_for_bit(caches: tuple[Path, Path]) -> None:
    stored, compact = CacheReader(caches[0]), CacheReader(caches[1])
    rows = np.array([7, 0, 23, 7])
    for view in range(2):
        boxes, flips, logits = stored.read(rows, view)
        derived, derived_flips, compact_logits = compact.read(rows, view, [(40, 48)] * len(rows))
        assert derived.tobytes() == boxes.tobytes() and np.array_equal(derived_flips, flips)
        assert np.array_equal(np.argsort(-logits, 1)[:, :5], np.argsort(-compact_logits, 1)[:, :5])
    for name in PER_RECORD:  # the kept logits and classes are the same bytes; only the log-sum-exp's form differs
        assert stored.stored(name, 0, 24).tobytes() == compact.stored(name, 0, 24).tobytes()
    with pytest.raises(ValueError, match="compact cache: read\\(\\) needs the \\(height, width\\)"):
        compact.read(rows, 0)


def test_the_float16_tail_log_sum_exp_keeps_the_tail_mass_to_its_rounding() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2000, 100)).astype(np.float32)
    logits[np.arange(2000), rng.integers(0, 100, 2000)] += rng.uniform(0, 25, 2000).astype(np.float32)
    compact, full = store_codec("topk:5", 100, compact=True), store_codec("topk:5", 100)
    arrays = compact.encode(logits)
    kept = np.argsort(-logits, 1)[:, :5]
    tail = logits.astype(np.float64)
    np.put_along_axis(tail, kept, -np.inf, 1)
    peak = tail.max(1)
    exact = peak + np.log(np.exp(tail - peak[:, None]).sum(1))  # the tail's log-sum-exp, in float64
    top = arrays["topk_values"][:, 0].astype(np.float64)
    gap = arrays["tail_logsumexp_gap"].astype(np.float64)
    assert (gap <= np.log(95) * (1 + 2.0**-11)).all() and gap.min() < -20  # confident records have a tiny tail
    # The only loss is the gap's own float16 rounding: half a step, at most 2^-11 of the gap.
    assert (np.abs(top + gap - exact) <= 2.0**-11 * np.abs(exact - top) + 1e-9).all()
    decoded = compact.decode(arrays, 100)
    tail_logit = np.delete(decoded, kept[0], axis=1)[0]
    assert np.all(tail_logit == np.float32(top[0]) + np.float32(gap[0]) - np.float32(np.log(95)))
    # The tail's mass from its own number beats 1 - (the kept mass) of the float32 log-sum-exp.
    kl_compact = kl_per_record(logits, decoded, 4.0).mean()
    kl_full = kl_per_record(logits, full.decode(full.encode(logits), 100), 4.0).mean()
    assert kl_compact < kl_full / 2, (kl_compact, kl_full)
    lse = compact.logsumexp(arrays, 100).astype(np.float64)
    assert np.abs(lse - full.logsumexp(full.encode(logits), 100)).max() < 0.02  # the float16 kept logits' rounding


@pytest.mark.slow
def test_training_from_a_compact_cache_equals_the_stored_one_per_step(caches: tuple[Path, Path], folder: Path,
                                                                        tmp_path: Path) -> None:
    run = dataclasses.replace(RUN, data=str(folder))
    optim = OptimOptions(opt="adamw", lr=1e-3, weight_decay=0.0, sched="cosine")
    losses = {}
    for name, cache in zip(("stored", "compact"), caches):
        steps: list[float] = []
        fit(TrainConfig(model=STUDENT, out=str(tmp_path / name), run=run, optim=optim, epochs=2, cached=str(cache)),
            on_step=lambda s: steps.append(s.loss))
        losses[name] = np.array(steps)
    assert len(losses["stored"]) == len(losses["compact"]) == 6
    # Same crops (bit for bit), same float16 kept logits; only the flat tail logit differs: from the tail's own
    # float16 log-sum-exp instead of 1 - (the kept mass). That moved the steps' losses by at most 6.3e-6
    # (relative) when this test was written; 3e-5 leaves room for another machine's rounding.
    relative = np.abs(losses["compact"] - losses["stored"]) / losses["stored"]
    assert relative.max() < 3e-5, relative


def test_cache_replay_of_a_compact_cache_gives_the_stored_caches_crops(caches: tuple[Path, Path],
                                                                        folder: Path) -> None:
    from kdcache.replay import CacheReplay

    stored, compact = (CacheReplay(path, str(folder)) for path in caches)
    for epoch in (0, 1):
        a, b = stored.__getitems__([(r, epoch) for r in (3, 17, 9)]), compact.__getitems__([(r, epoch) for r in (3, 17, 9)])
        assert torch.equal(a["images"], b["images"]) and a["views"] == b["views"] == [epoch]
        assert torch.equal(a["teacher_logits"].argmax(1), b["teacher_logits"].argmax(1))


def test_a_tampered_witness_is_one_line(caches: tuple[Path, Path], tmp_path: Path) -> None:
    path = copy_of(caches[1], tmp_path / "tampered.h5")
    with h5py.File(path, "r+") as h5:
        box = h5["witness_crops"][3]
        box[1] = np.nextafter(box[1], np.float32(1))  # one bit of one coordinate
        h5["witness_crops"][3] = box
    with pytest.raises(CacheError) as e:
        CacheReader(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: this kdcache derives other crops than the dump")
    assert message.endswith("kdcache 0.1.0 wrote it, so its witness is damaged; dump it again")


def test_a_changed_crop_sampler_refuses_the_cache(caches: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    CacheReader(caches[0])  # a cache that stores its crops does not depend on the sampler
    sample_crop = augment.sample_crop

    def shifted(rng, height, width, ranges):
        box, flip = sample_crop(rng, height, width, ranges)
        return box * np.float32(0.5), flip

    monkeypatch.setattr(augment, "sample_crop", shifted)
    monkeypatch.setattr(reader_module, "__version__", "0.3.0")  # as if a later kdcache sampled crops differently
    CacheReader(caches[0])
    with pytest.raises(CacheError, match=r"derives other crops than the dump of this compact cache did \(sample id") as e:
        CacheReader(caches[1])
    assert str(e.value).endswith("; read it with kdcache 0.1.0, which wrote it, or dump it again")


def test_an_image_of_another_size_is_refused_where_the_data_is_at_hand(caches: tuple[Path, Path], folder: Path,
                                                                       tmp_path: Path) -> None:
    path = copy_of(caches[1], tmp_path / "sizes.h5")
    with h5py.File(path, "r+") as h5:  # as if the dump had decoded another size: witness of a 40x40 image
        sizes = h5["witness_sizes"][...]
        info = CacheReader(caches[1]).info
        sizes[0] = (40, 40)
        h5["witness_sizes"][...] = sizes
        rng = augment.view_rng(info.seed, int(h5["witness_ids"][0]), int(h5["witness_views"][0]))
        box, flip = augment.sample_crop(rng, 40, 40, CacheReader(caches[1]).ranges)
        h5["witness_crops"][0] = box
        h5["witness_flips"][0] = flip
    reader = CacheReader(path)  # consistent on its own
    with pytest.raises(CacheError, match=r"decodes to 40x48 pixels, 40x40 when the compact cache was dumped"):
        check_cache_fits(reader, open_dataset(str(folder), "train"))


def test_a_compact_cache_and_a_stored_one_form_an_ensemble(caches: tuple[Path, Path], tmp_path: Path) -> None:
    check_caches_agree([CacheReader(caches[0]), CacheReader(caches[1])])
    check_caches_agree([CacheReader(caches[1]), CacheReader(caches[0])])
    other = copy_of(caches[0], tmp_path / "other.h5")
    with h5py.File(caches[1]) as h5:
        sid, view = int(h5["witness_ids"][0]), int(h5["witness_views"][0])
    with h5py.File(other, "r+") as h5:
        row = int(np.flatnonzero(h5["sample_ids"][...] == sid)[0])
        h5["crops"][row, view] = h5["crops"][row, view] * np.float32(0.5)
    with pytest.raises(CacheError, match=f"their crops differ at sample id {sid} view {view}"):
        check_caches_agree([CacheReader(caches[1]), CacheReader(other)])


def test_inspect_and_verify_a_compact_cache(caches: tuple[Path, Path], folder: Path) -> None:
    summary = inspect_cache(str(caches[1]))
    assert summary["ok"] and summary["format_version"] == 2 and summary["bytes_per_record"] == 22
    assert summary["crops"].startswith("derived from (seed, sample id, view) (compact; 24 witness records")
    assert inspect_cache(str(caches[0]))["per_view"][0]["top1"] == summary["per_view"][0]["top1"]
    result = verify_cache(str(caches[1]), str(folder), TEACHER, None, samples=16, device="cpu")
    assert result["ok"] and result["crop_mismatches"] == 0 and result["compared"] == 16, result


@pytest.mark.slow
def test_a_compact_cache_grows_like_a_dump_in_one_go(folder: Path, tmp_path: Path) -> None:
    out = dump_to(folder, tmp_path / "grown.h5", True, views=1)
    with h5py.File(out) as h5:
        first = {name: h5[name][...] for name in ("topk_values", "topk_indices", "tail_logsumexp_gap")}
    with pytest.raises(CacheError, match="compact: True in the file, False now"):
        dump_to(folder, out, False, views=2)
    dump_to(folder, out, True, views=2)
    one_go = dump_to(folder, tmp_path / "one_go.h5", True, views=2)
    with h5py.File(out) as grown, h5py.File(one_go) as whole:
        assert grown.attrs["grown_from_views"] == 1 and grown.attrs["format_version"] == 2
        for name, before in first.items():
            assert grown[name][:, :1].tobytes() == before.tobytes(), name
            assert grown[name][...].tobytes() == whole[name][...].tobytes(), name
        for name in ("witness_ids", "witness_views", "witness_sizes", "witness_crops", "witness_flips"):
            assert grown[name][...].tobytes() == whole[name][...].tobytes(), name


def test_compact_parts_merge_into_the_one_process_cache(caches: tuple[Path, Path], folder: Path,
                                                        tmp_path: Path) -> None:
    whole = CacheReader(caches[1], preload=True)
    train = open_dataset(str(folder), "train")
    n, out = whole.info.num_samples, tmp_path / "merged.h5"
    for rank in range(2):
        rows = np.arange(rank, n, 2)
        info = parts.part_info(whole.info, rows)
        writer = CacheWriter(parts.part_path(out, rank, 2), info, train.ids[rows], train.labels[rows],
                             train.content_hashes[rows], extra_attrs=parts.part_attrs(rank, 2),
                             witness=witness_of(info, train, rows))
        writer.write_stored(np.arange(len(rows)), {name: whole.stored(name, 0, n)[rows] for name in whole.record_names})
        writer.finish()
        writer.close()
    parts.merge_parts(out, whole.info, train.ids, train.labels, train.content_hashes, 2,
                      witness=witness_of(whole.info, train))
    merged = CacheReader(out)
    for name in whole.record_names + tuple(whole.witness):
        assert merged.stored(name, 0, None if name.startswith("witness") else n).tobytes() == \
            whole.stored(name, 0, None if name.startswith("witness") else n).tobytes(), name
    with pytest.raises(CacheError, match="the crop witness of a compact cache is wrong"):
        CacheWriter(tmp_path / "none.h5", whole.info, train.ids, train.labels, train.content_hashes)


@pytest.mark.slow
def test_the_cli_dumps_a_compact_cache_and_trains_from_it(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c.h5"
    common = ["--data", str(folder), "--img-size", "32", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(main, ["dump-teacher", "--teacher", TEACHER, "--views", "2", "--store", "topk:5",
                                       "--compact", "--out", str(cache), *common])
    assert result.exit_code == 0, result.output
    assert CacheReader(cache).info.compact
    result = CliRunner().invoke(main, ["train-student", "--model", STUDENT, "--epochs", "1", "--cached", str(cache),
                                       "--batch-size", "8", "--out", str(tmp_path / "student"), *common])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["inspect", str(cache), "--json"])
    assert result.exit_code == 0 and '"format_version": 2' in result.output
