"""The full augmentation recipe as parameters of a view: sample them, store them, apply them.

Beyond the crop and flip (:mod:`kdcache.augment`), a view of the recipe
(:class:`~kdcache.config.Recipe`) has RandAugment ops, colour jitter, a
randomly erased box and mixing with a partner image (Mixup or CutMix). Every
random decision is drawn by :func:`sample_view` from the view's generator
(:func:`~kdcache.augment.view_rng` of ``(seed, sample id, view)``) and nothing
else, never Python's ``random`` or global numpy/torch state, and returned as a
*record*: a dict of numpy values keyed by the cache's per-view dataset names
(``crops``, ``flips``, then those of :data:`PARAM_NAMES` the recipe uses). A
cache stores the records; :func:`render_view` turns one record (sampled or
stored) into pixels with no random numbers at all, so the dump's teacher, the
online teacher and the cached student get the same float tensor.

The order and meaning follow timm's ``create_transform`` and ``train.py``:
crop and flip, then RandAugment (or colour jitter, which timm turns off under
``--aa`` unless the policy is a '3a' one), then normalisation, then random
erasing on the normalised pixels (timm's ``RandomErasing``, mode 'pixel':
one box of 2-33 % of the area, aspect 0.3-3.3, filled with standard normal
noise drawn from a stored seed), then mixing on the normalised pixels
(timm's ``Mixup`` in its per-sample 'elem' mode: mixed with probability
``mixup_prob``, CutMix instead of mixup with probability
``mixup_switch_prob`` when both are on, lambda from Beta(alpha, alpha), the
CutMix box as timm's ``rand_bbox`` and lambda corrected to the box's area).

The partner (why not a seeded pairing permutation, as the issue suggests):
the view's own generator draws the partner row uniformly from the other rows,
and the partner view is the same view index. The partner's pixels are the
partner's OWN view record (its crop, ops, jitter and erasing, from ``(seed,
partner id, view)`` or its stored record), with the partner's own mixing
ignored, so there is no recursion. This costs one extra decode per mixed view,
and buys exactness for any sampler, batch size (odd ones too), worker count,
process count and users' own loops: a permutation that pairs images would
have to be respected by every sampler (the epoch order and torchrun's shards
would have to move whole pairs), which ``CacheReplay`` users and odd batch
sizes cannot promise. The pairing is not symmetric: image i may mix with j
while j mixes with k, which only changes which partner each view sees.

RandAugment: timm's parsed policy (:func:`augment_policy`) gives the op set,
probabilities, magnitude, noise and layer count, and timm's op functions
(``NAME_TO_OP``, on PIL images) apply the ops; only the choice, the magnitude
noise and the sign are drawn here (timm draws them from Python's global
``random`` inside its ops), and the level-to-argument mapping of the signed
ops is written out in :func:`op_argument` (timm's own mapping negates at
random); tests/test_recipe.py checks it against timm's for both signs. An op's
final argument is stored as float32 and applied as that float32 value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from .augment import Preprocess, apply_crop, normalize, sample_crop
from .config import CropRanges, Recipe
from .errors import ConfigError

# 'trivialaugment' (TrivialAugment Wide, Mueller & Hutter 2021, in timm's terms): one op per image, always applied,
# its magnitude uniform in [0, 10] (mstd > 100 is timm's uniform sampling), from the increasing op set.
AA_ALIASES = {"trivialaugment": "rand-m10-n1-p1-mstd101-inc1"}
_LEVEL_DENOM = 10.0  # timm's magnitude scale: M10 is the full strength
# Ops whose timm level function negates its argument at random: the sign is drawn here instead.
_SIGNED = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45}
_SIGNED_ABS = ("TranslateX", "TranslateY")  # pixels: a fraction 0.45 of the view size (timm's translate_const)
_ENHANCE_INCREASING = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
_INTEGER_ARGS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize", "SolarizeIncreasing",
                 "SolarizeAdd")
_RANDOM_INSIDE = ("GaussianBlurRand",)  # draws from Python's random inside the op: cannot be replayed
ERASE_AREA = (0.02, 1 / 3)  # timm's RandomErasing defaults
ERASE_ASPECT = (0.3, 1 / 0.3)

# The per-view parameters beyond crops and flips, each a dataset of the cache (see kdcache.cache.format).
PARAM_NAMES = ("ra_ops", "ra_args", "jitter_factors", "jitter_order", "erase_boxes", "erase_seeds",
               "mix_partners", "mix_lambdas", "cutmix_boxes")


@dataclass(frozen=True)
class AugmentPolicy:
    """A timm RandAugment policy, read from timm's parsed transform."""

    ops: tuple[str, ...]
    probs: tuple[float, ...]
    magnitude: float
    magnitude_std: float
    magnitude_max: float
    num_layers: int
    weights: tuple[float, ...] | None


