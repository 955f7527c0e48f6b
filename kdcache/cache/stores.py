"""How a view's teacher logits are stored: one codec per ``--store`` kind.

A codec knows the datasets its kind keeps per (image, view) record, how to
turn float32 logits into them and back, how closely ``verify`` may expect the
stored logits to match a live teacher, and what makes a stored record invalid.
The writer, the reader, the audit and the benchmarks only talk to a codec, so
a new kind of target is one new class here plus a line in :func:`store_codec`.
"""

from __future__ import annotations

import numpy as np

from ..errors import CacheError

Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


class StoreCodec:
    """One kind of stored teacher target; subclasses fill in the layout, the coding and the checks."""

    store: str  # the --store value this codec was made from, e.g. 'topk:5'
    # verify's default: largest accepted |cached - live| logit difference relative to the record's largest |logit|
    tolerance: float
    # How many classes a record keeps exactly; None: every class (only rounding is lost).
    classes_kept: int | None = None

    def datasets(self, num_classes: int) -> Layout:
        """Per-record shape and dtype of every dataset this store keeps (the file prepends (N, K))."""
        raise NotImplementedError

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Float32 teacher logits (..., C) as this store's arrays (..., *record shape)."""
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
        """Full float32 logits (..., C) from this store's arrays."""
        raise NotImplementedError

    def compared_classes(self, logits: np.ndarray) -> np.ndarray:
        """The classes (..., m) of decoded `logits` (..., C) that verify compares with a live teacher."""
        raise NotImplementedError

    def faults(self, arrays: dict[str, np.ndarray], num_classes: int) -> list[tuple[str, np.ndarray]]:
        """(what is wrong, mask over the records) for every way a stored record can be invalid."""
        raise NotImplementedError

    def record_bytes(self, num_classes: int) -> int:
        """Bytes this store keeps per (image, view) record."""
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                   for shape, dtype in self.datasets(num_classes).values())

    def _cast(self, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """`values` as the stored float type, refusing values that overflow it (fp16 tops out at 65504)."""
        with np.errstate(over="ignore"):
            out = values.astype(dtype)
        overflow = ~np.isfinite(out) & np.isfinite(values)  # NaN and Inf in `values` are the record checks' to name
        if overflow.any():
            raise CacheError(f"a teacher logit of {float(values[overflow].flat[0]):.3g} does not fit --store "
                             f"{self.store}; use --store fp32")
        return out

    def __repr__(self) -> str:
        return f"store_codec({self.store!r})"


class FullLogits(StoreCodec):
    """Every class's logit, rounded to float32 (``fp32``) or float16 (``fp16``)."""

    def __init__(self, store: str, dtype: type, tolerance: float) -> None:
        self.store, self.dtype, self.tolerance = store, np.dtype(dtype), tolerance

    def datasets(self, num_classes: int) -> Layout:
        return {"logits": ((num_classes,), self.dtype)}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": self._cast(logits, self.dtype)}

    def decode(self, arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
        return arrays["logits"].astype(np.float32)

    def compared_classes(self, logits: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.arange(logits.shape[-1]), logits.shape)

    def faults(self, arrays: dict[str, np.ndarray], num_classes: int) -> list[tuple[str, np.ndarray]]:
        return [("the logits hold NaN or Inf", ~np.isfinite(arrays["logits"]).all(axis=-1))]


class TopK(StoreCodec):
    """The k largest logits and their classes, plus the log-sum-exp of all C.

    Decoding gives every other class the logit that spreads the remaining
    probability mass (at T=1) evenly over them, so the kept classes keep their
    probabilities and the tail is flat.

    With `compact` (the records of a ``--compact`` cache) the float32
    log-sum-exp of all C logits becomes a float16 ``tail_logsumexp_gap``: the
    log-sum-exp of the C - k classes *not* kept, minus the largest kept logit
    as stored. Decoding gives each of those classes that log-sum-exp minus
    ln(C - k), so the tail's mass comes straight from the stored number. The
    full log-sum-exp instead gives the tail mass as 1 - (the kept mass), a
    difference of nearly equal numbers when the teacher is confident, in which
    the float16 rounding of the kept logits swamps a small tail; on real
    CIFAR-10 logits the tail form halves the mean KL at T=4 of topk:5 (see
    benchmarks/results/storage.md). The gap is at most ln(C - k) and float16
    keeps it to 2^-11 relative: the tail's mass to 0.05 % per nat of gap.
    """

    tolerance = 2e-2  # the kept logits are float16, and a dump may run under AMP

    def __init__(self, k: int, compact: bool = False) -> None:
        self.store, self.classes_kept, self.compact = f"topk:{k}", k, compact

    @staticmethod
    def _index_dtype(num_classes: int) -> np.dtype:
        return np.dtype(np.int16) if num_classes <= 32767 else np.dtype(np.int32)

    def datasets(self, num_classes: int) -> Layout:
        k = self.classes_kept
        lse = {"tail_logsumexp_gap": ((), np.dtype(np.float16))} if self.compact else \
            {"logsumexp": ((), np.dtype(np.float32))}
        return {"topk_values": ((k,), np.dtype(np.float16)),
                "topk_indices": ((k,), self._index_dtype(num_classes)), **lse}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        order = np.argsort(-logits, axis=-1, kind="stable")[..., :self.classes_kept]
        values = self._cast(np.take_along_axis(logits, order, axis=-1), np.dtype(np.float16))
        out = {"topk_values": values, "topk_indices": order.astype(self._index_dtype(logits.shape[-1]))}
        peak = logits.max(axis=-1, keepdims=True)
        if not self.compact:
            out["logsumexp"] = (peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)))[..., 0].astype(
                np.float32)
            return out
        tail = np.exp(logits.astype(np.float64) - peak)
        np.put_along_axis(tail, order, 0.0, axis=-1)
        with np.errstate(divide="ignore"):  # no tail (k = C) or one that underflows: log 0
            tail_lse = peak[..., 0] + np.log(tail.sum(axis=-1))
        # From the stored (rounded) largest logit, so decoding adds only the gap's own rounding; an empty or
        # vanishing tail is clipped to float16's range (its mass is 0 either way).
        gap = np.clip(tail_lse - values[..., 0], -60000.0, None)
        out["tail_logsumexp_gap"] = gap.astype(np.float16)
        return out

    def logsumexp(self, arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
        """The float32 log-sum-exp over all classes of each record's decoded logits."""
        if not self.compact:
            return arrays["logsumexp"].astype(np.float32)
        logits = self.decode(arrays, num_classes).astype(np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        return (peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)))[..., 0].astype(np.float32)

    def decode(self, arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
        values = arrays["topk_values"].astype(np.float32)
        index = arrays["topk_indices"].astype(np.int64)
        top = values.shape[-1]
        if top >= num_classes:
            out = np.empty(values.shape[:-1] + (num_classes,), dtype=np.float32)
            np.put_along_axis(out, index, values, axis=-1)
            return out
        if self.compact:
            tail = values[..., :1] + arrays["tail_logsumexp_gap"].astype(np.float32)[..., None] - np.float32(
                np.log(num_classes - top))
            out = np.broadcast_to(tail, values.shape[:-1] + (num_classes,)).copy()
            np.put_along_axis(out, index, values, axis=-1)
            return out
        lse = arrays["logsumexp"].astype(np.float32)[..., None]
        kept = np.exp(values - lse).sum(axis=-1, keepdims=True)
        rest = np.clip(1.0 - kept, 1e-12, None) / (num_classes - top)
        out = np.broadcast_to(lse + np.log(rest), values.shape[:-1] + (num_classes,)).copy()
        np.put_along_axis(out, index, values, axis=-1)
        return out

    def compared_classes(self, logits: np.ndarray) -> np.ndarray:
        # Only the kept classes are stored exactly; the decoded tail is an approximation by design.
        return np.argsort(-logits, axis=-1)[..., :self.classes_kept]

    def faults(self, arrays: dict[str, np.ndarray], num_classes: int) -> list[tuple[str, np.ndarray]]:
        values, index = arrays["topk_values"], arrays["topk_indices"]
        lse = arrays["tail_logsumexp_gap" if self.compact else "logsumexp"]
        ordered = np.sort(index, axis=-1)
        return [("the top-k logits hold NaN or Inf", ~np.isfinite(values).all(axis=-1) | ~np.isfinite(lse)),
                (f"a top-k class index is outside [0, {num_classes})",
                 ((index < 0) | (index >= num_classes)).any(axis=-1)),
                ("a top-k class index repeats", (ordered[..., 1:] == ordered[..., :-1]).any(axis=-1))]

    def __repr__(self) -> str:
        return f"store_codec({self.store!r}, compact={self.compact})" if self.compact else super().__repr__()


def store_codec(store: str, num_classes: int | None = None, compact: bool = False) -> StoreCodec:
    """The codec of a ``--store`` value (fp16, fp32 or topk:K); with `num_classes`, also check that K fits.

    `compact`: the codec of a ``--compact`` cache (top-k keeps its log-sum-exp in float16; the others are unchanged).
    """
    codec: StoreCodec | None = None
    if store == "fp32":
        codec = FullLogits("fp32", np.float32, 1e-3)  # a different batch composition or BLAS: float32 rounding
    elif store == "fp16":
        codec = FullLogits("fp16", np.float16, 2e-2)  # half precision (2^-11 relative) and a dump under AMP
    elif isinstance(store, str) and store.startswith("topk:") and store[5:].isdigit() and int(store[5:]) >= 1:
        codec = TopK(int(store[5:]), compact)
    if codec is None:
        raise CacheError(f"--store must be fp16, fp32 or topk:K with K >= 1, got '{store}'")
    if num_classes is not None and codec.classes_kept is not None and codec.classes_kept > num_classes:
        raise CacheError(f"--store {store} keeps more classes than the teacher has ({num_classes})")
    return codec


def parse_store(store: str) -> tuple[str, int]:
    """('fp16', 0), ('fp32', 0) or ('topk', k) from a --store value (kept for callers of kdcache 0.1)."""
    codec = store_codec(store)
    return (store, 0) if codec.classes_kept is None else ("topk", codec.classes_kept)
