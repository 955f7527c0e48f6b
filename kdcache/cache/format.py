"""The teacher cache file: one HDF5 file, a versioned contract.

Format version 1. ``N`` images of the training split, ``K`` views each, ``C``
classes. Row ``i`` of every per-sample dataset is the ``i``-th image of the
split in the dataset's stable order (see :mod:`kdcache.data`).

Datasets
--------
``sample_ids``      (N,)     int64    stable sample id of each row
``labels``          (N,)     int64    class index of each row, in [0, C)
``content_hashes``  (N,)     uint64   per-image content hash (for fingerprint diffs;
                                      scheme: the ``content_hash`` attribute)
``crops``           (N,K,4)  float32  RandomResizedCrop box as fractions of the
                                      image: top, left, height, width; finite,
                                      top, left >= 0, height, width > 0,
                                      top + height <= 1 and left + width <= 1
                                      (up to 1e-6 of float rounding)
``flips``           (N,K)    uint8    1 where the view is mirrored, else 0
                                      (a compact cache has neither, see Versions)
``done``            (N,)     uint8    1 once every view of the row is written
                                      (a resumed dump skips these rows)

Teacher targets, by ``store`` (one codec each, see :mod:`kdcache.cache.stores`):

``fp16`` / ``fp32``  ``logits`` (N,K,C) float16 / float32: the raw teacher logits,
                     all finite.
``topk:k``           ``topk_values`` (N,K,k) float16: the k largest logits,
                     ``topk_indices`` (N,K,k) int16 (int32 when C > 32767): their
                     classes, distinct and in [0, C), ``logsumexp`` (N,K) float32:
                     log-sum-exp of all C logits. The reader rebuilds C logits: the
                     k kept ones, and for every other class the logit that spreads
                     the rest of the probability mass (at T=1) evenly over them.
                     Softening by a temperature T then keeps that tail flat, so the
                     approximation is exact for the top k classes' order and loses
                     only the shape of the tail.

Recipe parameters (format version 2; only in a cache whose ``recipe``
attribute is set, and only those its recipe uses; one codec,
:mod:`kdcache.cache.params`). Each is one parameter of the view (image row,
view), drawn from ``(seed, sample id, view)`` by
:func:`kdcache.recipe.sample_view` and replayed as stored:

``ra_ops``          (N,K,L)  int8     RandAugment (``--aa``): the op of each of the
                                      policy's L layers, an index into the policy's op
                                      list (timm's order for the ``--aa`` string); -1
                                      where the layer's op was skipped (its prob)
``ra_args``         (N,K,L)  float32  the op's final argument (after magnitude noise,
                                      clipping and sign), as timm's op function takes
                                      it (integer-valued for posterize and solarize);
                                      0 for ops without one and for skipped layers
``jitter_factors``  (N,K,3)  float32  colour jitter (``--color-jitter``): brightness,
                                      contrast and saturation factors, >= 0
``jitter_order``    (N,K,3)  uint8    the order they are applied in (a permutation
                                      of 0, 1, 2, indices into the factors)
``erase_boxes``     (N,K,4)  float32  random erasing (``--reprob``): the erased box
                                      as fractions of the input_size x input_size view
                                      (top, left, height, width); all 0: not erased
``erase_seeds``     (N,K)    int64    >= 0: seeds a CPU ``torch.Generator`` whose
                                      ``torch.randn(3, h, w)`` fills the box (after
                                      normalisation, timm's 'pixel' mode)
``mix_partners``    (N,K)    int64    Mixup/CutMix: the partner's row (another row of
                                      this cache), -1 where the view is not mixed. The
                                      partner's view is the same view index, rendered
                                      from the partner's own stored record (its own
                                      mixing ignored)
``mix_lambdas``     (N,K)    float32  the own image's weight in [0, 1] (1 when not
                                      mixed); for CutMix corrected to the box's area.
                                      Labels mix with it: lambda*y + (1-lambda)*y_partner
``cutmix_boxes``    (N,K,4)  float32  the pasted partner box as fractions of the view
                                      (top, left, height, width); all 0 for mixup and
                                      unmixed views
Teacher features, optional, by the ``features`` attribute (a JSON list; absent:
none; one codec each, see :mod:`kdcache.cache.features`), float32 in an ``fp32``
cache and float16 otherwise, all finite, computed on the view the teacher saw
(see :mod:`kdcache.features`):

``pooled:D``         ``features_pooled`` (N,K,D): the pooled pre-logits embedding.
``attention:S``      ``features_attention`` (N,K,S,S): the last feature map's channel
                     mean of squared activations, average-pooled to S x S.

A reader that ignores them reads the logits as before, so they keep the
version (see 'Versions').

Every dataset is chunked along N only (whole images, all views), with chunks
of about 64 KiB, and allocated when the file is created, so later writes touch
raw data only and a killed dump leaves readable metadata. Files written after
kdcache 0.1.0 add HDF5's fletcher32 filter to every dataset: each chunk carries a
checksum that HDF5 checks on every read, so bit rot is caught when a chunk is
read, not only by ``verify``. HDF5 then writes every chunk (zeros and their
checksum) when it allocates it, so creating a cache writes its whole size once
(0.4 s per 800 MB here) and a disk that is too small fails at the start. Files
without the filter still read.

Root attributes
---------------
``format_version`` (int), ``kdcache_version``, ``created`` (ISO 8601 UTC),
``complete`` (bool), ``num_samples``, ``num_views``, ``num_classes``, ``seed``,
``store``, ``teacher`` (timm name), ``teacher_checkpoint`` (path as given),
``teacher_checkpoint_sha256`` ('' when none), ``teacher_pretrained`` (bool),
``input_size``, ``mean`` (3,), ``std`` (3,), ``interpolation``, ``crop_pct``,
``crop_scale`` (2,), ``crop_ratio`` (2,), ``hflip``, ``dataset_name``,
``dataset_split``, ``dataset_fingerprint`` (hex digest, see kdcache.data),
``class_names`` (JSON list of C names), ``library_versions`` (JSON object), and,
optionally, ``content_hash`` (the scheme of ``content_hashes`` and of the
fingerprint; a file without it reads as ``head-tail-64k``: file size plus the
first and last 64 KiB). A cache grown from one of fewer views (below) also
records ``grown_from_views`` (int, the K it had); readers ignore it, and a file
without it was dumped in one go. ``features`` (above) is absent when none are
stored. A compact cache records ``compact`` = true
(format version 2, see Versions). ``recipe`` (JSON object of
:class:`kdcache.config.Recipe`'s fields; version 2) records a recipe beyond
the crop and flip; a file without it (or with '') has the default recipe.
``library_versions`` names the versions of kdcache, torch, torchvision, timm,
Pillow, h5py, HDF5 and numpy that wrote the file (torchvision and Pillow
since version 2: their resizing and ops make the pixels). The reader checks every attribute's type and
range on open (:func:`info_from_attrs`).

A dump writes ``OUT.partial`` and renames it to ``OUT`` when complete.
``OUT.partial`` itself is made under a temporary name
(``OUT.partial.tmp-{host}-{pid}``) and renamed once its metadata, ids, labels
and hashes are written and its space is reserved, so an ``OUT.partial`` always
has complete metadata. The file holds no pickled objects.

A dump with ``K2`` views onto a complete ``OUT`` of ``K < K2`` views and
otherwise equal settings grows it: the temporary gets ``OUT``'s stored views
as its views ``[0, K)``, bit for bit, and ``grown_from_views`` = K before it
becomes ``OUT.partial``; the dump then fills views ``[K, K2)`` of each row,
marks the row done and renames ``OUT.partial`` over ``OUT`` when complete.
``OUT`` stays the complete K-view cache until that rename. Views derive from
``(seed, sample id, view)``, so the grown file is the K2-view cache of a dump
in one go (with the extra attribute).

Versions
--------
``FORMAT_VERSION`` is the newest version this kdcache writes; it reads every
version in ``READ_VERSIONS``. A writer stamps a file with the lowest version
that can describe it (:func:`file_version`), so a file that needs nothing of a
newer version stays readable by older kdcache releases. A reader refuses a
version it does not know with one line that says which versions it reads.

* **Version 1**: everything above. A reader of version 1 reads every file that
  says ``format_version`` 1. The fletcher32 filter and an optional attribute
  with a default keep that promise: a v1 reader of kdcache 0.1.0 reads both
  (checked).
* **Version 2**: version 1 plus what an older reader would misread if it
  ignored it (each such addition is listed here, with the attribute that
  marks it). A file that uses none of them is written as version 1.

  - **Compact records** (``dump-teacher --compact``), marked by the root
    attribute ``compact`` (bool; absent reads as false). A compact cache
    has no ``crops`` and no ``flips`` datasets: the crop of a record is
    derived on read from ``(seed, sample id, view)`` and the image's height
    and width, exactly as a dump samples it
    (:func:`kdcache.augment.sample_crops`). Instead it holds a *witness* of
    W = min(64, N) records, drawn from the seed (see
    :mod:`kdcache.cache.witness`), that every open re-derives and compares
    bit for bit, so a kdcache whose crop sampling differs refuses the file:

    =================  ======  =======  ==============================
    ``witness_ids``    (W,)    int64    sample id of each record
    ``witness_views``  (W,)    int32    its view, in [0, K)
    ``witness_sizes``  (W,2)   int32    image height, width (pixels)
    ``witness_crops``  (W,4)   float32  its box, as ``crops`` above
    ``witness_flips``  (W,)    uint8    its flip, as ``flips`` above
    =================  ======  =======  ==============================

    A compact ``topk:k`` store keeps ``tail_logsumexp_gap`` (N,K) float16
    instead of ``logsumexp``: the log-sum-exp of the C - k classes not kept,
    minus the record's largest stored top-k value (``topk_values[..., 0]``,
    as stored; at least -60000, for a tail of no mass). The reader gives each
    of those classes the logit ``topk_values[..., 0] + tail_logsumexp_gap -
    ln(C - k)``: the same flat tail as above, its mass taken from the stored
    number instead of 1 minus the kept mass (see :class:`~kdcache.cache.stores.TopK`
    for why). The gap is at most ln(C - k), and float16 keeps it to within
    2^-11 of its size. Other stores are unchanged. A v1 reader would find no
    ``crops`` and refuse the file, hence version 2.
  - **Recipe parameters** (``--mixup``, ``--cutmix``, ``--aa``,
    ``--color-jitter``, ``--reprob``), marked by a non-empty ``recipe``
    attribute: the parameter datasets above. An older reader would replay
    the crops without the ops, erasing and mixing, and pair the teacher's
    targets of mixed views with unmixed pixels. (Not combined with
    ``compact`` yet: a dump refuses both.)

A change that an older reader cannot read (a new required dataset or
attribute, another meaning of an existing one) must be a new version: it is
listed under version 2 (or a later one), :func:`file_version` returns that
version for files that use it, and a golden file of the version is added to
tests/data. An optional dataset or attribute that an older reader may safely
ignore does not change the version.

Part files (a dump by several processes under torchrun)
-------------------------------------------------------
Rank ``r`` of ``W`` processes dumps the rows ``row % W == r`` into its own part
file ``OUT.rank{r}-of-{W}`` (written as ``OUT.rank{r}-of-{W}.partial``,
resumable exactly like ``OUT.partial``). A part is a cache of this format over
those rows, in order: ``num_samples`` is its row count, every other attribute
is the whole dump's (``dataset_fingerprint`` included), and two root
attributes are added: ``part_rank`` (int, r) and ``part_world_size`` (int, W).
When all W parts are complete, rank 0 copies their stored values, bit for bit
and in row order, into ``OUT.partial`` (an ordinary resumable cache over all N
rows, without the part attributes), renames it to ``OUT`` and then deletes the
parts. ``OUT`` is therefore the same file a single process writes: equal ids,
labels, crops and flips, and logits equal up to the float rounding of a
different batch composition (see :mod:`kdcache.parts`).
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, Mapping

import h5py
import numpy as np

from ..errors import CacheError
# attr_error and plain_attr are re-exported: the reader and writer word attributes with them.
from .attr_types import attr_error, boolean, finite, integer, names_json, number, numbers, plain_attr, text
from .features import decode_feature_list, feature_codecs
from .layout import BOX_SLACK, check_datasets, info_codec, info_codecs, layout, record_bytes, record_faults, \
    record_layout

# The layout of a cache of a CacheInfo (its datasets, their shapes and dtypes, the checks of stored records)
# lives in kdcache.cache.layout and is re-exported here, where the schema is written down.
__all__ = ["BOX_SLACK", "FORMAT_VERSION", "READ_VERSIONS", "CacheInfo", "attr_error", "check_datasets",
           "file_version", "info_attrs", "info_codec", "info_codecs", "info_from_attrs", "layout", "library_versions",
           "plain_attr", "record_bytes", "record_faults", "record_layout", "settings_mismatch"]

FORMAT_VERSION = 2  # the newest version written; see 'Versions' above
READ_VERSIONS = (1, 2)
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class CacheInfo:
    """Everything a cache records about how it was made (the root attributes)."""

    num_samples: int
    num_views: int
    num_classes: int
    seed: int
    store: str
    teacher: str
    teacher_checkpoint: str
    teacher_checkpoint_sha256: str
    teacher_pretrained: bool
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: float
    dataset_name: str
    dataset_split: str
    dataset_fingerprint: str
    class_names: tuple[str, ...]
    # Optional attributes: a file without one reads as the default, so adding one keeps format version 1.
    content_hash: str = "head-tail-64k"  # the scheme of content_hashes and the fingerprint (see kdcache.data)
    features: tuple[str, ...] = ()  # stored teacher features, e.g. ('pooled:320', 'attention:7'); () when none
    # Format version 2: crops derived on read, not stored, and top-k's log-sum-exp in float16 (see Versions).
    compact: bool = False
    recipe: str = ""  # Recipe.to_json(): '' is crop and flip only; anything else makes the file version 2

    def settings(self) -> dict:
        """The fields a resumed dump must agree on (all but the checkpoint path)."""
        d = asdict(self)
        d.pop("teacher_checkpoint")
        return d


# The attributes codec: each CacheInfo field's decoder (HDF5 value -> Python, TypeError when of another type)
# and its range, so a damaged or hostile file fails on open with one line instead of deep inside a run.

_ANY = (lambda v: True, "")
_ATTRS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], bool], str]] = {
    "num_samples": (integer, lambda v: v >= 0, ">= 0"),
    "num_views": (integer, lambda v: v >= 1, ">= 1"),
    "num_classes": (integer, lambda v: v >= 1, ">= 1"),
    "seed": (integer, lambda v: 0 <= v < 2**64, "in [0, 2^64)"),
    "store": (text, *_ANY),  # checked with num_classes, by its codec
    "teacher": (text, lambda v: v != "", "not empty"),
    "teacher_checkpoint": (text, *_ANY),
    "teacher_checkpoint_sha256": (text, lambda v: re.fullmatch(r"([0-9a-f]{64})?", v) is not None,
                                  "'' or 64 hex digits"),
    "teacher_pretrained": (boolean, *_ANY),
    "input_size": (integer, lambda v: v >= 1, ">= 1"),
    "mean": (numbers(3), lambda v: finite(*v), "finite"),
    "std": (numbers(3), lambda v: finite(*v) and min(v) > 0, "finite and > 0"),
    "interpolation": (text, lambda v: v in ("bilinear", "bicubic", "nearest"), "bilinear, bicubic or nearest"),
    "crop_pct": (number, lambda v: finite(v) and v > 0, "finite and > 0"),
    "crop_scale": (numbers(2), lambda v: 0 < v[0] <= v[1] <= 1, "0 < min <= max <= 1"),
    "crop_ratio": (numbers(2), lambda v: finite(*v) and 0 < v[0] <= v[1], "finite, 0 < min <= max"),
    "hflip": (number, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "dataset_name": (text, *_ANY),
    "dataset_split": (text, *_ANY),
    "dataset_fingerprint": (text, *_ANY),
    "class_names": (names_json, *_ANY),  # checked against num_classes below
    "content_hash": (text, lambda v: v != "", "not empty"),
    "features": (lambda v: decode_feature_list(text(v)), *_ANY),  # checked by their codecs below
    "compact": (boolean, *_ANY),
    "recipe": (text, lambda v: _is_recipe(v), "'' or a JSON recipe of kdcache.config.Recipe"),
}


def file_version(info: CacheInfo) -> int:
    """The lowest format version that describes a cache of `info` (1 unless it uses a version-2 addition)."""
    return 2 if info.compact or info.recipe else 1


def _is_recipe(value: str) -> bool:
    from ..config import Recipe
    from ..errors import ConfigError

    try:
        Recipe.from_json(value)
    except ConfigError:
        return False
    return True


def info_from_attrs(attrs: Mapping[str, Any]) -> CacheInfo:
    """The CacheInfo of a file's root attributes, every value checked for type and range.

    Raises ValueError with a one-line reason naming the attribute; a missing
    attribute with a default in CacheInfo reads as the default.
    """
    values = {}
    for f in fields(CacheInfo):
        if f.name not in attrs:
            if f.default is not MISSING:
                continue
            raise ValueError(f"attribute '{f.name}' is missing; the file is not a complete kdcache cache")
        raw = attrs[f.name]
        decode, valid, expected = _ATTRS[f.name]
        try:
            value = decode(raw)
        except TypeError as e:
            raise ValueError(attr_error(f.name, raw, str(e))) from None
        if not valid(value):
            raise ValueError(attr_error(f.name, raw, expected))
        values[f.name] = value
    info = CacheInfo(**values)
    if len(info.class_names) != info.num_classes:
        raise ValueError(f"attribute 'class_names' holds {len(info.class_names)} names for {info.num_classes} classes")
    try:
        info_codec(info)
    except CacheError as e:
        raise ValueError(f"attribute 'store': {e}") from None
    try:
        feature_codecs(info.features, info.store)
    except CacheError as e:
        raise ValueError(f"attribute 'features': {e}") from None
    return info


def info_attrs(info: CacheInfo) -> dict[str, Any]:
    """The root attributes that record `info` (the inverse of :func:`info_from_attrs`)."""
    attrs = {key: json.dumps(list(value)) if key in ("class_names", "features") else value
             for key, value in asdict(info).items()}
    if not info.features:
        del attrs["features"]  # a cache without features has exactly the attributes of one before they existed
    if not attrs["recipe"]:
        del attrs["recipe"]  # the default recipe: the file is written as before, attribute for attribute
    return attrs


def settings_mismatch(found: dict, wanted: dict) -> str:
    """The first three settings of `wanted` that `found` differs in, worded; '' when none does."""
    diff = [k for k in wanted if found.get(k) != wanted[k]]
    return ", ".join(f"{k}: {found.get(k)!r} in the file, {wanted[k]!r} now" for k in diff[:3])


def library_versions() -> str:
    """The versions that wrote a file, as a JSON object."""
    import PIL
    import timm
    import torch
    import torchvision

    from .. import __version__

    return json.dumps({"kdcache": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                       "timm": timm.__version__, "Pillow": PIL.__version__,
                       "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "numpy": np.__version__})