@lru_cache(maxsize=None)
def augment_policy(aa: str) -> AugmentPolicy:
    """The RandAugment policy of an ``--aa`` string (timm's 'rand-...' or an alias); ConfigError if it is none."""
    from timm.data.auto_augment import rand_augment_transform

    resolved = AA_ALIASES.get(aa, aa)
    hint = f"--aa must be a timm RandAugment string such as rand-m9-mstd0.5-inc1, or {', '.join(AA_ALIASES)}"
    sections = resolved.split("-")
    if sections[0] != "rand":
        raise ConfigError(f"{hint}; got '{aa}'")
    for section in sections[1:]:  # timm skips a section without a number silently; a typo must not pass
        if not re.fullmatch(r"t\w+|(mstd|mmax|inc|m|n|p)\d+(\.\d+)?", section):
            raise ConfigError(f"{hint}; got '{aa}' (unknown section '{section}')")
    try:
        ra = rand_augment_transform(resolved, {})
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{hint}; got '{aa}' ({e or 'unknown section'})") from None
    if ra.num_layers < 1:
        raise ConfigError(f"--aa '{aa}' applies no op (n{ra.num_layers}); give n1 or more, or leave --aa out")
    names = tuple(op.name for op in ra.ops)
    bad = [n for n in names if n in _RANDOM_INSIDE]
    if bad:
        raise ConfigError(f"--aa '{aa}' uses {bad[0]}, which draws its own random numbers and cannot be replayed")
    first = ra.ops[0]
    weights = None if ra.choice_weights is None else tuple(float(w) for w in ra.choice_weights)
    return AugmentPolicy(ops=names, probs=tuple(float(op.prob) for op in ra.ops), magnitude=float(first.magnitude),
                         magnitude_std=float(first.magnitude_std), magnitude_max=float(first.magnitude_max or 0),
                         num_layers=int(ra.num_layers), weights=weights)


def op_argument(name: str, magnitude: float, sign: int, size: int) -> float:
    """The argument of timm's op `name` at `magnitude` with the sign `sign` (+1 or -1); 0 for ops without one."""
    from timm.data.auto_augment import LEVEL_TO_ARG

    level = magnitude / _LEVEL_DENOM
    if name in _SIGNED:
        return sign * level * _SIGNED[name]
    if name in _SIGNED_ABS:
        return sign * level * float(int(size * 0.45))
    if name in _ENHANCE_INCREASING:
        return max(0.1, 1.0 + sign * level * 0.9)
    fn = LEVEL_TO_ARG[name]
    return 0.0 if fn is None else float(fn(magnitude, {})[0])  # these mappings draw no random numbers


def param_names(recipe: Recipe) -> tuple[str, ...]:
    """The parameters a view of `recipe` has beyond its crop and flip."""
    names = []
    if recipe.aa:
        names += ["ra_ops", "ra_args"]
    if recipe.jitter:
        names += ["jitter_factors", "jitter_order"]
    if recipe.reprob > 0:
        names += ["erase_boxes", "erase_seeds"]
    if recipe.mixing:
        names += ["mix_partners", "mix_lambdas", "cutmix_boxes"]
    return tuple(names)


def sample_view(rng: np.random.Generator, height: int, width: int, ranges: CropRanges, recipe: Recipe,
                num_rows: int, row: int, size: int) -> dict[str, np.ndarray]:
    """Every random decision of one view of an image of `height` x `width`, at input size `size`.

    `row` is the image's row among `num_rows` (a partner is another row). The
    crop and flip are drawn first, exactly as :func:`~kdcache.augment.sample_crop`
    draws them, so the default recipe gives today's crops.
    """
    box, flip = sample_crop(rng, height, width, ranges)
    record: dict[str, np.ndarray] = {"crops": box, "flips": np.bool_(flip)}
    if recipe.aa:
        record.update(_sample_ops(rng, augment_policy(recipe.aa), size))
    if recipe.jitter:
        c = recipe.color_jitter
        record["jitter_order"] = rng.permutation(3).astype(np.uint8)
        record["jitter_factors"] = rng.uniform(max(0.0, 1.0 - c), 1.0 + c, size=3).astype(np.float32)
    if recipe.reprob > 0:
        record.update(_sample_erase(rng, recipe.reprob, size))
    if recipe.mixing:
        record.update(_sample_mix(rng, recipe, num_rows, row, size))
    return record


