"""The value types of a cache's root attributes: HDF5 value -> Python value, TypeError when of another type.

:mod:`kdcache.cache.format` pairs each attribute with one of these decoders and its range; :func:`attr_error`
words a value that fails them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import numpy as np


def integer(v: Any) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError("an integer")
    return int(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError("a boolean")
    return bool(v)


def number(v: Any) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError("a number")
    return float(v)


def text(v: Any) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            raise TypeError("UTF-8 text") from None
    if not isinstance(v, str):
        raise TypeError("text")
    return v


def numbers(n: int) -> Callable[[Any], tuple[float, ...]]:
    def decode(v: Any) -> tuple[float, ...]:
        a = np.asarray(v) if isinstance(v, (list, tuple, np.ndarray)) else None
        if a is None or a.shape != (n,) or a.dtype.kind not in "iuf":
            raise TypeError(f"{n} numbers")
        return tuple(float(x) for x in a)
    return decode


def names_json(v: Any) -> tuple[str, ...]:
    try:
        names = json.loads(text(v))
    except (TypeError, ValueError):
        names = None
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        raise TypeError("a JSON list of class names")
    return tuple(names)


def finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def plain_attr(value: object) -> object:
    """An HDF5 attribute value as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def attr_error(name: str, value: Any, expected: str) -> str:
    """How an attribute is wrong, in words (no file name: the caller adds it)."""
    shown = repr(plain_attr(value))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"attribute '{name}' is {shown} ({type(value).__name__}), expected {expected}"
