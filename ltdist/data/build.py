"""Raw dataset -> webdataset shards + index.json, as a library call (the CLI is :mod:`ltdist.data.shards`)."""

from __future__ import annotations

from pathlib import Path

from ltdist.data.formats import cifar, fashion_mnist, imagefolder, inat2018, listfile
from ltdist.data.writer import SourceSample, write_shards

FORMATS = ("fashion-mnist", "imagefolder", "list", "inat2018", "cifar")


def load_source(
    fmt: str, src: str, *, profile: str = "exp", imbalance: float = 1000.0, val_per_class: int = 20,
    seed: int = 0, split_files: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, list[SourceSample]]]:
    """Class names and per-split samples of a raw dataset in format ``fmt``."""
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
    raise ValueError(f"unknown shard format {fmt!r}; one of {', '.join(FORMATS)}")


def build_shards(
    fmt: str, src: str, out: Path, *, profile: str = "exp", imbalance: float = 1000.0, val_per_class: int = 20,
    seed: int = 0, split_files: dict[str, str] | None = None, shard_size: int = 1000, workers: int = 1,
    resize_short: int = 0, progress: bool = True,
) -> Path:
    """Convert a raw dataset into ``out/{split}-*.tar`` + ``out/index.json``; return the index path."""
    classes, splits = load_source(fmt, src, profile=profile, imbalance=imbalance, val_per_class=val_per_class,
                                  seed=seed, split_files=split_files)
    build = {"format": fmt, "src": src, "seed": seed, "shard_size": shard_size, "resize_short": resize_short}
    if fmt in ("fashion-mnist", "cifar"):
        build.update(profile=profile, imbalance=imbalance, val_per_class=val_per_class)
    return write_shards(out, classes, splits, shard_size=shard_size, workers=workers,
                        resize_short=resize_short, seed=seed, build=build, progress=progress)
