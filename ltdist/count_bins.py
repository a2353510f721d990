"""Classes binned by training count, for reports with too many classes to list one by one.

Bins are log-spaced at powers of 2 of the training count n: n = 0, 1, 2–3, 4–7, 8–15, … A bin that holds
no class is merged into the next one (its range joins that bin's), and the first and last ranges are cut
to the smallest and largest count present, so the bins cover every count from min(n) to max(n) once and
every class lies in exactly one bin. Powers of 2 keep a few bins even at iNaturalist scale (8142 classes
with 2–1000 images each: 9 bins), and each bin spans a constant factor of counts, which is how accuracy
moves with n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Most classes a table lists one row each (report.md, ``ltdist stats``); with more, it bins them by training
# count. The default of ``evaluate.per_class_rows_max``.
PER_CLASS_ROWS_MAX = 50


class CountBin(NamedTuple):
    """Classes whose training count n satisfies lo ≤ n ≤ hi (inclusive; counts are samples)."""

    lo: int
    hi: int
    classes: list[int]


def count_bins(train_counts: Sequence[int] | np.ndarray) -> list[CountBin]:
    """Partition the classes into non-empty power-of-2 bins of their training count.

    Args:
        train_counts: [C] training samples per class, each ≥ 0.
    Returns:
        Bins ordered by count, non-overlapping, each with ≥ 1 class (sorted ids); [] when C = 0.
    """
    counts = [int(n) for n in train_counts]
    if any(n < 0 for n in counts):
        raise ValueError(f"train_counts must be non-negative, got min {min(counts)}")
    if not counts:
        return []
    # Power-of-2 bin b holds 2^(b-1) ≤ n ≤ 2^b − 1, which is n.bit_length() == b (b = 0: n = 0).
    members: dict[int, list[int]] = {}
    for class_id, n in enumerate(counts):
        members.setdefault(n.bit_length(), []).append(class_id)
    bins: list[CountBin] = []
    lo = min(counts)
    for b in sorted(members):  # a run of empty bins joins the next non-empty one: lo starts where the last ended
        hi = (1 << b) - 1
        bins.append(CountBin(lo, hi, members[b]))
        lo = hi + 1
    bins[-1] = bins[-1]._replace(hi=max(counts))
    return bins


def binned_accuracy(accuracy: Sequence[float] | np.ndarray,
                    bins: Sequence[CountBin]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the per-class accuracy over each bin's classes.

    Classes without a test sample (NaN) are left out; a bin with no tested class gets NaN for both.
    The deviation is the population one (ddof = 0): the spread of these classes, not an estimate.

    Args:
        accuracy: [C] per-class top-1 in [0, 1], NaN for an untested class.
        bins: from :func:`count_bins` on the same C classes.
    Returns:
        (mean [len(bins)], std [len(bins)]) float64, fractions in [0, 1].
    """
    values = np.asarray(accuracy, dtype=np.float64)
    mean = np.full(len(bins), np.nan)
    std = np.full(len(bins), np.nan)
    for i, b in enumerate(bins):
        tested = values[b.classes]
        tested = tested[~np.isnan(tested)]
        if tested.size:
            mean[i], std[i] = tested.mean(), tested.std()
    return mean, std


def format_range(lo: int, hi: int) -> str:
    """A bin's count range as a table cell: "0", "2–3"."""
    return str(lo) if lo == hi else f"{lo}–{hi}"
