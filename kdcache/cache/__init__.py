"""The teacher cache: one HDF5 file, a versioned contract (the schema is in :mod:`kdcache.cache.format`).

* :mod:`~kdcache.cache.format`: the schema, ``FORMAT_VERSION``, :class:`CacheInfo`
  and its attributes codec, the layout and the checks of stored records.
* :mod:`~kdcache.cache.layout`: every dataset's shape and dtype, and the checks of stored records.
* :mod:`~kdcache.cache.stores`: one codec per ``--store`` kind (fp32, fp16, topk:K).
* :mod:`~kdcache.cache.params`: the codec of a recipe's per-view parameters (format version 2).
* :mod:`~kdcache.cache.features`: one codec per stored teacher feature (pooled:D, attention:S).
* :mod:`~kdcache.cache.writer`: :class:`CacheWriter` (resumable, crash-safe, atomic; grows a cache).
* :mod:`~kdcache.cache.reader`: :class:`CacheReader` (validated once, opened lazily per process).
* :mod:`~kdcache.cache.witness`: the crop witness of a compact cache (crops derived, not stored).
"""

from .format import FORMAT_VERSION, CacheInfo, info_attrs, info_from_attrs, layout, plain_attr, record_bytes, \
    record_faults, settings_mismatch
from .hdf5 import DamagedChunk, FileIdentity
from .reader import PRELOAD_LIMIT_BYTES, CacheReader, RecordScan
from .stores import FullLogits, StoreCodec, TopK, parse_store, store_codec
from .witness import make_witness
from .writer import CacheWriter, growth_mismatch

__all__ = ["FORMAT_VERSION", "PRELOAD_LIMIT_BYTES", "CacheInfo", "CacheReader", "CacheWriter", "DamagedChunk",
           "FileIdentity", "FullLogits", "RecordScan", "StoreCodec", "TopK", "growth_mismatch", "info_attrs",
           "make_witness", "info_from_attrs", "layout", "parse_store", "plain_attr", "record_bytes", "record_faults", "settings_mismatch", "store_codec"]
