"""The dump: writes in a background thread, one writer per file, checks before any file, merges that finish.

Reliability gaps of issue 10 covered here: 4 (a changed BMP is refused from the CLI), 5 (two dumps to one
--out), 8 (a merge killed after its rename), 9 (--img-size the teacher cannot take, --out where no file can be
made) and 10 (a rejected --store leaves no file); part 6 (the background writer keeps the dump's promises).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import STUDENT, TEACHER, make_image_folder, rows_done
from kdcache import parts, teacher
from kdcache.background import BackgroundWriter
from kdcache.cache import CacheReader, CacheWriter
from kdcache.cli import main
from kdcache.config import DumpConfig, RunOptions
from kdcache.data import open_dataset
from kdcache.distributed import Dist
from kdcache.errors import CacheError, KdcacheError
from kdcache.lock import lock_path
from kdcache.report import Progress
from kdcache.teacher import dump

WRITER_THREAD = "kdcache-cache-writer"


def config(data: str, out: Path, checkpoint: str | None = None, **kwargs) -> DumpConfig:
    run = RunOptions(data=data, img_size=32, batch_size=kwargs.pop("batch_size", 8), workers=0, device="cpu",
                     seed=kwargs.pop("seed", 0))
    return DumpConfig(teacher=TEACHER, checkpoint=checkpoint, out=str(out), views=2, store="fp32", run=run, **kwargs)


def same_datasets(a: Path, b: Path) -> None:
    with h5py.File(a) as x, h5py.File(b) as y:
        assert set(x) == set(y)
        for name in x:
            assert x[name][:].tobytes() == y[name][:].tobytes(), name


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WRITER_THREAD]


# The background writer, on a fake cache writer.

class FakeWriter:
    def __init__(self, fail_on: int | None = None, gate: threading.Event | None = None) -> None:
        self.written: list[int] = []
        self.calls = 0
        self.fail_on, self.gate = fail_on, gate

    def write(self, rows, crops, flips, logits) -> None:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.calls == self.fail_on:
            raise CacheError("writing c.h5.partial failed: the disk is full (no space left on device)")
        self.written.append(int(rows[0]))


def batch(i: int) -> tuple:
    return np.array([i]), np.zeros((1, 2, 4)), np.zeros((1, 2)), np.zeros((1, 2, 3))


def test_background_writer_writes_in_order_and_joins() -> None:
    fake = FakeWriter()
    background = BackgroundWriter(fake, depth=2)
    for i in range(20):
        background.put(*batch(i))
    background.close()
    assert fake.written == list(range(20)) and not writer_threads()


def test_a_failed_write_surfaces_at_the_next_put_and_never_deadlocks() -> None:
    fake = FakeWriter(fail_on=1)
    background = BackgroundWriter(fake, depth=2)
    background.put(*batch(0))
    deadline = time.time() + 10
    while background._error is None and time.time() < deadline:  # the thread has failed, nothing else happened
        time.sleep(0.01)
    with pytest.raises(CacheError, match="disk is full"):
        background.put(*batch(1))
    background.abort()  # what the dump does on any error
    assert not writer_threads()

    # A producer that keeps putting into a small queue after the writer failed gets the error, not a hang.
    fake = FakeWriter(fail_on=1)
    background = BackgroundWriter(fake, depth=1)
    raised: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(100):
                background.put(*batch(i))
            background.close()
        except CacheError as e:
            raised.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    producer.join(10)
    assert not producer.is_alive(), "put() or close() blocked after the writer thread failed"
    assert len(raised) == 1 and "disk is full" in str(raised[0]) and fake.written == []
    background.abort()
    assert not writer_threads()


def test_abort_stores_what_is_queued_and_stops_the_thread() -> None:
    gate = threading.Event()
    fake = FakeWriter(gate=gate)
    background = BackgroundWriter(fake, depth=4)
    for i in range(3):
        background.put(*batch(i))
    gate.set()
    background.abort()  # the dump failed after computing 3 batches: they are still stored
    assert fake.written == [0, 1, 2] and not writer_threads()
    with pytest.raises(RuntimeError):
        background.put(*batch(3))


# A real dump that fails mid-way leaves a partial that resumes to the uninterrupted cache.

@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "folder")


def clean_cache(folder: Path, tmp: Path) -> Path:
    """The uninterrupted dump of `folder`: 24 images, 2 views, fp32, the teacher's random weights of seed 0."""
    out = tmp / "clean.h5"
    if not out.exists():
        dump(config(str(folder), out))
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Path:
    return clean_cache(folder, tmp_path_factory.mktemp("clean"))


