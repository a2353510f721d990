"""Raw dataset -> webdataset shards + index.json, as a library call (the CLI is :mod:`ltdist.data.shards`)."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

from ltdist.data.formats import cifar, fashion_mnist, imagefolder, inat2018, listfile, synthetic
from ltdist.data.published import PUBLISHED, differences, guess_published
from ltdist.data.writer import SourceSample, write_shards

FORMATS = ("fashion-mnist", "imagefolder", "list", "inat2018", "cifar", "synthetic")
# The shard writer's rule: shards of at most DEFAULT_SHARD_SIZE samples, smaller when train would otherwise
# get fewer than MIN_TRAIN_SHARDS shards. 16 covers one node of 8 GPUs × 2 loader workers; more slots than
# shards still work (the stream then reads shards as sample ranges, ltdist.data.plan), at more reads per shard.
DEFAULT_SHARD_SIZE = 1000
MIN_TRAIN_SHARDS = 16
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


def check_source(fmt: str, src: str, *, split_files: dict[str, str] | None = None, published: str = "",
                 profile: str = "exp", imbalance: float = 100.0, seed: int = 0) -> tuple[str, list[str]]:
    """Compare a source's entries with a published split (:mod:`ltdist.data.published`) from its list files,
    json or pickles alone, before any image is opened. ``published``: a ``PUBLISHED`` key (empty: guessed).
    Returns (the data set compared with, every difference; [] when they match)."""
    split_files = split_files or {}
    if fmt == "list":
        if "train" not in split_files:
            raise ValueError("list format needs --split-file train=LIST (and optionally val=, test=)")
        entries = {split: listfile.read_list(Path(f)) for split, f in split_files.items()}
    elif fmt == "inat2018":
        entries = inat2018.read_annotations(split_files)[1]
    elif fmt == "cifar":
        _, samples = cifar.load(src, profile=profile, imbalance=imbalance, val_per_class=0, seed=seed)
        entries = {split: [(s.key, s.label) for s in v] for split, v in samples.items() if split != "val"}
    else:
        raise ValueError(f"--check compares list, inat2018 and cifar sources with their published splits, not {fmt}")
    labels = {split: [label for _, label in pairs] for split, pairs in entries.items()}
    num_classes = 1 + max(max(v, default=-1) for v in labels.values())
    key = published or guess_published(fmt, split_files, num_classes, imbalance)
    if key not in PUBLISHED:
        raise ValueError(f"--check: which published split is this? pass --published one of {', '.join(PUBLISHED)}")
    keys = {split: [path for path, _ in pairs] for split, pairs in entries.items()}
    return PUBLISHED[key].name, differences(PUBLISHED[key], labels, keys)


def build_shards(
    fmt: str, src: str, out: Path, *, profile: str = "exp", imbalance: float = 1000.0, val_per_class: int = 20,
    seed: int = 0, split_files: dict[str, str] | None = None, shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1,
    resize_short: int = 0, progress: bool = True, min_train_shards: int = 1,
    synthetic_classes: int = synthetic.INAT_CLASSES, test_per_class: int = 3, image_size: int = 32,
    train_images: int = 0,
) -> Path:
    """Convert a raw dataset into ``out/{split}-*.tar`` + ``out/index.json``; return the index path.

    ``shard_size`` is the most samples per shard; it shrinks to ⌊train samples / ``min_train_shards``⌋ (at
    least 1) when train would otherwise have fewer than ``min_train_shards`` shards. The stream deals train
    shards to ranks × loader workers: with at least that many shards every slot reads whole shards (with
    fewer it reads them as sample ranges, which rereads each shard's tar once per range).
    """
    if min_train_shards < 1:
        raise ValueError(f"min_train_shards must be >= 1, got {min_train_shards}")
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
