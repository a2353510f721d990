"""Raw dataset -> webdataset shards + index.json, as a library call (the CLI is :mod:`ltdist.data.shards`)."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

from ltdist.data.formats import cifar, fashion_mnist, imagefolder, inat2018, listfile, synthetic
from ltdist.data.writer import SourceSample, write_shards

FORMATS = ("fashion-mnist", "imagefolder", "list", "inat2018", "cifar", "synthetic")
# Formats whose reader makes the val split itself (left-over images of the long-tail cut, or generated).
HOLDS_OUT_VAL = ("fashion-mnist", "cifar", "synthetic")

log = logging.getLogger(__name__)


def carve_val(train: list[SourceSample], val_per_class: int, seed: int
              ) -> tuple[list[SourceSample], list[SourceSample]]:
    """Move ``val_per_class`` seeded-random images of each class from train to a new val split.

    A class gives at most half of its images (rounded down), so a tail class keeps most of what it has and
    a class of one image keeps it; those classes are named in one warning. Returns (train, val), each in
    the input order.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(train):
        by_class[s.label].append(i)
    rng = random.Random(f"{seed}-carve-val")
    moved: set[int] = set()
    short = []
    for label in sorted(by_class):
        idx = by_class[label]
        take = min(val_per_class, len(idx) // 2)
        if take < val_per_class:
            short.append((label, take))
        moved.update(rng.sample(idx, take))
    if short:
        log.warning("val carved from train: classes with fewer than %d val images (class, got), to keep at "
                    "least half of each class for training: %s", val_per_class, short)
    return ([s for i, s in enumerate(train) if i not in moved], [s for i, s in enumerate(train) if i in moved])


def load_source(
    fmt: str, src: str, *, profile: str = "exp", imbalance: float = 1000.0, val_per_class: int = 20,
    seed: int = 0, split_files: dict[str, str] | None = None, synthetic_classes: int = synthetic.INAT_CLASSES,
    test_per_class: int = 3, image_size: int = 32, train_images: int = 0,
) -> tuple[list[str], dict[str, list[SourceSample]]]:
    """Class names and per-split samples of a raw dataset in format ``fmt`` (``synthetic_classes``,
    ``test_per_class``, ``image_size`` and ``train_images`` are the synthetic source's)."""
    if fmt == "fashion-mnist":
        return fashion_mnist.load(src, profile=profile, imbalance=imbalance, val_per_class=val_per_class,
                                  seed=seed)
    if fmt == "cifar":
        return cifar.load(src, profile=profile, imbalance=imbalance, val_per_class=val_per_class, seed=seed)
    if fmt == "imagefolder":
        return imagefolder.load(src)
    if fmt == "list":
        return listfile.load(src, split_files or {})
    if fmt == "inat2018":
        return inat2018.load(src, split_files or {})
    if fmt == "synthetic":
        return synthetic.load(classes=synthetic_classes, imbalance=imbalance, val_per_class=val_per_class,
                              test_per_class=test_per_class, image_size=image_size, seed=seed,
                              train_images=train_images)
    raise ValueError(f"unknown shard format {fmt!r}; one of {', '.join(FORMATS)}")


def build_shards(
    fmt: str, src: str, out: Path, *, profile: str = "exp", imbalance: float = 1000.0, val_per_class: int = 20,
    seed: int = 0, split_files: dict[str, str] | None = None, shard_size: int = 1000, workers: int = 1,
    resize_short: int = 0, progress: bool = True, min_train_shards: int = 1,
    synthetic_classes: int = synthetic.INAT_CLASSES, test_per_class: int = 3, image_size: int = 32,
    train_images: int = 0,
) -> Path:
    """Convert a raw dataset into ``out/{split}-*.tar`` + ``out/index.json``; return the index path.

    ``shard_size`` shrinks when train would otherwise have fewer than ``min_train_shards`` shards: the
    stream deals whole train shards to ranks × loader workers, so a small data set needs small shards.
    """
    classes, splits = load_source(fmt, src, profile=profile, imbalance=imbalance, val_per_class=val_per_class,
                                  seed=seed, split_files=split_files, synthetic_classes=synthetic_classes,
                                  test_per_class=test_per_class, image_size=image_size, train_images=train_images)
    build = {"format": fmt, "src": src, "seed": seed, "resize_short": resize_short}
    if fmt == "synthetic":
        build.update(imbalance=imbalance, val_per_class=val_per_class, classes=synthetic_classes,
                     test_per_class=test_per_class, image_size=image_size, train_images=len(splits["train"]))
    elif fmt in HOLDS_OUT_VAL:
        build.update(profile=profile, imbalance=imbalance, val_per_class=val_per_class)
    elif "val" not in splits and val_per_class > 0:
        # The common layout (train/ and test/ only): without this the train stage had no val split.
        splits["train"], splits["val"] = carve_val(splits["train"], val_per_class, seed)
        build.update(val_per_class=val_per_class, val_carved_from_train=True)
        log.info("no val split in %s: carved %d images (up to %d per class) from train", src,
                 len(splits["val"]), val_per_class)
    shard_size = max(1, min(shard_size, len(splits["train"]) // min_train_shards))
    build["shard_size"] = shard_size
    return write_shards(out, classes, splits, shard_size=shard_size, workers=workers,
                        resize_short=resize_short, seed=seed, build=build, progress=progress)
