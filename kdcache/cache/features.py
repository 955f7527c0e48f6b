"""How a view's teacher features are stored: one codec per kind named in the ``features`` attribute.

Like the logit stores (:mod:`kdcache.cache.stores`), a feature codec knows its
dataset, how to store float32 features and read them back, what makes a stored
record invalid, and how ``verify`` compares a stored record with a live one
(cosine similarity). The ``features`` attribute lists them as
``pooled:D`` (the D-wide pooled embedding) and ``attention:S`` (an S x S map);
their values are float32 in an ``fp32`` cache and float16 otherwise.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np

from ..errors import CacheError
from .stores import Layout

MIN_COSINE = 0.999  # verify's default: float16 rounding (2^-11 relative) keeps a record's cosine above 0.9999


class FeatureCodec:
    """One kind of stored teacher feature: a (N, K, *shape) dataset of float16 or float32."""

    def __init__(self, kind: str, size: int, shape: tuple[int, ...], dtype: type) -> None:
        self.kind, self.size, self.shape, self.dtype = kind, size, shape, np.dtype(dtype)
        self.dataset = f"features_{kind}"

    @property
    def spec(self) -> str:
        """Its entry in the ``features`` attribute, e.g. 'pooled:320'."""
        return f"{self.kind}:{self.size}"

    def datasets(self) -> Layout:
        return {self.dataset: (self.shape, self.dtype)}

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Float32 features (..., *shape) in the stored form; a value the dtype cannot hold is refused."""
        with np.errstate(over="ignore"):
            out = values.astype(self.dtype)
        overflow = ~np.isfinite(out) & np.isfinite(values)
        if overflow.any():
            raise CacheError(f"a teacher {self.kind} feature of {float(values[overflow].flat[0]):.3g} does not fit "
                             "float16; dump with --store fp32")
        return {self.dataset: out}

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(arrays[self.dataset]).astype(np.float32)

    def faults(self, arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        values = np.asarray(arrays[self.dataset])
        flat = values.reshape(values.shape[:values.ndim - len(self.shape)] + (-1,))
        return [(f"the {self.kind} features hold NaN or Inf", ~np.isfinite(flat).all(axis=-1))]

    def record_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"FeatureCodec({self.spec!r}, {self.dtype})"


def cosine(stored: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Cosine similarity per record of (B, ...) arrays, in float64 (1 where both are zero)."""
    a = stored.reshape(len(stored), -1).astype(np.float64)
    b = live.reshape(len(live), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (norms == 0) & ~np.abs(a).any(axis=1) & ~np.abs(b).any(axis=1)
    return np.where(both_zero, 1.0, dot / np.where(norms == 0, np.inf, norms))


def feature_codec(spec: str, store: str) -> FeatureCodec:
    """The codec of one ``features`` entry (pooled:D or attention:S) in a cache of `store`."""
    kind, _, size = spec.partition(":")
    if kind not in ("pooled", "attention") or not size.isdigit() or int(size) < 1:
        raise CacheError(f"feature '{spec}' is not pooled:D or attention:S with D, S >= 1")
    dtype = np.float32 if store == "fp32" else np.float16
    n = int(size)
    return FeatureCodec(kind, n, (n,) if kind == "pooled" else (n, n), dtype)


def feature_codecs(specs: Sequence[str], store: str) -> tuple[FeatureCodec, ...]:
    """The codecs of a cache's ``features`` attribute, in order; each kind at most once."""
    codecs = tuple(feature_codec(s, store) for s in specs)
    kinds = [c.kind for c in codecs]
    if len(set(kinds)) != len(kinds):
        raise CacheError(f"features {list(specs)} name a kind twice")
    return codecs


def encode_features(codecs: Sequence[FeatureCodec], features: Mapping[str, np.ndarray],
                    where: object) -> dict[str, np.ndarray]:
    """The stored form of float32 `features` (by kind) for every codec; a kind not given is refused, naming `where`."""
    missing = [c.kind for c in codecs if c.kind not in features]
    if missing:
        raise CacheError(f"{where} stores {missing[0]} features, but none were given to write")
    return {k: v for c in codecs for k, v in c.encode(features[c.kind]).items()}


def decode_feature_list(value: str) -> tuple[str, ...]:
    """The ``features`` attribute (a JSON list of strings) as a tuple; TypeError when it is not one."""
    try:
        specs = json.loads(value)
    except (TypeError, ValueError):
        specs = None
    if not isinstance(specs, list) or not all(isinstance(x, str) for x in specs):
        raise TypeError("a JSON list of features such as [\"pooled:320\", \"attention:7\"]")
    return tuple(specs)
