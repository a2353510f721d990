"""Long-tail subsampling of a balanced training set (Fashion-MNIST-LT, CIFAR-LT)."""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def profile_counts(n_max: int, num_classes: int, imbalance: float, profile: str = "exp") -> list[int]:
    """Per-class counts n_0 >= ... >= n_{C-1}, with n_0 = n_max and n_0 / n_{C-1} = ``imbalance``.

    exp:    n_i = int(n_max · IF^(−i/(C−1)))            (the standard CIFAR-LT construction)
    pareto: n_i = int(n_max · (i+1)^(−a)), a = ln IF / ln C  (a power law with the same end points)
    """
    if imbalance < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance}")
    if num_classes < 2:
        return [n_max] * num_classes
    # The epsilon keeps exact products (6000 · 1000^(−1/3) = 600) from flooring to 599.
    if profile == "exp":
        raw = [n_max * imbalance ** (-i / (num_classes - 1)) for i in range(num_classes)]
    elif profile == "pareto":
        a = math.log(imbalance) / math.log(num_classes)
        raw = [n_max * (i + 1) ** (-a) for i in range(num_classes)]
    else:
        raise ValueError(f"unknown long-tail profile {profile!r} (exp | pareto)")
    return [max(1, int(x + 1e-9)) for x in raw]


def counts_with_total(classes: int, total: int, n_max: int, n_min: int) -> list[int]:
    """Per-class counts n_k = n_max · (1 + k/k0)^(−q) with n_0 = n_max, n_{C−1} = n_min and Σ n_k = total.

    A shifted power law whose two parameters are fixed by the end points and the total: with iNaturalist-2018's
    figures (8142 classes, 437 513 images, 1000 down to 2) it follows that dataset's sorted class counts.
    """
    if not classes * n_min <= total <= classes * n_max:
        raise ValueError(f"{classes} classes of {n_min}..{n_max} images cannot total {total}")
    k = np.arange(classes, dtype=np.float64)

    def profile(q: float) -> np.ndarray:
        k0 = (classes - 1) / ((n_max / n_min) ** (1 / q) - 1)
        return np.maximum(np.round(n_max * (1 + k / k0) ** (-q)), n_min)

    lo, hi = 1e-3, 50.0
    for _ in range(100):  # the total grows with q
        q = (lo + hi) / 2
        lo, hi = (lo, q) if profile(q).sum() > total else (q, hi)
    counts = profile(lo).astype(np.int64)
    residual = total - int(counts.sum())  # < C after the bisection: ±1 on the middle classes
    counts[classes // 4:classes // 4 + abs(residual)] += 1 if residual > 0 else -1
    return counts.tolist()


def long_tail_split(
    labels: np.ndarray, counts: list[int], val_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded choice of a val split of ``val_per_class`` images per class, then ``counts[j]`` train indices
    per class from the rest.

    Val is reserved first so that it holds every class: a class whose profile count needs (nearly) all of
    its images (Fashion-MNIST-LT's class 0: 6000 of 6000) gives up ``val_per_class`` of them and trains on
    the rest (5980), logged. A class with fewer than 2·``val_per_class`` images gets half of them in val,
    with a warning naming it. Returns (train indices, val indices) into ``labels``.
    """
    rng = np.random.default_rng(seed)
    train, val, short, reduced = [], [], [], []
    for j, n in enumerate(counts):
        idx = rng.permutation(np.flatnonzero(labels == j))
        if n > len(idx):
            raise ValueError(f"class {j}: profile asks for {n} images, source has {len(idx)}")
        take = min(val_per_class, len(idx) // 2)
        val.append(idx[:take])
        train.append(idx[take:take + min(n, len(idx) - take)])
        if take < val_per_class:
            short.append((j, take))
        if len(train[-1]) < n:
            reduced.append((j, n, len(train[-1])))
    if reduced:
        log.info("val split: classes that give up train images to val (class, profile count, train count): %s",
                 reduced)
    if short:
        log.warning("val split: classes with fewer than %d held-out images (class, got): %s",
                    val_per_class, short)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
