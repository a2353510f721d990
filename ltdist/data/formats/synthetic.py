"""An iNaturalist-2018-shaped synthetic dataset: small JPEGs with class-dependent patterns.

iNaturalist-2018 itself (8142 classes, 437 513 train images, 1000 down to 2 per class) is too large to
download for a rehearsal, so this source reproduces its *shape*: the same class-count profile
(:func:`ltdist.data.formats.longtail.counts_with_total`, end points 1000 and 1000 / IF and iNaturalist's
mean count per class), a balanced val and a balanced test split, written through the same shard writer
and index as the real formats. With fewer classes the profile keeps its end points and its mean count,
so 1 000 and 8 142 classes differ only in scale.

Every class has a fixed random 4×4 colour grid (blocks of ``size/4`` px); an image of the class is that
grid shifted by up to 2 px, with a random brightness and Gaussian pixel noise, saved as JPEG. A small
CNN can tell thousands of such classes apart, so a run learns something, while the images are rendered
on the fly in the writer's worker processes (nothing is held in memory but the sample list).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ltdist.data.formats.longtail import counts_with_total
from ltdist.data.writer import SourceSample

INAT_CLASSES = 8142
INAT_TRAIN_IMAGES = 437_513
N_MAX = 1000  # images of the largest class, as in iNaturalist-2018
GRID = 4  # the class pattern is a GRID × GRID colour grid


@dataclass(frozen=True)
class SyntheticImage:
    """Image ``index`` of class ``label``: rendered by :meth:`encode` in the writer process."""

    label: int
    index: int
    split: str
    seed: int
    size: int

    def pixels(self) -> np.ndarray:
        """[size, size, 3] uint8."""
        block = -(-self.size // GRID)
        grid = np.random.default_rng([self.seed, self.label]).integers(0, 256, (GRID, GRID, 3))
        pattern = np.kron(grid, np.ones((block, block, 1)))[:self.size, :self.size]
        rng = np.random.default_rng([self.seed, self.label, self.index, _SPLIT_ID[self.split]])
        dy, dx = rng.integers(-2, 3, size=2)
        image = np.roll(pattern, (int(dy), int(dx)), axis=(0, 1)) * rng.uniform(0.7, 1.3)
        image += rng.normal(0.0, 20.0, image.shape)
        return np.clip(image, 0, 255).astype(np.uint8)

    def encode(self) -> tuple[bytes, str]:
        buf = io.BytesIO()
        Image.fromarray(self.pixels()).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "jpg"


_SPLIT_ID = {"train": 0, "val": 1, "test": 2}


def train_counts(classes: int, imbalance: float, train_images: int = 0) -> list[int]:
    """Per-class train counts: 1000 down to 1000 / ``imbalance``, totalling ``train_images`` (0: iNaturalist's
    mean count per class × ``classes``, i.e. 437 513 at 8142 classes)."""
    if classes < 2:
        raise ValueError(f"synthetic: need at least 2 classes, got {classes}")
    n_min = max(1, round(N_MAX / imbalance))
    total = train_images or round(INAT_TRAIN_IMAGES * classes / INAT_CLASSES)
    return counts_with_total(classes, total, N_MAX, n_min)


def load(*, classes: int, imbalance: float, val_per_class: int, test_per_class: int, image_size: int, seed: int,
         train_images: int = 0) -> tuple[list[str], dict[str, list[SourceSample]]]:
    """Class names and the train / val / test sample lists (val and test balanced; val omitted at 0)."""
    if image_size < GRID or test_per_class < 1 or val_per_class < 0:
        raise ValueError(f"synthetic: need image_size >= {GRID}, test_per_class >= 1 and val_per_class >= 0, got "
                         f"{image_size}, {test_per_class}, {val_per_class}")
    per_split = {"train": train_counts(classes, imbalance, train_images), "val": [val_per_class] * classes,
                 "test": [test_per_class] * classes}
    splits = {
        split: [SourceSample(f"{split}_{j:05d}_{i:04d}", j, SyntheticImage(j, i, split, seed, image_size))
                for j, n in enumerate(counts) for i in range(n)]
        for split, counts in per_split.items() if sum(counts)
    }
    return [f"class_{j:05d}" for j in range(classes)], splits
