"""inspect and verify: they name invalid records, print valid JSON, and agree with the dump on a teacher's weights."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result

from conftest import TEACHER
from kdcache.audit import inspect_cache, require_ok, verify_cache
from kdcache.cli import main
from kdcache.errors import CacheError
from test_cache import write_cache

pytestmark = pytest.mark.slow


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def dump(image_folder: Path, out: Path, store: str = "fp32") -> Path:
    """A dump by a teacher without weights (no --checkpoint): the dump seeds them with --seed."""
    result = invoke("dump-teacher", "--data", image_folder, "--teacher", TEACHER, "--views", 2, "--img-size", 32,
                    "--device", "cpu", "--workers", 0, "--seed", 5, "--store", store, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_verify_a_teacher_without_weights(image_folder: Path, tmp_path: Path) -> None:
    """Gap 12: verify builds the teacher the way the dump did, so a random-weight teacher verifies."""
    cache = dump(image_folder, tmp_path / "c.h5")
    result = verify_cache(str(cache), str(image_folder), TEACHER, None, samples=16, device="cpu")
    assert result["ok"] and result["compared"] == 16 and result["max_rel_logit_diff"] <= 1e-3, result
    assert invoke("verify", cache, "--data", image_folder, "--teacher", TEACHER, "--samples", 8,
                  "--device", "cpu").exit_code == 0


@pytest.mark.parametrize("store", ["fp16", "topk:2"])
def test_non_finite_logits_fail_verify_and_show_in_inspect(image_folder: Path, tmp_path: Path, store: str) -> None:
    """Gap 1: one Inf and one NaN record; verify fails naming one even when it samples neither."""
    cache = dump(image_folder, tmp_path / "c.h5", store)
    name = "logits" if store == "fp16" else "topk_values"
    with h5py.File(cache, "r+") as h5:
        h5[name][3, 1, 0] = np.inf
        h5[name][10, 0, 1] = np.nan
    result = verify_cache(str(cache), str(image_folder), TEACHER, None, samples=1, seed=0, device="cpu")
    assert not result["ok"] and result["bad_records"] == 2
    assert result["first_bad_record"].startswith("row 3 (sample id ") and "view 1: " in result["first_bad_record"]
    with pytest.raises(CacheError, match="verify failed: 2 stored records are invalid \\(first: row 3 "):
        require_ok(result)
    failed = invoke("verify", cache, "--data", image_folder, "--teacher", TEACHER, "--samples", 4, "--device", "cpu")
    assert failed.exit_code == 1 and "2 stored records are invalid" in failed.output

    summary = inspect_cache(str(cache))
    assert not summary["ok"] and summary["bad_records"] == 2
    assert [b.split(":")[0].split(" (")[0] + b.split(")")[1].split(":")[0] for b in summary["first_bad_records"]] == \
        ["row 3 view 1", "row 10 view 0"]
    json.dumps(summary, allow_nan=False)  # no NaN or Inf anywhere
    # The statistics leave the bad records out: view 1 of 24 images has 23 valid ones.
    assert all(v["top1"] is not None and np.isfinite(v["entropy"]) for v in summary["per_view"])

    printed = invoke("inspect", cache, "--json")
    parsed = json.loads(printed.stdout, parse_constant=lambda c: pytest.fail(f"inspect printed {c}"))
    assert parsed["bad_records"] == 2 and parsed["ok"] is False
    assert printed.exit_code == 1
    table = invoke("inspect", cache)
    assert table.exit_code == 1 and "2 damaged records (first: row 3 (sample id " in table.output


def test_inspect_statistics_are_the_stored_logits(tmp_path: Path) -> None:
    """inspect's per-view figures, recomputed from the values the test wrote."""
    from test_cache import K, fake_records

    cache = write_cache(tmp_path / "c.h5", "fp32")
    summary = inspect_cache(str(cache))
    _, _, logits = fake_records()
    labels = np.arange(len(logits)) % logits.shape[-1]
    assert summary["ok"] and summary["bad_records"] == 0 and summary["first_bad_records"] == []
    for view in range(K):
        z = logits[:, view].astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        got = summary["per_view"][view]
        assert got["top1"] == pytest.approx(100 * np.mean(z.argmax(1) == labels))
        assert got["confidence"] == pytest.approx(p.max(1).mean(), rel=1e-5)
        assert got["entropy"] == pytest.approx(-(p * np.log(p)).sum(1).mean(), rel=1e-5)
