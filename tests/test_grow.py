"""A cache grows from K to more views: the first K kept bit for bit, the result equal to a dump in one go."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import TEACHER, make_image_folder, rows_done
from kdcache import teacher
from kdcache.audit import verify_cache
from kdcache.cache import CacheReader
from kdcache.config import DumpConfig, RunOptions
from kdcache.data import open_dataset
from kdcache.distributed import Dist
from kdcache.errors import CacheError
from kdcache.models import create_model, save_checkpoint
from kdcache.report import Progress

PER_VIEW = ("crops", "flips", "logits")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test teacher with fixed random weights for the 3 classes of the image folder."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(create_model(TEACHER, num_classes=3, img_size=32), path, {"arch": TEACHER, "num_classes": 3})
    return str(path)


def config(data: Path, out: Path, checkpoint: str, views: int, **kwargs) -> DumpConfig:
    run = RunOptions(data=str(data), img_size=32, batch_size=8, workers=0, device="cpu", seed=kwargs.pop("seed", 0))
    return DumpConfig(teacher=TEACHER, checkpoint=checkpoint, out=str(out), views=views, store="fp32", run=run,
                      **kwargs)


def arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as h5:
        return {name: h5[name][:] for name in (*PER_VIEW, "sample_ids", "labels", "content_hashes", "done")}


def assert_bit_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.slow
def test_growing_keeps_the_first_views_and_equals_a_dump_in_one_go(tmp_path: Path, checkpoint: str) -> None:
    image_folder = make_image_folder(tmp_path / "folder", train=4, test=1)
    out = tmp_path / "c.h5"
    teacher.dump(config(image_folder, out, checkpoint, views=2))
    before = arrays(out)
    summary = teacher.dump(config(image_folder, out, checkpoint, views=4))
    assert summary["records_dumped"] == 12 * 2  # only the new views ran through the teacher
    grown = arrays(out)
    for name in PER_VIEW:  # the first 2 views are the old file's bytes, untouched
        assert grown[name].shape[1] == 4 and grown[name][:, :2].tobytes() == before[name].tobytes(), name
    with h5py.File(out) as h5:
        assert h5.attrs["grown_from_views"] == 2 and h5.attrs["num_views"] == 4
    assert not out.with_name("c.h5.partial").exists()

    # Crops and flips derive from (seed, sample id, view); the logits are bit-equal too here (fp32 on CPU,
    # 8 crops per forward pass in both dumps: 2 images x 4 views in one go, 4 images x 2 views in the growth).
    one_go = tmp_path / "one_go.h5"
    teacher.dump(config(image_folder, one_go, checkpoint, views=4))
    assert_bit_equal(grown, arrays(one_go))
    result = verify_cache(str(out), str(image_folder), TEACHER, checkpoint, samples=16, device="cpu")
    assert result["ok"] and result["crop_mismatches"] == 0, result


def test_growth_is_refused_unless_only_the_views_differ(tmp_path: Path, image_folder: Path, checkpoint: str) -> None:
    out = tmp_path / "c.h5"
    teacher.dump(config(image_folder, out, checkpoint, views=2))
    before = out.read_bytes()
    with pytest.raises(CacheError, match=r"already exists; pass --force .*other settings: seed: 0 in the file, 1 now"):
        teacher.dump(config(image_folder, out, checkpoint, views=4, seed=1))
    with pytest.raises(CacheError, match=r"other settings: store: 'fp32' in the file, 'fp16' now"):
        teacher.dump(dataclasses.replace(config(image_folder, out, checkpoint, views=4), store="fp16"))
    with pytest.raises(CacheError, match="holds 2 views, more than --views 1, and a cache never shrinks"):
        teacher.dump(config(image_folder, out, checkpoint, views=1))
    with pytest.raises(CacheError, match=r"c\.h5 already exists; pass --force to overwrite it$"):
        teacher.dump(config(image_folder, out, checkpoint, views=2))
    # Under torchrun each rank would have to copy its rows into its part: refused, in one line.
    info = dataclasses.replace(CacheReader(out).info, num_views=4)
    train = open_dataset(str(image_folder), "train")
    with pytest.raises(CacheError, match="from 2 to 4 views runs in one process; run the same command without"):
        teacher._already_done(config(image_folder, out, checkpoint, views=4), info, train, Dist(0, 2), Progress())
    # Other images under the same settings (the fingerprint differs): named, not grown.
    other = make_image_folder(tmp_path / "other", train=9)
    with pytest.raises(CacheError, match="other settings: num_samples: 24 in the file, 27 now"):
        teacher.dump(config(other, out, checkpoint, views=4))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "folder", "other"]


def grow_command(data: Path, out: Path, checkpoint: str, views: int) -> list[str]:
    return [sys.executable, "-m", "kdcache", "dump-teacher", "--data", str(data), "--teacher", TEACHER,
            "--checkpoint", checkpoint, "--views", str(views), "--store", "fp32", "--img-size", "32", "--device",
            "cpu", "--workers", "0", "--batch-size", "2", "--out", str(out)]


@pytest.mark.slow
def test_sigkill_during_growth_then_rerun_equals_a_dump_in_one_go(tmp_path: Path, checkpoint: str) -> None:
    """kill -9 with about a quarter of the rows grown: OUT is still the complete 1-view cache; the rerun resumes."""
    data = make_image_folder(tmp_path / "folder", train=8, test=1)
    out = tmp_path / "c.h5"
    partial = out.with_name("c.h5.partial")
    dumps = {views: dataclasses.replace(config(data, out, checkpoint, views), run=dataclasses.replace(
        config(data, out, checkpoint, views).run, batch_size=2)) for views in (1, 2)}
    teacher.dump(dumps[1])
    before, first = out.read_bytes(), arrays(out)
    proc = subprocess.Popen(grow_command(data, out, checkpoint, 2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while rows_done(partial) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = rows_done(partial)
    assert 0 < done < 24, "the growth finished before it could be killed; the test needs a slower dump"
    assert out.read_bytes() == before  # the complete cache is never touched while it grows

    summary = teacher.dump(dumps[2])  # the same command again: it resumes
    assert summary["records_dumped"] == 24 - done and not partial.exists()
    grown = arrays(out)
    for name in PER_VIEW:
        assert grown[name][:, :1].tobytes() == first[name].tobytes(), name
    one_go = tmp_path / "one_go.h5"
    teacher.dump(dataclasses.replace(dumps[2], out=str(one_go)))
    # 2 crops per forward pass in both (2 images x 1 new view, 1 image x 2 views): logits bit-equal too. With
    # another number of crops per pass, CPU kernels round differently (about 1e-7 relative, well in tolerance).
    assert_bit_equal(grown, arrays(one_go))
