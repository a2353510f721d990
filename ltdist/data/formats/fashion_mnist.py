"""Fashion-MNIST IDX files -> Fashion-MNIST-LT (long-tailed train, held-out val, balanced test)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ltdist.data.formats.longtail import long_tail_split, profile_counts
from ltdist.data.writer import SourceSample

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """Read a (optionally gzipped) IDX file of unsigned bytes: [N] labels or [N, 28, 28] images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(src: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {src}")


def load(src: str, *, profile: str, imbalance: float, val_per_class: int, seed: int
         ) -> tuple[list[str], dict[str, list[SourceSample]]]:
    root = Path(src or DEFAULT_SRC)
    tr_x, tr_y = read_idx(_find(root, "train-images-idx3-ubyte")), read_idx(_find(root, "train-labels-idx1-ubyte"))
    te_x, te_y = read_idx(_find(root, "t10k-images-idx3-ubyte")), read_idx(_find(root, "t10k-labels-idx1-ubyte"))
    counts = profile_counts(int(np.bincount(tr_y).max()), len(CLASSES), imbalance, profile)
    train_idx, val_idx = long_tail_split(tr_y, counts, val_per_class, seed)

    def samples(prefix: str, x: np.ndarray, y: np.ndarray, idx) -> list[SourceSample]:
        return [SourceSample(f"{prefix}{i:05d}", int(y[i]), x[i]) for i in idx]

    return CLASSES, {
        "train": samples("fmnist_train_", tr_x, tr_y, train_idx),
        "val": samples("fmnist_train_", tr_x, tr_y, val_idx),
        "test": samples("fmnist_test_", te_x, te_y, range(len(te_y))),
    }
