"""A dump split over torchrun's processes: one part file per rank, merged into one cache.

Rank ``r`` of ``W`` dumps the image rows ``row % W == r`` (all K views of an
image in one rank, so each image is decoded once) into its own part file
``OUT.rank{r}-of-{W}``: an ordinary resumable cache over those rows (see the
schema in :mod:`kdcache.cache`) that also records ``part_rank`` and
``part_world_size``. Once every part is complete, rank 0 copies the parts'
rows into ``OUT`` in row order, bit for bit, and deletes them. Every step
resumes: a part still ``.partial`` continues where it stopped, a complete
part is reused, an interrupted merge continues in its own ``OUT.partial``,
and a merge stopped after its rename but before deleting the parts is
finished by the rerun, which finds OUT complete with its settings and deletes
the parts. Each rank locks its own part file and rank 0 also locks OUT (see
:mod:`kdcache.lock`), so the ranks of one job never wait on each other while
a second job is refused. The part files must lie on a file system every node
sees.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from .cache import CacheInfo, CacheReader, CacheWriter, record_bytes, settings_mismatch
from .errors import CacheError
from .report import Progress

_MERGE_BLOCK_BYTES = 64 * 1024**2  # rows copied per read/write pass: a few chunks of every dataset


def part_path(out: str | Path, rank: int, world_size: int) -> Path:
    """The complete part file of `rank` (``.partial`` is appended while it is written)."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}")


def part_attrs(rank: int, world_size: int) -> dict:
    """The root attributes a part file adds to the schema."""
    return {"part_rank": rank, "part_world_size": world_size}


def part_info(info: CacheInfo, rows: np.ndarray) -> CacheInfo:
    """The settings of the part that holds `rows`: the whole dump's, but `num_samples` is its row count."""
    return dataclasses.replace(info, num_samples=len(rows))


def _part_files(out: Path, partial: bool) -> dict[Path, tuple[int, int]]:
    """{part file beside `out`: (rank, world size)}: the complete ones, and with `partial` the partial ones too."""
    pattern = re.compile(re.escape(out.name) + r"\.rank(\d+)-of-(\d+)" + (r"(\.partial)?" if partial else "") + "$")
    found = {}
    for p in out.parent.glob(f"{out.name}.rank*-of-*"):
        match = pattern.match(p.name)
        if match:
            found[p] = (int(match[1]), int(match[2]))
    return found


def other_parts(out: str | Path, world_size: int) -> list[Path]:
    """Part files beside `out` left by a dump with another number of processes (they are not used)."""
    return sorted(p for p, (_, w) in _part_files(Path(out), partial=True).items() if w != world_size)


def leftover_parts(out: str | Path) -> list[Path]:
    """The complete part files beside `out`, of any number of processes."""
    return sorted(_part_files(Path(out), partial=False))


def matching_parts(out: str | Path, info: CacheInfo, sample_ids: np.ndarray) -> list[Path]:
    """The complete part files beside `out` that a merge of the dump `info` would copy into `out`."""
    n = info.num_samples
    found = []
    for path, (rank, world_size) in sorted(_part_files(Path(out), partial=False).items()):
        if rank >= world_size:
            continue
        try:
            check_part(path, part_info(info, np.arange(rank, n, world_size)), rank, world_size,
                       sample_ids[rank::world_size]).close()
        except CacheError:
            continue
        found.append(path)
    return found


def is_finished(out: str | Path, info: CacheInfo, sample_ids: np.ndarray) -> bool:
    """True when `out` is a complete cache of exactly the dump `info` (its settings and its images)."""
    try:
        reader = CacheReader(out, preload=False)
    except CacheError:
        return False
    try:
        return not settings_mismatch(reader.info.settings(), info.settings()) and np.array_equal(
            reader.sample_ids, sample_ids)
    finally:
        reader.close()


def check_part(path: Path, info: CacheInfo, rank: int, world_size: int, sample_ids: np.ndarray) -> CacheReader:
    """A complete part file, checked against the dump it should belong to."""
    reader = CacheReader(path, preload=False)
    found = reader.info.settings()
    found.update({k: reader.attrs.get(k) for k in ("part_rank", "part_world_size")})
    detail = settings_mismatch(found, {**info.settings(), **part_attrs(rank, world_size)})
    if detail:
        raise CacheError(f"{path} belongs to a dump with different settings ({detail}); re-run the original "
                         "command, or delete the part files to start over")
    if not np.array_equal(reader.sample_ids, sample_ids):
        raise CacheError(f"{path} holds other images than rank {rank} of {world_size} should; delete the part "
                         "files to start over")
    return reader


def merge_parts(out: str | Path, info: CacheInfo, sample_ids: np.ndarray, labels: np.ndarray,
                content_hashes: np.ndarray, world_size: int, force: bool = False,
                progress: Progress | None = None, witness: dict[str, np.ndarray] | None = None) -> Path:
    """Rank 0, after every part is complete: copy all parts into `out`, in row order; delete the parts.

    Rows are copied in blocks ``[lo, hi)`` aligned to `world_size`; within a
    block, part ``r`` holds the rows ``lo + r, lo + r + W, ...`` as one
    contiguous slice, so every read and write is a slice. A merge that was
    interrupted resumes: blocks whose rows are all done are skipped. A
    compact cache's `witness` is its own (each part has one over its rows).
    """
    progress = progress or Progress()
    out = Path(out)
    n = info.num_samples
    readers = [check_part(part_path(out, r, world_size), part_info(info, np.arange(r, n, world_size)), r,
                          world_size, sample_ids[r::world_size]) for r in range(world_size)]
    writer = CacheWriter(out, info, sample_ids, labels, content_hashes, force=force, witness=witness)
    try:
        names = readers[0].record_names
        row_bytes = record_bytes(info) * info.num_views
        block = max(1, int(_MERGE_BLOCK_BYTES // max(row_bytes, 1)) // world_size) * world_size
        pending = np.zeros(n, dtype=bool)
        pending[writer.pending_rows()] = True
        progress.start(f"merge {world_size} parts", int(pending.sum()))
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            if not pending[lo:hi].any():
                continue
            arrays = {}
            for name in names:
                # Part r holds the rows lo + r + W*i of [lo, hi) as its own rows lo/W + i: one slice each.
                pieces = [reader.stored(name, lo // world_size, lo // world_size + len(range(lo + r, hi, world_size)))
                          for r, reader in enumerate(readers)]
                merged = np.empty((hi - lo,) + pieces[0].shape[1:], dtype=pieces[0].dtype)
                for r, piece in enumerate(pieces):
                    merged[r::world_size] = piece
                arrays[name] = merged
            writer.write_stored(np.arange(lo, hi), arrays)
            progress.update(int(pending[lo:hi].sum()))
        progress.stop()
        for reader in readers:
            reader.close()
        path = writer.finish()
    finally:
        writer.close()
        for reader in readers:
            reader.close()
    # Only now that OUT is complete: a merge killed before this point still has every part to resume from.
    for r in range(world_size):
        part_path(out, r, world_size).unlink(missing_ok=True)
    return path
