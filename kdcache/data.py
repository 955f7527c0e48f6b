"""Image datasets with stable sample ids, labels and a content fingerprint.

Three sources, chosen by the `--data` value:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10
  classes), upscaled once to 32x32 RGB so crops have pixels to work with.
  Fixed split: image ``i`` (in ``load_digits`` order) is a test image when
  ``i % 4 == 3``, else a training image (1,348 train, 449 test). The sample id is
  ``i``.
* an **ImageFolder** root: ``ROOT/train/<class>/*.jpg`` and ``ROOT/test/`` (or
  ``ROOT/val/``) with the same class folders.
* a **Stanford 40 Actions** root, recognised by its ``ImageSplits/`` folder:
  ``ImageSplits/actions.txt``, ``ImageSplits/<action>_{train,test}.txt`` and
  ``JPEGImages/<file>``.

Files are listed in sorted order of their relative path, and a file's sample id
is a 63-bit hash of that relative path, so ids never depend on how the file
system lists a folder, on worker count or on batch order.

The fingerprint is a SHA-256 over the split's class names, ids, labels and a
per-sample content hash. It is stored in a cache and checked when the cache is
used, so a different dataset, split, order or a changed image is caught. The
content hash has a named scheme, which a cache records with its fingerprint:

* ``blake2b-file`` (new dumps): BLAKE2b over the file's size and all its bytes;
* ``head-tail-64k`` (caches written before): the file's size and its first and
  last 64 KiB only, so a change in the middle of a large image went unseen.

Digits hash their pixels under either scheme.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from .errors import DataError

# torchvision's decoders (libjpeg-turbo, libpng) are about 3x faster than PIL on small images.
# torchvision 0.29 deprecates them in favour of torchcodec; PIL takes over where they are gone.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _tv_decode
except ImportError:
    _tv_decode = None
_TV_SUFFIXES = {".jpg", ".jpeg", ".png"}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
DIGITS_SIZE = 32  # the 8x8 digits are upscaled to this once, at load time
_HASH_SPAN = 64 * 1024  # bytes hashed from each end of a file by the old scheme
_READ_BLOCK = 1024**2  # bytes read at a time when a whole file is hashed

HEAD_TAIL = "head-tail-64k"
WHOLE_FILE = "blake2b-file"
CONTENT_HASH_SCHEMES = (WHOLE_FILE, HEAD_TAIL)  # the first is the one new caches use


def _hash64(data: bytes) -> int:
    """A 63-bit non-negative integer hash (fits int64 and numpy seeds)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class ImageSet:
    """One split of a dataset: ids, labels, class names and image loading."""

    name: str
    split: str
    classes: list[str]
    ids: np.ndarray  # int64, one per sample, stable
    labels: np.ndarray  # int64 class indices

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self, index: int) -> torch.Tensor:
        """The image at row `index` as a uint8 RGB tensor (3, H, W)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable name of row `index`, for error messages."""
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the image at row `index`, as :meth:`load` gives it."""
        shape = self.load(index).shape
        return int(shape[-2]), int(shape[-1])

    def _content_hash(self, index: int, scheme: str) -> int:
        raise NotImplementedError

    @property
    def content_hash_scheme(self) -> str:
        """The scheme of :attr:`content_hashes` and :attr:`fingerprint`: the one a new cache records."""
        return CONTENT_HASH_SCHEMES[0]

    @property
    def content_hashes(self) -> np.ndarray:
        """Per-sample content hashes (uint64) of the current scheme."""
        return self.content_hashes_for(self.content_hash_scheme)

    @property
    def fingerprint(self) -> str:
        """The dataset fingerprint of the current scheme."""
        return self.fingerprint_for(self.content_hash_scheme)

    @cached_property
    def _hashes(self) -> dict[str, np.ndarray]:
        return {}

    def content_hashes_for(self, scheme: str) -> np.ndarray:
        """Per-sample content hashes (uint64) of `scheme` (one of CONTENT_HASH_SCHEMES), computed once."""
        if scheme not in CONTENT_HASH_SCHEMES:
            raise DataError(f"unknown content hash scheme '{scheme}' (this kdcache knows "
                            f"{', '.join(CONTENT_HASH_SCHEMES)}); a newer kdcache wrote it, use that")
        if scheme not in self._hashes:
            self._hashes[scheme] = np.array([self._content_hash(i, scheme) for i in range(len(self))],
                                            dtype=np.uint64)
        return self._hashes[scheme]

    def fingerprint_for(self, scheme: str) -> str:
        """SHA-256 over classes, ids, labels and the content hashes of `scheme`, as hex."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode())
        h.update(np.ascontiguousarray(self.ids, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.content_hashes_for(scheme), dtype="<u8").tobytes())
        return h.hexdigest()