def _sample_ops(rng: np.random.Generator, policy: AugmentPolicy, size: int) -> dict[str, np.ndarray]:
    """timm's RandAugment.__call__ and AugmentOp.__call__, drawn from `rng`: -1 marks a layer whose op was skipped."""
    chosen = rng.choice(len(policy.ops), policy.num_layers, replace=policy.weights is None,
                        p=None if policy.weights is None else np.asarray(policy.weights))
    ops = np.full(policy.num_layers, -1, dtype=np.int8)
    args = np.zeros(policy.num_layers, dtype=np.float32)
    for layer, index in enumerate(chosen):
        prob = policy.probs[index]
        if prob < 1.0 and rng.random() > prob:
            continue
        m = policy.magnitude
        if math.isinf(policy.magnitude_std):
            m = rng.uniform(0.0, m)
        elif policy.magnitude_std > 0:
            m = rng.normal(m, policy.magnitude_std)
        m = max(0.0, min(m, policy.magnitude_max or _LEVEL_DENOM))
        sign = -1 if rng.random() > 0.5 else 1
        ops[layer] = index
        args[layer] = op_argument(policy.ops[index], m, sign, size)
    return {"ra_ops": ops, "ra_args": args}


def _sample_erase(rng: np.random.Generator, prob: float, size: int) -> dict[str, np.ndarray]:
    """timm's RandomErasing (one box) on a size x size view; a zero box when the view is not erased."""
    box = np.zeros(4, dtype=np.float32)
    seed = np.int64(0)
    if rng.random() < prob:
        area = size * size
        log_lo, log_hi = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
        for _ in range(10):
            target = rng.uniform(*ERASE_AREA) * area
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < size and h < size:
                top = int(rng.integers(0, size - h + 1))
                left = int(rng.integers(0, size - w + 1))
                box = np.array([top, left, h, w], dtype=np.float32) / np.float32(size)
                seed = np.int64(rng.integers(0, 2**63 - 1))
                break
    return {"erase_boxes": box, "erase_seeds": seed}


def _sample_mix(rng: np.random.Generator, recipe: Recipe, num_rows: int, row: int,
                size: int) -> dict[str, np.ndarray]:
    """timm's Mixup in 'elem' mode for one view: partner row (-1: not mixed), lambda and the CutMix box."""
    out = {"mix_partners": np.int64(-1), "mix_lambdas": np.float32(1.0), "cutmix_boxes": np.zeros(4, np.float32)}
    if num_rows < 2 or rng.random() >= recipe.mixup_prob:
        return out
    if recipe.mixup > 0 and recipe.cutmix > 0:
        cut = bool(rng.random() < recipe.mixup_switch_prob)
    else:
        cut = recipe.cutmix > 0
    alpha = recipe.cutmix if cut else recipe.mixup
    lam = float(rng.beta(alpha, alpha))
    partner = int(rng.integers(0, num_rows - 1))
    partner += partner >= row  # uniform over the other rows
    if cut:  # timm's rand_bbox, then lambda corrected to the box's area
        ratio = math.sqrt(1.0 - lam)
        cut_h = cut_w = int(size * ratio)
        cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, size)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, size)
        out["cutmix_boxes"] = np.array([top, left, bottom - top, right - left], dtype=np.float32) / np.float32(size)
        lam = 1.0 - float((bottom - top) * (right - left)) / (size * size)
    out.update(mix_partners=np.int64(partner), mix_lambdas=np.float32(lam))
    return out


