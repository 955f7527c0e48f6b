"""The recipe's per-view parameters as stored values: one codec, made from the cache's recipe.

Like a store codec (:mod:`kdcache.cache.stores`), it knows the datasets it
keeps per (image, view) record and what makes a stored record invalid, so the
writer, the reader, growth, the part merge and the audit iterate over its
datasets with no branch of their own. The values are stored as
:func:`kdcache.recipe.sample_view` draws them (no encoding), so a stored
record is the record a replay applies. The datasets are described in
:mod:`kdcache.cache.format`.
"""

from __future__ import annotations

import numpy as np

from ..config import Recipe
from .stores import Layout


class ParamsCodec:
    """The parameter datasets of a recipe; none for the default recipe (a version-1 cache)."""

    def __init__(self, recipe: Recipe) -> None:
        from ..recipe import augment_policy, param_names

        self.recipe = recipe
        self.names = param_names(recipe)
        self.layers = augment_policy(recipe.aa).num_layers if recipe.aa else 0
        self.num_ops = len(augment_policy(recipe.aa).ops) if recipe.aa else 0

    def datasets(self) -> Layout:
        """Per-record shape and dtype of every parameter dataset (the file prepends (N, K))."""
        every = {"ra_ops": ((self.layers,), np.dtype(np.int8)), "ra_args": ((self.layers,), np.dtype(np.float32)),
                 "jitter_factors": ((3,), np.dtype(np.float32)), "jitter_order": ((3,), np.dtype(np.uint8)),
                 "erase_boxes": ((4,), np.dtype(np.float32)), "erase_seeds": ((), np.dtype(np.int64)),
                 "mix_partners": ((), np.dtype(np.int64)), "mix_lambdas": ((), np.dtype(np.float32)),
                 "cutmix_boxes": ((4,), np.dtype(np.float32))}
        return {name: every[name] for name in self.names}

    def faults(self, arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        """(what is wrong, mask over the records) for the parameter datasets present in `arrays`."""
        out = []
        if "ra_ops" in arrays:
            ops = np.asarray(arrays["ra_ops"])
            out.append((f"a RandAugment op index is outside [-1, {self.num_ops})",
                        ((ops < -1) | (ops >= self.num_ops)).any(axis=-1)))
            out.append(("a RandAugment argument is not finite", ~np.isfinite(arrays["ra_args"]).all(axis=-1)))
        if "jitter_factors" in arrays:
            f = np.asarray(arrays["jitter_factors"], dtype=np.float64)
            out.append(("a colour-jitter factor is not finite and >= 0", ~(np.isfinite(f) & (f >= 0)).all(axis=-1)))
            out.append(("the colour-jitter order is not a permutation of 0, 1, 2",
                        (np.sort(arrays["jitter_order"], axis=-1) != np.arange(3)).any(axis=-1)))
        for name in ("erase_boxes", "cutmix_boxes"):
            if name in arrays:
                top, left, h, w = np.moveaxis(np.asarray(arrays[name], dtype=np.float64), -1, 0)
                inside = (top >= 0) & (left >= 0) & (h >= 0) & (w >= 0) & (top + h <= 1 + 1e-6) & (left + w <= 1 + 1e-6)
                out.append((f"the {name.replace('_', ' ')[:-2]} is not inside the view", ~inside))
        if "mix_partners" in arrays:
            out.append(("the mixing partner is not a row or -1", np.asarray(arrays["mix_partners"]) < -1))
            lam = np.asarray(arrays["mix_lambdas"], dtype=np.float64)
            out.append(("the mixing lambda is not in [0, 1]", ~((lam >= 0) & (lam <= 1))))
        if "erase_seeds" in arrays:
            out.append(("the erase noise seed is negative", np.asarray(arrays["erase_seeds"]) < 0))
        return out


def params_codec(recipe_json: str) -> ParamsCodec:
    """The codec of a cache's ``recipe`` attribute ('' is the default recipe, with no parameter datasets)."""
    return ParamsCodec(Recipe.from_json(recipe_json))