class DigitsSet(ImageSet):
    """scikit-learn's digits, served as 32x32 RGB uint8 images."""

    def __init__(self, split: str) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        index = np.arange(len(bunch.target))
        keep = (index % 4 == 3) if split == "test" else (index % 4 != 3)
        pixels = torch.from_numpy(bunch.images[keep]).float().div(16.0)  # 0..16 -> 0..1
        big = torch.nn.functional.interpolate(
            pixels[:, None], size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False
        )
        self._images = big.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        self.name = "digits"
        self.split = split
        self.classes = [str(d) for d in range(10)]
        self.ids = index[keep].astype(np.int64)
        self.labels = bunch.target[keep].astype(np.int64)

    def load(self, index: int) -> torch.Tensor:
        return self._images[index]

    def describe(self, index: int) -> str:
        return f"digits image {int(self.ids[index])}"

    def _content_hash(self, index: int, scheme: str) -> int:
        return _hash64(self._images[index].numpy().tobytes())  # the pixels, under every scheme


class FileImageSet(ImageSet):
    """Images stored as files, one label each."""

    def __init__(self, name: str, split: str, root: Path, classes: list[str], files: list[tuple[str, int]]) -> None:
        files = sorted(files)
        self.name = name
        self.split = split
        self.root = root
        self.classes = classes
        self.relpaths = [rel for rel, _ in files]
        self.labels = np.array([label for _, label in files], dtype=np.int64)
        self.ids = np.array([_hash64(rel.encode()) for rel in self.relpaths], dtype=np.int64)
        if len(np.unique(self.ids)) != len(self.ids):  # 63-bit collision: astronomically rare
            raise DataError(f"{root}: two file names hash to the same sample id; rename one of them")

    def path(self, index: int) -> Path:
        return self.root / self.relpaths[index]

    def describe(self, index: int) -> str:
        return str(self.path(index))

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) from the file's header, without decoding it (decoding applies no EXIF rotation)."""
        try:
            with Image.open(self.path(index)) as im:
                width, height = im.size
        except Exception:  # unreadable here: load() words the error, or decodes what PIL's header reader cannot
            return super().image_size(index)
        return int(height), int(width)

    def load(self, index: int) -> torch.Tensor:
        path = self.path(index)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
        if _tv_decode is not None and path.suffix.lower() in _TV_SUFFIXES:
            try:
                return _tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError):
                pass  # let PIL try, and word the error if it fails too
        try:
            with Image.open(io.BytesIO(data)) as im:
                return pil_to_tensor(im.convert("RGB"))
        except Exception as e:  # PIL raises several types for a broken file
            raise DataError(f"cannot decode image {path}: {e}") from None

    def _content_hash(self, index: int, scheme: str) -> int:
        path = self.path(index)
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                f.seek(0)
                if scheme == HEAD_TAIL:
                    head = f.read(_HASH_SPAN)
                    f.seek(max(size - _HASH_SPAN, _HASH_SPAN))
                    return _hash64(size.to_bytes(8, "little") + head + f.read())
                h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=8)
                while block := f.read(_READ_BLOCK):
                    h.update(block)
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
        return int.from_bytes(h.digest(), "little") >> 1


