"""Shared helpers for the data-layer tests: the real Fashion-MNIST-LT shards (built once per session)
and small hand-made shards written with webdataset's TarWriter, for uneven sizes and injected faults."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ltdist.data.build import build_shards
from ltdist.data.index import ShardInfo, file_sha256, keys_digest, write_index

FMNIST_LT_IF1000_PROFILE = [6000, 2784, 1292, 600, 278, 129, 60, 27, 12, 6]
# Class 0 uses all 6000 of its source images in the profile; 20 of them go to val first.
FMNIST_LT_IF1000_TRAIN = [5980, *FMNIST_LT_IF1000_PROFILE[1:]]


@pytest.fixture(scope="session")
def fmnist_lt(tmp_path_factory) -> Path:
    """index.json of Fashion-MNIST-LT (exp profile, IF 1000, seed 0, 256-sample shards)."""
    out = tmp_path_factory.getbasetemp() / "fmnist_lt"
    if not (out / "index.json").is_file():
        build_shards("fashion-mnist", "", out, imbalance=1000.0, shard_size=256, progress=False)
    return out / "index.json"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fmnist_lt) -> Path:
    """A test module's working directory whose ``shards/`` is the session's Fashion-MNIST-LT (built once)."""
    root = tmp_path_factory.mktemp("work")
    (root / "shards").symlink_to(fmnist_lt.parent)
    return root


def png_bytes(seed: int, size: int = 8, channels: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_custom_shards(out: Path, shards: list[list[dict]], num_classes: int, split: str = "train") -> Path:
    """Write one tar per entry of ``shards`` (each a list of webdataset sample dicts with ``__key__``;
    ``cls`` may be missing or invalid on purpose) and an index.json whose manifest counts every sample
    written. Class counts come from the valid labels; a sample with an invalid label is counted in
    class 0, as the index of a dataset damaged after writing would have it."""
    out.mkdir(parents=True, exist_ok=True)
    infos, counts = [], np.zeros(num_classes, dtype=int)
    for i, samples in enumerate(shards):
        path = out / f"{split}-{i:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for s in samples:
                sink.write(s)
        labels = [_valid_label(s, num_classes) for s in samples]
        per_class = np.bincount(labels, minlength=num_classes)
        counts += per_class
        infos.append(ShardInfo(path.name, len(samples), path.stat().st_size, file_sha256(path),
                               keys_digest([s["__key__"] for s in samples]),
                               {str(j): int(n) for j, n in enumerate(per_class) if n}))
    return write_index(out, [f"c{j}" for j in range(num_classes)], {split: infos}, {split: counts.tolist()}, {})


def _valid_label(sample: dict, num_classes: int) -> int:
    text = sample.get("cls", b"x").decode() if isinstance(sample.get("cls"), bytes) else str(sample.get("cls", "x"))
    return int(text) if text.isdigit() and int(text) < num_classes else 0


def labelled_samples(prefix: str, labels: list[int], seed: int = 0) -> list[dict]:
    return [{"__key__": f"{prefix}_{k:05d}", "png": png_bytes(seed * 100_003 + k), "cls": str(label).encode()}
            for k, label in enumerate(labels)]


def member_offsets(path: Path) -> list[tuple[str, int, int]]:
    """(member name, header offset, data offset) of every member of a tar file."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def write_imagefolder(root: Path, counts: dict[str, list[int]], size: int = 8) -> Path:
    """An ImageFolder tree ``root/<split>/c<j>/<i>.png`` with ``counts[split][j]`` grayscale PNGs per class
    (only the splits given: the common layout is train and test without val). Returns ``root``."""
    for split, per_class in counts.items():
        for j, n in enumerate(per_class):
            folder = root / split / f"c{j}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(png_bytes(1_000_003 * len(split) + 1009 * j + i, size))
    return root
