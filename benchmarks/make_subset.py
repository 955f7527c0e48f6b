"""Make a class-balanced ImageFolder subset (symlinks) of an extracted dataset.

    python benchmarks/make_subset.py SRC DST --train-per-class 1000 [--test-per-class N]

SRC has train/ and test/ (or val/) class folders, as ../shared/data's CIFAR-10
and Imagenette archives do after extraction. The first N files of each class
in sorted order are linked, so the subset is the same on every machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def link_split(src: Path, dst: Path, per_class: int | None) -> int:
    count = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        target = dst / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for f in files[:per_class] if per_class else files:
            link = target / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--train-per-class", type=int, required=True)
    parser.add_argument("--test-per-class", type=int, default=None, help="default: every test image")
    args = parser.parse_args()
    test_name = "test" if (args.src / "test").is_dir() else "val"
    n_train = link_split(args.src / "train", args.dst / "train", args.train_per_class)
    n_test = link_split(args.src / test_name, args.dst / "test", args.test_per_class)
    print(f"{args.dst}: {n_train} train and {n_test} test images")


if __name__ == "__main__":
    main()