def _list_images(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def open_image_folder(root: Path, split: str) -> FileImageSet:
    """An ImageFolder split: ``root/train/<class>/*`` or ``root/test|val/<class>/*``."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train/ folder; an ImageFolder root needs train/ and test/ (or val/)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders found")
    if split == "train":
        split_dir = train_dir
    else:
        candidates = [root / "test", root / "val"]
        found = [c for c in candidates if c.is_dir()]
        if not found:
            raise DataError(f"{root}: no test/ or val/ folder to evaluate on")
        split_dir = found[0]
    files: list[tuple[str, int]] = []
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if folder.name not in classes:
            raise DataError(f"{folder}: class folder not present in {train_dir}")
        images = _list_images(folder)
        if not images:
            raise DataError(f"{folder}: empty class folder (no {'/'.join(sorted(IMAGE_SUFFIXES))} files)")
        label = classes.index(folder.name)
        files += [(p.relative_to(split_dir).as_posix(), label) for p in images]
    if not files:
        raise DataError(f"{split_dir}: no images found")
    return FileImageSet(f"imagefolder:{root.name}", split, split_dir, classes, files)


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def stanford40_actions(splits: Path) -> list[str]:
    """The action names, in the order of ``actions.txt``, checked against the split files.

    ``actions.txt`` may carry a header line and an image count per action; only
    the first column of lines that name an action with a ``_train.txt`` file
    counts.
    """
    with_files = sorted(p.name[: -len("_train.txt")] for p in splits.glob("*_train.txt"))
    listed_path = splits / "actions.txt"
    if not listed_path.exists():
        actions = with_files
    else:
        actions = []
        for i, line in enumerate(_read_lines(listed_path)):
            name = line.split()[0]
            if name in with_files:
                actions.append(name)
            elif i > 0 or (splits / f"{name}_test.txt").exists():
                raise DataError(f"{listed_path}: action '{name}' has no {name}_train.txt in {splits}")
            # else: a header line such as "action_name  number_of_images"
        missing = sorted(set(with_files) - set(actions))
        if missing:
            raise DataError(f"{listed_path}: does not list {', '.join(missing)}, which have split files")
    if not actions:
        raise DataError(f"{splits}: no <action>_train.txt files found")
    return actions


def open_stanford40(root: Path, split: str) -> FileImageSet:
    """A Stanford 40 Actions split from ``ImageSplits/<action>_<split>.txt``."""
    splits, images = root / "ImageSplits", root / "JPEGImages"
    if not images.is_dir():
        raise DataError(f"{root}: has ImageSplits/ but no JPEGImages/ folder")
    actions = stanford40_actions(splits)
    files: list[tuple[str, int]] = []
    seen: dict[str, str] = {}
    for label, action in enumerate(actions):
        list_path = splits / f"{action}_{split}.txt"
        if not list_path.exists():
            raise DataError(f"{list_path}: split file missing")
        names = _read_lines(list_path)
        if not names:
            raise DataError(f"{list_path}: lists no images")
        for name in names:
            if name in seen:
                raise DataError(f"{list_path}: {name} is also listed for action '{seen[name]}'")
            seen[name] = action
            if not (images / name).is_file():
                raise DataError(f"{list_path}: lists {name}, but {images / name} does not exist")
            files.append((name, label))
    return FileImageSet(f"stanford40:{root.name}", split, images, actions, files)


def open_dataset(spec: str, split: str) -> ImageSet:
    """The `split` ('train' or 'test') of the dataset named by `spec`.

    `spec` is ``digits`` or a folder path: a Stanford 40 root (it has
    ``ImageSplits/``) or an ImageFolder root (it has ``train/``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec == "digits":
        return DigitsSet(split)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist (use 'digits', an ImageFolder root or a Stanford 40 root)")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder")
    if (root / "ImageSplits").is_dir():
        return open_stanford40(root.resolve(), split)
    return open_image_folder(root.resolve(), split)