@pytest.mark.parametrize("fault", ["write", "nan", "interrupt"])
def test_a_dump_stopped_mid_way_resumes_to_the_same_cache(tmp_path: Path, folder: Path, clean: Path,
                                                          monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """24 images, 4 per batch (2 views each): the third batch fails; the first two are stored, not more."""
    out = tmp_path / "c.h5"
    calls = {"n": 0}
    progress = None
    if fault == "write":
        write_stored = CacheWriter.write_stored

        def failing(self, rows, arrays):
            calls["n"] += 1
            if calls["n"] == 3:
                raise CacheError(f"writing {self.partial} failed: the disk is full (no space left on device)")
            return write_stored(self, rows, arrays)

        monkeypatch.setattr(CacheWriter, "write_stored", failing)
        expected = pytest.raises(CacheError, match="disk is full")
    elif fault == "nan":
        outputs = teacher.teacher_outputs  # logits and any features, from one forward

        def poisoned(*args, **kwargs):
            calls["n"] += 1  # call 1 is the blank forward pass that checks the input size
            result, features = outputs(*args, **kwargs)
            return (result * float("nan") if calls["n"] == 4 else result), features

        monkeypatch.setattr(teacher, "teacher_outputs", poisoned)
        expected = pytest.raises(CacheError, match="NaN or Inf")
    else:
        class Interrupting(Progress):
            def update(self, advance: int, **fields) -> None:
                calls["n"] += 1  # after the batch is handed to the writer
                if calls["n"] == 2:
                    raise KeyboardInterrupt

        progress = Interrupting()
        expected = pytest.raises(KeyboardInterrupt)
    with expected:
        dump(config(str(folder), out), progress)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and rows_done(partial) == 8 and not writer_threads()
    assert not lock_path(out).exists()
    monkeypatch.undo()
    resumed = dump(config(str(folder), out))
    assert resumed["records_dumped"] == (24 - 8) * 2
    same_datasets(out, clean)


# Checks before any file.

def test_a_store_that_cannot_fit_leaves_no_file(tmp_path: Path, folder: Path) -> None:
    out = tmp_path / "sub" / "c.h5"
    with pytest.raises(CacheError, match=r"--store topk:100000 keeps more classes than the teacher has \(3\)"):
        dump(dataclasses.replace(config(str(folder), out), store="topk:100000"))
    assert list(tmp_path.iterdir()) == []
    # The corrected command is not blocked by anything the rejected one left.
    result = dump(dataclasses.replace(config(str(folder), out), store="topk:2"))
    assert result["records_dumped"] == 24 * 2 and sorted(p.name for p in out.parent.iterdir()) == ["c.h5"]


def test_an_input_size_the_teacher_cannot_take_is_one_line_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "c.h5"
    with pytest.raises(KdcacheError) as caught:
        dump(DumpConfig(teacher="convnext_atto", out=str(out), views=2,
                        run=RunOptions(data="digits", img_size=16, workers=0, device="cpu")))
    message = str(caught.value)
    assert message.startswith("teacher convnext_atto cannot take --img-size 16 inputs: ") and "\n" not in message
    assert "Kernel size can't be greater than actual input size" in message
    assert list(tmp_path.iterdir()) == []


# Merges: several blocks, interrupted and resumed; killed after the rename.

def make_parts(cache: Path, out: Path, world_size: int) -> None:
    """The part files a `world_size`-process dump of `cache`'s settings leaves before its merge."""
    reader = CacheReader(cache, preload=True)
    n = reader.info.num_samples
    for rank in range(world_size):
        rows = np.arange(rank, n, world_size)
        writer = CacheWriter(parts.part_path(out, rank, world_size), parts.part_info(reader.info, rows),
                             reader.sample_ids[rows], reader.labels[rows], reader.content_hashes[rows],
                             extra_attrs=parts.part_attrs(rank, world_size))
        names = ("crops", "flips") + reader.target_names
        writer.write_stored(np.arange(len(rows)), {name: reader.stored(name, 0, n)[rows] for name in names})
        writer.finish()
        writer.close()
    reader.close()


def merge(cache: Path, out: Path, world_size: int) -> Path:
    reader = CacheReader(cache, preload=False)
    try:
        return parts.merge_parts(out, reader.info, reader.sample_ids, reader.labels, reader.content_hashes,
                                 world_size)
    finally:
        reader.close()


def test_a_merge_of_several_blocks_resumes_bit_for_bit(tmp_path: Path, clean: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c.h5"
    make_parts(clean, out, 3)
    row_bytes = CacheReader(clean).info.num_views * parts.record_bytes(CacheReader(clean).info)
    monkeypatch.setattr(parts, "_MERGE_BLOCK_BYTES", 6 * row_bytes)  # 24 rows in 4 blocks of 6
    write_stored = CacheWriter.write_stored
    blocks: list[list[int]] = []

    def dies_at_the_second_block(self, rows, arrays):
        blocks.append(rows.tolist())
        if len(blocks) == 2:
            raise CacheError("killed")
        return write_stored(self, rows, arrays)

    monkeypatch.setattr(CacheWriter, "write_stored", dies_at_the_second_block)
    with pytest.raises(CacheError, match="killed"):
        merge(clean, out, 3)
    assert rows_done(out.with_name("c.h5.partial")) == 6 and len(parts.leftover_parts(out)) == 3

    monkeypatch.setattr(CacheWriter, "write_stored", write_stored)
    resumed = []
    monkeypatch.setattr(CacheWriter, "write_stored", lambda self, rows, arrays: (
        resumed.append(rows.tolist()), write_stored(self, rows, arrays))[1])
    merge(clean, out, 3)
    assert resumed == [list(range(6, 12)), list(range(12, 18)), list(range(18, 24))], "the done block is skipped"
    same_datasets(out, clean)
    assert parts.leftover_parts(out) == []


def test_a_rerun_finishes_a_merge_killed_after_its_rename(tmp_path: Path, folder: Path, clean: Path) -> None:
    out = tmp_path / "c.h5"
    make_parts(clean, out, 2)
    kept = tmp_path / "kept"
    kept.mkdir()
    for part in parts.leftover_parts(out):
        shutil.copy(part, kept / part.name)
    merge(clean, out, 2)
    for part in kept.iterdir():  # killed after the rename, before the parts were deleted
        shutil.copy(part, tmp_path / part.name)
    before = out.read_bytes()

    # Other settings: OUT is not this dump's; refused, and the parts stay.
    other = CliRunner().invoke(main, ["dump-teacher", "--data", str(folder), "--teacher", TEACHER, "--views", "2",
                                      "--store", "fp32", "--img-size", "32", "--device", "cpu", "--workers", "0",
                                      "--seed", "1", "--out", str(out)])
    assert other.exit_code == 1 and "already exists; pass --force" in other.output
    assert len(parts.leftover_parts(out)) == 2

    # The same command: nothing to dump, the parts go, and the CLI writes OUT's config JSON.
    again = CliRunner().invoke(main, ["dump-teacher", "--data", str(folder), "--teacher", TEACHER, "--views", "2",
                                      "--store", "fp32", "--img-size", "32", "--device", "cpu", "--workers", "0",
                                      "--batch-size", "8", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert parts.leftover_parts(out) == [] and out.read_bytes() == before
    assert (tmp_path / "c.h5.config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "c.h5.config.json", "kept"]

    # Under torchrun the rule holds with or without parts left: a complete OUT of these settings is done.
    info = CacheReader(clean).info
    train = open_dataset(str(folder), "train")
    for rank in (0, 1):
        summary = teacher._already_done(config(str(folder), out), info, train, Dist(rank, 2), Progress())
        assert summary["records_dumped"] == 0 and summary["processes"] == 2
    with pytest.raises(CacheError, match="already exists; pass --force"):
        teacher._already_done(config(str(folder), out, seed=1), dataclasses.replace(info, seed=1), train,
                              Dist(0, 2), Progress())


# A changed image in the middle of a large file (gap 4), end to end.

def test_a_cache_of_a_changed_bmp_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "bmp"
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(2):
            path = root / "train" / f"class{c}" / f"{i}.bmp"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(path)
            (root / "test" / f"class{c}").mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / "test" / f"class{c}" / f"{i}.bmp")
    cache = tmp_path / "c.h5"
    common = ["--data", str(root), "--img-size", "32", "--device", "cpu", "--workers", "0"]
    dumped = CliRunner().invoke(main, ["dump-teacher", "--teacher", TEACHER, "--views", "1", "--out", str(cache),
                                       *common])
    assert dumped.exit_code == 0, dumped.output
    target = root / "train" / "class1" / "0.bmp"
    size = target.stat().st_size
    pixels = np.array(Image.open(target))
    pixels[100:200] = 0
    Image.fromarray(pixels).save(target)
    assert target.stat().st_size == size
    trained = CliRunner().invoke(main, ["train-student", "--model", STUDENT, "--epochs", "1", "--cached", str(cache),
                                        "--out", str(tmp_path / "run"), *common])
    assert trained.exit_code == 1
    assert "1 images changed since the dump, first" in trained.output and "class1/0.bmp" in trained.output
