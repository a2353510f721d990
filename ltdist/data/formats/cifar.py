"""CIFAR-10/100 python pickles -> CIFAR-LT (n_i = int(n_max · IF^(−i/(C−1))) in label order)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ltdist.data.formats.longtail import long_tail_split, profile_counts
from ltdist.data.writer import SourceSample


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's own format is a pickle of dicts, lists and numpy arrays: only what builds those may load, so a
    planted ``__reduce__`` payload in a downloaded file raises instead of running."""

    _allowed = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")})

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR file refers to {module}.{name}; only numpy arrays are allowed")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            return _ArraysOnly(f, encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"cifar: {path}: {e}") from e


def _images(batch: dict) -> np.ndarray:
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def load(src: str, *, profile: str, imbalance: float, val_per_class: int, seed: int
         ) -> tuple[list[str], dict[str, list[SourceSample]]]:
    """``src`` is ``cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta) or
    ``cifar-100-python`` (train, test, meta)."""
    root = Path(src)
    if (root / "batches.meta").is_file():
        names = [n.decode() for n in _unpickle(root / "batches.meta")[b"label_names"]]
        train = [_unpickle(root / f"data_batch_{i}") for i in range(1, 6)]
        test, key = _unpickle(root / "test_batch"), b"labels"
    elif (root / "meta").is_file():
        names = [n.decode() for n in _unpickle(root / "meta")[b"fine_label_names"]]
        train, test, key = [_unpickle(root / "train")], _unpickle(root / "test"), b"fine_labels"
    else:
        raise FileNotFoundError(f"cifar: {root} has neither batches.meta (CIFAR-10) nor meta (CIFAR-100)")
    tr_x = np.concatenate([_images(b) for b in train])
    tr_y = np.concatenate([np.asarray(b[key]) for b in train])
    te_x, te_y = _images(test), np.asarray(test[key])
    counts = profile_counts(int(np.bincount(tr_y, minlength=len(names)).max()), len(names), imbalance, profile)
    train_idx, val_idx = long_tail_split(tr_y, counts, val_per_class, seed)
    return names, {
        "train": [SourceSample(f"cifar_train_{i:05d}", int(tr_y[i]), tr_x[i]) for i in train_idx],
        "val": [SourceSample(f"cifar_train_{i:05d}", int(tr_y[i]), tr_x[i]) for i in val_idx],
        "test": [SourceSample(f"cifar_test_{i:05d}", int(te_y[i]), te_x[i]) for i in range(len(te_y))],
    }
