"""The published sizes of the standard long-tail splits, and a check of what a source holds against them.

``ltdist shards list|inat2018|cifar ... --check`` counts the entries of the list files (json, pickles) per
split and class before any image is opened and names every difference from the published figures:
split totals, classes without entries, the largest and smallest train class, and the per-class count of
balanced val / test splits (plus entries listed twice). Sources of the figures:

- ImageNet-LT and Places-LT (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World",
  arXiv:1904.05160): the list files of the classifier-balancing code (Kang et al., "Decoupling
  Representation and Classifier for Long-Tailed Recognition", arXiv:1910.09217), counted line by line:
  Places_LT_train/val/test.txt 62 500 / 7 300 / 36 500 lines in 365 classes, train 4980 … 5 per class,
  val 20 and test 100 per class; ImageNet_LT_val/test.txt 20 000 / 50 000 lines, 20 and 50 per class. The
  ImageNet-LT train list (115 846 images, 1280 … 5 per class) as TensorFlow Datasets' imagenet_lt catalog
  entry, built from the same OLTR list files, gives it.
- iNaturalist 2018: the competition's page (github.com/visipedia/inat_comp, 2018/README.md): 8 142 species,
  437 513 train and 24 426 val images; the classifier-balancing val list has 3 per class.
- CIFAR-100-LT at imbalance 100: the construction of Cao et al. ("Learning Imbalanced Datasets with
  Label-Distribution-Aware Margin Loss", arXiv:1906.07413; their imbalance_cifar.py),
  n_i = int(500 · 0.01^(i/99)): 10 847 train images, 500 … 5; CIFAR-100's test split, 100 per class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Published:
    """Published figures of one data set. ``totals``: entries per split; ``per_class``: the count of every
    class in a balanced split; ``train_range``: (largest, smallest) train class, when published."""

    name: str
    classes: int
    totals: dict[str, int]
    per_class: dict[str, int] = field(default_factory=dict)
    train_range: tuple[int, int] | None = None


PUBLISHED = {
    "imagenet-lt": Published("ImageNet-LT", 1000, {"train": 115_846, "val": 20_000, "test": 50_000},
                             {"val": 20, "test": 50}, (1280, 5)),
    "places-lt": Published("Places-LT", 365, {"train": 62_500, "val": 7_300, "test": 36_500},
                           {"val": 20, "test": 100}, (4980, 5)),
    # The long-tail literature tests on val2018 (ltdist's test split when built from --split-file test=val2018.json).
    "inat2018": Published("iNaturalist-2018", 8142, {"train": 437_513, "val": 24_426, "test": 24_426},
                          {"val": 3, "test": 3}),
    "cifar100-lt": Published("CIFAR-100-LT (imbalance 100)", 100, {"train": 10_847, "test": 10_000}, {"test": 100},
                             (500, 5)),
}


def guess_published(fmt: str, split_files: dict[str, str], num_classes: int, imbalance: float) -> str | None:
    """The PUBLISHED key a source most likely is: by format, list file name, then class count; None if none."""
    if fmt == "inat2018":
        return "inat2018"
    if fmt == "cifar":
        return "cifar100-lt" if num_classes == 100 and imbalance == 100 else None
    names = " ".join(split_files.values()).lower().replace("-", "_")
    for key, marker in (("imagenet-lt", "imagenet_lt"), ("places-lt", "places_lt")):
        if marker in names:
            return key
    return next((k for k in ("imagenet-lt", "places-lt") if PUBLISHED[k].classes == num_classes), None)


def _ids(ids: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


def differences(published: Published, labels: dict[str, Sequence[int]], keys: dict[str, Sequence[str]] | None = None
                ) -> list[str]:
    """Every way ``labels`` (split -> class id per entry) differs from ``published``, one line each; [] when
    they match. ``keys`` (split -> entry path / id), when given, also finds entries listed twice."""
    out: list[str] = []
    for split in published.totals:
        if split not in labels:
            out.append(f"{split}: no {split} split given (published: {published.totals[split]:,} entries)")
    for split, entries in labels.items():
        if split not in published.totals:
            continue
        n, want = len(entries), published.totals[split]
        if n != want:
            more = "more" if n > want else "fewer"
            out.append(f"{split}: {n:,} entries, published {want:,} ({abs(n - want):,} {more})")
        counts = Counter(entries)
        missing = [j for j in range(published.classes) if counts[j] == 0]
        if missing:
            out.append(f"{split}: {len(missing)} of the {published.classes} published classes have no entry: "
                       f"class {_ids(missing)}")
        extra = sorted(j for j in counts if not 0 <= j < published.classes)
        if extra:
            out.append(f"{split}: labels outside the published 0 … {published.classes - 1}: {_ids(extra)}")
        if split in published.per_class:
            want_j = published.per_class[split]
            off = [j for j in range(published.classes) if counts[j] not in (0, want_j)]
            if off:
                out.append(f"{split}: {want_j} entries per class published; class "
                           + ", ".join(f"{j} has {counts[j]}" for j in off[:10])
                           + (f", … ({len(off)} classes in all)" if len(off) > 10 else ""))
        if split == "train" and published.train_range is not None and counts:
            most, least = max(counts.values()), min(counts[j] for j in range(published.classes) if counts[j])
            if (most, least) != published.train_range:
                out.append(f"train: classes of {most} … {least} entries, published "
                           f"{published.train_range[0]} … {published.train_range[1]}")
        if keys is not None and split in keys:
            twice = sorted(k for k, c in Counter(keys[split]).items() if c > 1)
            if twice:
                out.append(f"{split}: {len(twice)} entries listed more than once: {', '.join(twice[:5])}")
    return out