def _pixel_box(box: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """A stored box (fractions of the view) in whole pixels of a size x size view."""
    return tuple(int(round(float(v) * size)) for v in box)  # type: ignore[return-value]


def _apply_ops(image: torch.Tensor, ops: np.ndarray, args: np.ndarray, policy: AugmentPolicy,
               prep: Preprocess) -> torch.Tensor:
    from timm.data.auto_augment import NAME_TO_OP
    from timm.data.transforms import str_to_pil_interp

    if (ops < 0).all():
        return image
    kwargs = {"fillcolor": tuple(min(255, round(255 * m)) for m in prep.mean),
              "resample": str_to_pil_interp(prep.interpolation)}
    pil = TF.to_pil_image(image)
    for index, arg in zip(ops.tolist(), args.tolist()):
        if index < 0:
            continue
        name = policy.ops[index]
        level = () if name in ("AutoContrast", "Equalize", "Invert") else \
            (int(arg) if name in _INTEGER_ARGS else arg,)
        if name.startswith("Posterize") and level[0] <= 0:
            # Keeping 0 bits makes the image black; Pillow >= 11 refuses bits=0, which timm's op would pass it.
            pil = Image.new(pil.mode, pil.size)
            continue
        pil = NAME_TO_OP[name](pil, *level, **kwargs)
    return TF.pil_to_tensor(pil)


_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def view_pixels(image: torch.Tensor, record: dict, prep: Preprocess, recipe: Recipe) -> torch.Tensor:
    """One view's own normalised float32 pixels (3,S,S) from its record: crop, ops or jitter, normalise, erase."""
    x = apply_crop(image, record["crops"], bool(record["flips"]), prep)
    if "ra_ops" in record:
        x = _apply_ops(x, np.asarray(record["ra_ops"]), np.asarray(record["ra_args"]), augment_policy(recipe.aa),
                       prep)
    if "jitter_order" in record:
        factors = np.asarray(record["jitter_factors"])
        for i in np.asarray(record["jitter_order"]).tolist():
            x = _JITTER[i](x, float(factors[i]))
    x = normalize(x[None], prep)[0]
    if "erase_boxes" in record:
        top, left, h, w = _pixel_box(record["erase_boxes"], prep.size)
        if h > 0 and w > 0:
            noise = torch.Generator().manual_seed(int(record["erase_seeds"]))
            x[:, top:top + h, left:left + w] = torch.randn((x.shape[0], h, w), generator=noise, dtype=x.dtype)
    return x


def mix(x: torch.Tensor, partner: torch.Tensor, record: dict, size: int) -> torch.Tensor:
    """`x` mixed with its partner's pixels: the CutMix box pasted, or mixup with the stored lambda."""
    top, left, h, w = _pixel_box(record["cutmix_boxes"], size)
    if h > 0 or w > 0:
        out = x.clone()
        out[:, top:top + h, left:left + w] = partner[:, top:top + h, left:left + w]
        return out
    lam = float(np.float32(record["mix_lambdas"]))
    return x * lam + partner * (1.0 - lam)


def is_mixed(record: dict) -> bool:
    return "mix_partners" in record and int(record["mix_partners"]) >= 0


def render_view(image: torch.Tensor, record: dict, prep: Preprocess, recipe: Recipe,
                partner: tuple[torch.Tensor, dict] | None = None) -> torch.Tensor:
    """The view's final pixels from its record; `partner` (image, partner's record) when the view is mixed."""
    x = view_pixels(image, record, prep, recipe)
    if is_mixed(record):
        if partner is None:
            raise ValueError("a mixed view needs its partner's image and record")
        x = mix(x, view_pixels(partner[0], partner[1], prep, recipe), record, prep.size)
    return x


def stack_records(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Records stacked along a new first axis, one array per dataset."""
    return {name: np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}


def sample_records(seed: int, rows: np.ndarray, ids: np.ndarray, sizes: Sequence[tuple[int, int]], view: int,
                   ranges: CropRanges, recipe: Recipe, num_rows: int, size: int) -> dict[str, np.ndarray]:
    """The records of view `view` of `rows` (sample ids `ids`, images of `sizes`), stacked: :func:`sample_view`."""
    from .augment import view_rng

    return stack_records([sample_view(view_rng(seed, sid, view), h, w, ranges, recipe, num_rows, int(row), size)
                          for row, sid, (h, w) in zip(rows, ids, sizes)])


# The libraries whose code makes a recipe's pixels (resizing, the RandAugment ops, colour jitter).
PIXEL_LIBRARIES = ("torchvision", "Pillow")


def replay_notes(asked: Recipe, dumped: Recipe, attrs: dict, path: object) -> list[str]:
    """What a run replaying a cache (`dumped` recipe, root `attrs`) should be told: recipe options `asked` that
    are not the cache's (its own recipe is replayed) and other versions of the libraries that make the pixels."""
    import json

    from .cache.format import library_versions

    notes = []
    if asked != dumped and not asked.is_default:
        notes.append(f"{path} replays the recipe it was dumped with ({dumped.to_json() or 'crop and flip only'}); "
                     "the recipe options given here are not used")
    try:
        then, now = json.loads(str(attrs.get("library_versions") or "{}")), json.loads(library_versions())
    except ValueError:
        return notes
    return notes + [f"{path} was dumped with {name} {then[name]}, this run has {now[name]}: the replayed pixels may "
                    "differ slightly from the ones the teacher saw"
                    for name in PIXEL_LIBRARIES if name in then and then[name] != now[name]]
